"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import objectives, preference, represent, skip

__all__ = ["objectives", "preference", "represent", "skip"]

from . import metrics, watermark  # noqa: E402,F401

__all__ += ["metrics", "watermark"]
