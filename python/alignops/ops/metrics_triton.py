"""Triton op of the metrics family: ``alignops::bootstrap_confusion_triton``, the same arguments and output as
the native ``alignops::bootstrap_confusion`` (csrc/registration.cpp), computed by kernels/metrics.py. Nothing
here reads the device: the labels' range is not checked (the kernel miscounts labels out of range, and never
reads or writes out of bounds); the public ``alignops.metrics.confusion_matrices`` checks it unless told not
to. On CPU tensors only in the Triton interpreter."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._errors import AlignopsError
from ..kernels.metrics import MAX_CLASSES, launch_bootstrap_confusion
from ..reference.metrics import SALT_BOOTSTRAP, key_state
from ._registration import register_triton_twin


@register_triton_twin("alignops::bootstrap_confusion")
def bootstrap_confusion_triton(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, num_resamples: int, seed: int
) -> torch.Tensor:
    """Triton twin of ``alignops::bootstrap_confusion``: int32 [P, R + 1, C, C], identical counts."""
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
