"""Fake kernels of the watermark ops (schemas in csrc/registration.cpp) and the autograd of kgw_logits, whose
gradient w.r.t. the logits is the identity (it adds a constant per entry). The argmax ops return indices."""

from __future__ import annotations

import torch

from ._registration import register_fake


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
