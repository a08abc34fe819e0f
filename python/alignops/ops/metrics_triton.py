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


def _check(a: torch.Tensor, b: torch.Tensor, num_classes: int, num_resamples: int) -> None:
    if a.dim() != 2:
        raise AlignopsError(f"a must be a 2-D tensor of shape [P, N], got shape {list(a.shape)}")
    if b.dim() != 2:
        raise AlignopsError(f"b must be a 2-D tensor of shape [P, N] or [1, N], got shape {list(b.shape)}")
    if a.dtype not in (torch.int64, torch.int32):
        raise AlignopsError(f"a must be int64 or int32, got {a.dtype}")
    if b.dtype != a.dtype:
        raise AlignopsError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    check_triton_device(a, "a")
    if b.device != a.device:
        raise AlignopsError(f"b must be on the device of a ({a.device}), got {b.device}")
    P, N = a.shape
    if b.shape[1] != N or b.shape[0] not in (P, 1):
        raise AlignopsError(f"b must have shape [P, N] = [{P}, {N}] or [1, N], got {list(b.shape)}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise AlignopsError(f"num_classes must be in [1, {MAX_CLASSES}] for the Triton kernel, got {num_classes}")
    if num_resamples < 0:
        raise AlignopsError(f"num_resamples must be >= 0, got {num_resamples}")


@register_triton_twin("alignops::bootstrap_confusion")
def bootstrap_confusion_triton(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, num_resamples: int, seed: int
) -> torch.Tensor:
    """Triton twin of ``alignops::bootstrap_confusion``: int32 [P, R + 1, C, C], identical counts."""
    _check(a, b, num_classes, num_resamples)
    P, N = a.shape
    out = a.new_zeros((P, num_resamples + 1, num_classes, num_classes), dtype=torch.int32)
    if P and N:
        launch_bootstrap_confusion(
            a.long().contiguous(), b.long().contiguous(), out, num_classes, key_state(SALT_BOOTSTRAP, seed)
        )
    return out
