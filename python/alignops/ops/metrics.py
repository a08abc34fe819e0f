"""Fake kernel and Triton twin of alignops::bootstrap_confusion (schema in csrc/metrics/bootstrap_confusion_cpu.cpp).
Not
differentiable (integer counts), so no autograd.

``alignops::bootstrap_confusion_triton`` has the native op's arguments and output, computed by kernels/metrics.py.
Nothing there reads the device: the labels' range is not checked (the kernel miscounts labels out of range, and
never reads or writes out of bounds); the public ``alignops.metrics.confusion_matrices`` checks it unless told not
to. On CPU tensors only in the Triton interpreter."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._counter_hash import SALT_BOOTSTRAP, key_state
from .._errors import AlignopsError
from ._registration import register_fake, register_triton_twin


@register_fake("alignops::bootstrap_confusion")
def bootstrap_confusion_fake(a, b, num_classes, num_resamples, seed):
    return a.new_empty((a.shape[0], num_resamples + 1, num_classes, num_classes), dtype=torch.int32)


@register_triton_twin("alignops::bootstrap_confusion")
def bootstrap_confusion_triton(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, num_resamples: int, seed: int
) -> torch.Tensor:
    """Triton twin of ``alignops::bootstrap_confusion``: int32 [P, R + 1, C, C], identical counts."""
    from ..kernels.metrics import MAX_CLASSES, launch_bootstrap_confusion

    check_triton_device(a, "a")
    # The Triton kernel's own bound (its one-hot tile is [BLOCK_N, C * C]); the native op's checks ran before.
    if num_classes > MAX_CLASSES:
        raise AlignopsError(f"num_classes must be in [1, {MAX_CLASSES}] for the Triton kernel, got {num_classes}")
    P, N = a.shape
    out = a.new_zeros((P, num_resamples + 1, num_classes, num_classes), dtype=torch.int32)
    if P and N:
        launch_bootstrap_confusion(
            a.long().contiguous(), b.long().contiguous(), out, num_classes, key_state(SALT_BOOTSTRAP, seed)
        )
    return out
