"""Fake kernels of the watermark ops (schemas in csrc/watermark/watermark_cpu.cpp) and the autograd of kgw_logits, whose
gradient w.r.t. the logits is the identity (it adds a constant per entry). The argmax ops return indices.

Their Triton twins ``alignops::kgw_logits_triton``, ``kgw_argmax_triton`` and ``gumbel_argmax_triton`` have the
arguments and outputs of the native ops, computed by kernels/watermark.py after the native ops' checks
(register_triton_twin). On CPU tensors only in the Triton interpreter."""

from __future__ import annotations

import math

import torch

from .._checks import check_triton_device
from .._counter_hash import SALT_GUMBEL, SALT_KGW, key_state
from ._registration import register_fake, register_triton_twin


@register_fake("alignops::kgw_logits")
def kgw_logits_fake(logits, context, key, gamma, delta):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@register_fake("alignops::kgw_argmax")
def kgw_argmax_fake(logits, context, key, gamma, delta):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@register_fake("alignops::gumbel_argmax")
def gumbel_argmax_fake(logits, context, key, temperature):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def _kgw_logits_backward(ctx, grad):
    return grad, None, None, None, None


def register_kgw_logits_autograd(op: str) -> None:
    torch.library.register_autograd(op, _kgw_logits_backward)


register_kgw_logits_autograd("alignops::kgw_logits")


def _threshold(gamma: float) -> int:
    """The green-list bound floor(gamma * 2^32) of csrc/watermark/watermark_cpu.cpp."""
    return math.floor(gamma * 2**32)


@register_triton_twin("alignops::kgw_logits")
def kgw_logits_triton(
    logits: torch.Tensor, context: torch.Tensor, key: int, gamma: float, delta: float
) -> torch.Tensor:
    """Triton twin of ``alignops::kgw_logits``."""
    from ..kernels.watermark import launch_kgw_logits

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
    from ..kernels.watermark import launch_kgw_argmax

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
    from ..kernels.watermark import launch_gumbel_argmax

    check_triton_device(logits, "logits")
    out = logits.new_empty((logits.shape[0],), dtype=torch.int64)
    if logits.shape[0]:
        launch_gumbel_argmax(
            logits.contiguous(), context.long().contiguous(), out, key_state(SALT_GUMBEL, key), 1.0 / temperature
        )
    return out


register_kgw_logits_autograd("alignops::kgw_logits_triton")
