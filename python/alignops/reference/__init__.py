"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import preference, represent, skip

__all__ = ["preference", "represent", "skip"]
