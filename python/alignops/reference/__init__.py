"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import ctc, objectives, preference, represent, skip, wasserstein

__all__ = ["ctc", "objectives", "preference", "represent", "skip", "wasserstein"]
