"""Fake kernels, autograd formulas and Triton ops of every family, registered on import."""

from . import preference, skip  # noqa: F401
from . import ctc_posteriors  # noqa: F401  (its Triton op registers itself when triton is present)

try:
    import triton
except ImportError:
    triton = None
if triton is not None:
    from . import fused_linear_triton, preference_triton, skip_triton  # noqa: F401
