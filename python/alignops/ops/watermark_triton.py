"""Triton ops of the watermark family: ``alignops::kgw_logits_triton``, ``kgw_argmax_triton`` and
``gumbel_argmax_triton``, the arguments and outputs of the native ops (csrc/registration.cpp), computed by
kernels/watermark.py. On CPU tensors only in the Triton interpreter."""

from __future__ import annotations

import math

import torch

from .._checks import check_triton_device
from .._errors import AlignopsError
from ..kernels.watermark import launch_gumbel_argmax, launch_kgw_argmax, launch_kgw_logits
from ..reference.metrics import SALT_GUMBEL, SALT_KGW, key_state
from ._registration import register_triton_twin
from .watermark import register_kgw_logits_autograd

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(logits: torch.Tensor, context: torch.Tensor) -> None:
    """The checks of csrc/watermark/watermark_cpu.cpp, with its messages."""
    if logits.dim() != 2:
        raise AlignopsError(f"logits must be a 2-D tensor of shape [B, V], got shape {list(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise AlignopsError(f"logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    check_triton_device(logits, "logits")
    if context.dim() != 2:
        raise AlignopsError(f"context must be a 2-D tensor of shape [B, h], got shape {list(context.shape)}")
    if context.dtype not in (torch.int64, torch.int32):
        raise AlignopsError(f"context must be int64 or int32, got {context.dtype}")
    if context.device != logits.device:
        raise AlignopsError(f"context must be on the device of logits ({logits.device}), got {context.device}")
    if context.shape[0] != logits.shape[0]:
        raise AlignopsError(
            f"context must have one row per row of logits [B = {logits.shape[0]}], got shape {list(context.shape)}"
        )
    if logits.shape[0] > 0 and logits.shape[1] < 1:
        raise AlignopsError("logits must have a vocabulary of V >= 1 entries")


def _threshold(gamma: float, delta: float) -> int:
    if not 0 <= gamma <= 1:
        raise AlignopsError(f"gamma (the green fraction) must be in [0, 1], got {gamma}")
    if not math.isfinite(delta):
        raise AlignopsError(f"delta must be finite, got {delta}")
    return math.floor(gamma * 2**32)


@register_triton_twin("alignops::kgw_logits")
def kgw_logits_triton(
    logits: torch.Tensor, context: torch.Tensor, key: int, gamma: float, delta: float
) -> torch.Tensor:
    """Triton twin of ``alignops::kgw_logits``."""
    _check(logits, context)
    threshold = _threshold(gamma, delta)
    x = logits.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        launch_kgw_logits(x, context.long().contiguous(), out, key_state(SALT_KGW, key), threshold, delta)
    return out


@register_triton_twin("alignops::kgw_argmax")
def kgw_argmax_triton(
    logits: torch.Tensor, context: torch.Tensor, key: int, gamma: float, delta: float
) -> torch.Tensor:
    """Triton twin of ``alignops::kgw_argmax``."""
    _check(logits, context)
    threshold = _threshold(gamma, delta)
    out = logits.new_empty((logits.shape[0],), dtype=torch.int64)
    if logits.shape[0]:
        launch_kgw_argmax(
            logits.contiguous(), context.long().contiguous(), out, key_state(SALT_KGW, key), threshold, delta
        )
    return out


@register_triton_twin("alignops::gumbel_argmax")
def gumbel_argmax_triton(logits: torch.Tensor, context: torch.Tensor, key: int, temperature: float) -> torch.Tensor:
    """Triton twin of ``alignops::gumbel_argmax``."""
    _check(logits, context)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise AlignopsError(f"temperature must be a finite value > 0, got {temperature}")
    out = logits.new_empty((logits.shape[0],), dtype=torch.int64)
    if logits.shape[0]:
        launch_gumbel_argmax(
            logits.contiguous(), context.long().contiguous(), out, key_state(SALT_GUMBEL, key), 1.0 / temperature
        )
    return out


register_kgw_logits_autograd("alignops::kgw_logits_triton")
