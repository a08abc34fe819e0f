"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import objectives, preference, represent, skip

__all__ = ["objectives", "preference", "represent", "skip"]

from . import ctc_segmentation  # noqa: E402

__all__ += ["ctc_segmentation"]
