"""Triton ops of the watermark family: ``alignops::kgw_logits_triton``, ``kgw_argmax_triton`` and
``gumbel_argmax_triton``, the arguments and outputs of the native ops (csrc/registration.cpp), computed by
kernels/watermark.py after the native ops' checks (register_triton_twin). On CPU tensors only in the Triton
interpreter."""

from __future__ import annotations

import math

import torch

from .._checks import check_triton_device
from ..kernels.watermark import launch_gumbel_argmax, launch_kgw_argmax, launch_kgw_logits
from ..reference.metrics import SALT_GUMBEL, SALT_KGW, key_state
from ._registration import register_triton_twin
from .watermark import register_kgw_logits_autograd


def _threshold(gamma: float) -> int:
    """The green-list bound floor(gamma * 2^32) of csrc/watermark/watermark_cpu.cpp."""
    return math.floor(gamma * 2**32)


@register_triton_twin("alignops::kgw_logits")
def kgw_logits_triton(
    logits: torch.Tensor, context: torch.Tensor, key: int, gamma: float, delta: float
) -> torch.Tensor:
    """Triton twin of ``alignops::kgw_logits``."""
    check_triton_device(logits, "logits")
    threshold = _threshold(gamma)
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
    check_triton_device(logits, "logits")
    threshold = _threshold(gamma)
    out = logits.new_empty((logits.shape[0],), dtype=torch.int64)
    if logits.shape[0]:
        launch_kgw_argmax(
            logits.contiguous(), context.long().contiguous(), out, key_state(SALT_KGW, key), threshold, delta
        )
    return out


@register_triton_twin("alignops::gumbel_argmax")
def gumbel_argmax_triton(logits: torch.Tensor, context: torch.Tensor, key: int, temperature: float) -> torch.Tensor:
    """Triton twin of ``alignops::gumbel_argmax``."""
    check_triton_device(logits, "logits")
    out = logits.new_empty((logits.shape[0],), dtype=torch.int64)
    if logits.shape[0]:
        launch_gumbel_argmax(
            logits.contiguous(), context.long().contiguous(), out, key_state(SALT_GUMBEL, key), 1.0 / temperature
        )
    return out


register_kgw_logits_autograd("alignops::kgw_logits_triton")
