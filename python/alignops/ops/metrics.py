"""Fake kernel of alignops::bootstrap_confusion (schema in csrc/registration.cpp). Not differentiable
(integer counts), so no autograd."""

from __future__ import annotations

import torch

from ._registration import register_fake


@register_fake("alignops::bootstrap_confusion")
def bootstrap_confusion_fake(a, b, num_classes, num_resamples, seed):
    return a.new_empty((a.shape[0], num_resamples + 1, num_classes, num_classes), dtype=torch.int32)
