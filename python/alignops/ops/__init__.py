"""Fake kernels, autograd formulas and Triton ops of every family, registered on import."""

from . import (  # noqa: F401
    adpa,
    ctc,
    ctc_posteriors,
    ctc_segmentation,
    distillation,
    metrics,
    ot,
    policy,
    ppo,
    preference,
    skip,
    wasserstein,
    watermark,
)

try:
    import triton
except ImportError:
    triton = None
if triton is not None:
    from . import distillation_triton, fused_linear_triton, ot_triton, preference_triton, skip_triton  # noqa: F401
    from . import ctc_segmentation_triton, metrics_triton, wasserstein_triton, watermark_triton  # noqa: F401
    from . import policy_triton, ppo_triton  # noqa: F401
