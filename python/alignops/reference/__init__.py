"""Pure-PyTorch references of every op: the spec, the CPU fallback (``backend="torch"``), the test oracle."""

from . import (
    adpa,
    ctc,
    ctc_posteriors,
    ctc_segmentation,
    distillation,
    metrics,
    objectives,
    ot,
    policy,
    preference,
    represent,
    skip,
    wasserstein,
    watermark,
)

__all__ = [
    "adpa",
    "ctc",
    "ctc_posteriors",
    "ctc_segmentation",
    "distillation",
    "metrics",
    "objectives",
    "ot",
    "policy",
    "preference",
    "represent",
    "skip",
    "wasserstein",
    "watermark",
]
