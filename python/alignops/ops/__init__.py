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
