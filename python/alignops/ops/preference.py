"""Fake kernels and autograd of the preference ops (schemas in csrc/registration.cpp)."""

from __future__ import annotations

import torch

from ._registration import register_fake

_acc = {torch.float64: torch.float64}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every floating dtype, fp64 kept as fp64 (mirrors csrc/common/checks.h)."""
    return _acc.get(dtype, torch.float32)


# ---- preference_loss --------------------------------------------------------------------------------


@register_fake("alignops::preference_loss")
def _preference_loss_fake(
    pc,
    pr,
    rc,
    rr,
    beta,
    chosen_lengths,
    rejected_lengths,
    loss_types,
    loss_weights,
    beta_value,
    label_smoothing,
    gamma,
    discopop_tau,
    f_divergence,
    f_alpha,
    compute_grad,
):
    acc = acc_dtype(pc.dtype)
    B = pc.shape[0]
    grad = pc.new_empty((4, B) if compute_grad else (0,), dtype=acc)
    return pc.new_empty(B, dtype=acc), pc.new_empty(B, dtype=acc), pc.new_empty(B, dtype=acc), grad


def _preference_loss_setup(ctx, inputs, output):
    # Rewards and the gradient buffer are never differentiated: no [B] zero grads for them.
    ctx.set_materialize_grads(False)
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.save_for_backward(output[3])


def _preference_loss_backward(ctx, grad_loss, _grad_chosen_rewards, _grad_rejected_rewards, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 16
    if grad.dim() == 1:  # the empty [0] placeholder, not a [4, B] gradient
        raise RuntimeError(
            "alignops::preference_loss was called with compute_grad=False; call it through "
            "alignops.preference_loss (which sets it) to differentiate"
        )
    scaled = grad * grad_loss  # one pass over [4, B]; rows are views
    grads = [scaled[k].to(dt) if ctx.needs_input_grad[k] else None for k, dt in enumerate(ctx.dtypes)]
    return (*grads, *([None] * 12))


def register_preference_loss_autograd(op: str) -> None:
    """The kernels return the closed-form gradient; backward is one multiply (shared by native and Triton)."""
    torch.library.register_autograd(op, _preference_loss_backward, setup_context=_preference_loss_setup)


register_preference_loss_autograd("alignops::preference_loss")


# ---- selective_logprobs -----------------------------------------------------------------------------


@register_fake("alignops::selective_logprobs")
def _selective_logprobs_fake(logits, targets, ignore_index, temperature):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


@register_fake("alignops::selective_logprobs_backward")
def _selective_logprobs_backward_fake(grad_logp, logits, targets, lse, ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _selective_logprobs_setup(ctx, inputs, output):
    logits, targets, ignore_index, temperature = inputs
    ctx.set_materialize_grads(False)  # lse is never differentiated
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index
    ctx.temperature = temperature


def register_selective_logprobs_autograd(op: str, backward_op) -> None:
    """Backward is the registered op ``backward_op`` (recomputes softmax from the saved lse)."""

    def backward(ctx, grad_logp, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        if grad_logp is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_logits = backward_op(grad_logp.contiguous(), logits, targets, lse, ctx.ignore_index, ctx.temperature)
        return grad_logits, None, None, None

    torch.library.register_autograd(op, backward, setup_context=_selective_logprobs_setup)


register_selective_logprobs_autograd("alignops::selective_logprobs", torch.ops.alignops.selective_logprobs_backward)


# ---- fused_linear_logprobs --------------------------------------------------------------------------


@register_fake("alignops::fused_linear_logprobs")
def _fused_linear_logprobs_fake(
    hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap, return_entropy
):
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    return (
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n if return_entropy else 0, dtype=acc),
    )


@register_fake("alignops::fused_linear_logprobs_backward")
def _fused_linear_logprobs_backward_fake(
    grad_logp,
    hidden,
    weight,
    targets,
    bias,
    lse,
    ignore_index,
    temperature,
    logit_scale,
    softcap,
    bias_grad,
    grad_entropy=None,
    entropy=None,
):
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        hidden.new_empty(weight.shape[0] if bias_grad else 0),
    )


def _fused_linear_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap, _ = inputs
    ctx.set_materialize_grads(False)  # lse is never differentiated; logp and entropy only when used
    ctx.save_for_backward(hidden, weight, targets, bias, output[1], output[2])
    ctx.options = (ignore_index, temperature, logit_scale, softcap)


def register_fused_linear_logprobs_autograd(op: str, backward_op) -> None:
    """Backward is ``backward_op``, which recomputes the logits tile by tile (native and Triton); the entropy's
    gradient (when the entropy was returned and is used) rides in the same pass."""

    def backward(ctx, grad_logp, _grad_lse, grad_entropy):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        if entropy.numel() == 0:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        extra = () if grad_entropy is None else (grad_entropy.contiguous(), entropy)
        gh, gw, gb = backward_op(
            grad_logp.contiguous(), hidden, weight, targets, bias, lse, *ctx.options, bias_grad, *extra
        )
        return (
            gh if ctx.needs_input_grad[0] else None,
            gw if ctx.needs_input_grad[1] else None,
            None,
            gb if bias_grad else None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(op, backward, setup_context=_fused_linear_setup)


register_fused_linear_logprobs_autograd(
    "alignops::fused_linear_logprobs", torch.ops.alignops.fused_linear_logprobs_backward
)
