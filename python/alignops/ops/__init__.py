"""Fake kernels, autograd formulas and Triton ops of every family, registered on import."""

from . import ot, preference, skip  # noqa: F401

try:
    import triton
except ImportError:
    triton = None
if triton is not None:
    from . import fused_linear_triton, ot_triton, preference_triton, skip_triton  # noqa: F401
