"""Fake kernels, autograd formulas and Triton ops of every family, registered on import."""

from . import ctc, ctc_posteriors, ctc_segmentation, distillation, metrics, ot, preference, skip, wasserstein, watermark  # noqa: F401

try:
    import triton
except ImportError:
    triton = None
if triton is not None:
    from . import distillation_triton, fused_linear_triton, ot_triton, preference_triton, skip_triton  # noqa: F401
    from . import ctc_segmentation_triton, metrics_triton, wasserstein_triton, watermark_triton  # noqa: F401
