"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import ctc, metrics, objectives, preference, represent, skip, wasserstein, watermark

__all__ = ["ctc", "metrics", "objectives", "preference", "represent", "skip", "wasserstein", "watermark"]
