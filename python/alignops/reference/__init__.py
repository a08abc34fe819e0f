"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import ctc_posteriors, objectives, preference, represent, skip

__all__ = ["ctc_posteriors", "objectives", "preference", "represent", "skip"]
