"""Fake kernel and autograd of alignops::policy_loss (schema and output columns in csrc/registration.cpp).

The op returns the closed-form gradient of its summed loss w.r.t. per_token_logps. Every row's loss depends on
that row's log-probs only (the off-policy mask, VESPO's gamma weights and CISPO's clamped ratio are detached, as
in TRL), so the same [B, T] gradient also differentiates each row's loss (row_stats[:, 7]): backward is
``grad * (grad_loss_sum + grad_row_stats[:, 7:8])``. The other row_stats columns are metrics, not
differentiated. ``register_policy_loss_autograd`` is shared with the Triton twin (alignops::policy_loss_triton).
"""

from __future__ import annotations

import torch

from ._registration import register_fake
from .preference import acc_dtype

# row_stats columns (csrc/policy/policy_codes.h RowStat)
MASK_COUNT, CLIP_LOW, CLIP_HIGH, CLIP_REGION, KL, RATIO, PHI, ROW_LOSS = range(8)
NUM_ROW_STATS = 8
_NUM_ARGS = 23


@register_fake("alignops::policy_loss")
def _policy_loss_fake(per_token_logps, advantages, completion_mask, *args):
    compute_grad = args[-1]
    acc = acc_dtype(per_token_logps.dtype)
    B = per_token_logps.shape[0]
    new = per_token_logps.new_empty
    grad = torch.empty_like(per_token_logps, memory_format=torch.contiguous_format) if compute_grad else new(0)
    return new((), dtype=acc), grad, new((B, NUM_ROW_STATS), dtype=acc)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss_sum, _grad_grad, grad_row_stats):
    if grad_loss_sum is None and grad_row_stats is None:
        return (None,) * _NUM_ARGS
    if not ctx.compute_grad:
        raise RuntimeError(
            "alignops::policy_loss was called with compute_grad=False; call it through alignops.policy_loss "
            "(which sets it) to differentiate"
        )
    (grad,) = ctx.saved_tensors
    scale = grad.new_zeros((grad.shape[0], 1), dtype=acc_dtype(grad.dtype))
    if grad_loss_sum is not None:
        scale = scale + grad_loss_sum
    if grad_row_stats is not None:
        scale = scale + grad_row_stats[:, ROW_LOSS : ROW_LOSS + 1]
    grad_logps = (grad * scale).to(grad.dtype) if ctx.needs_input_grad[0] else None
    return (grad_logps, *(None,) * (_NUM_ARGS - 1))


def register_policy_loss_autograd(op: str) -> None:
    """The kernels return the closed-form gradient of the summed loss (shared by native and Triton)."""
    torch.library.register_autograd(op, _backward, setup_context=_setup)


register_policy_loss_autograd("alignops::policy_loss")
