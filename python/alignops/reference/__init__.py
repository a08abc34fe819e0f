"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import preference, skip

__all__ = ["preference", "skip"]
