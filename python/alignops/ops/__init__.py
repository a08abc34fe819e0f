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
    from . import (  # noqa: F401
        ctc_segmentation_triton,
        distillation_triton,
        fused_linear_triton,
        metrics_triton,
        ot_triton,
        policy_triton,
        ppo_triton,
        preference_triton,
        skip_triton,
        wasserstein_triton,
        watermark_triton,
    )
