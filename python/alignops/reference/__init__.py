"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import objectives, ot, preference, represent, skip

__all__ = ["objectives", "ot", "preference", "represent", "skip"]
