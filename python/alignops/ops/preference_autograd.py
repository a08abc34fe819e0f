"""The fake kernels and autograd of preference_loss and selective_logprobs, written once for the two libraries
that register these ops: alignops._C (ops/preference.py, namespace ``alignops``) and the LibTorch stable-ABI
library (build_tools/stable_abi.py, namespace ``alignops_stable``). Torch only, and nothing that reads the
registered ops: the stable library imports this module under a torch that has no alignops build."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._dtypes import acc_dtype

# ---- preference_loss: the kernels return the closed-form gradient [4, B]; backward is one multiply -------------


def preference_loss_outputs(pc: torch.Tensor, compute_grad: bool):
    """(loss [B], chosen_rewards [B], rejected_rewards [B], grad [4, B] or [0]), empty, in the accumulation dtype
    on the device of ``pc``: the fake kernel's result and the Triton twin's outputs."""
    acc, B = acc_dtype(pc.dtype), pc.shape[0]
    grad = pc.new_empty((4, B) if compute_grad else (0,), dtype=acc)
    return pc.new_empty(B, dtype=acc), pc.new_empty(B, dtype=acc), pc.new_empty(B, dtype=acc), grad


def preference_loss_fake(
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
    return preference_loss_outputs(pc, compute_grad)


def preference_loss_setup(ctx, inputs, output):
    # Rewards and the gradient buffer are never differentiated: no [B] zero grads for them.
    ctx.set_materialize_grads(False)
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.save_for_backward(output[3])


def preference_loss_backward(ctx, grad_loss, _grad_chosen_rewards, _grad_rejected_rewards, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 16
    if grad.dim() == 1:  # the empty [0] placeholder, not a [4, B] gradient
        raise RuntimeError(
            "preference_loss was called with compute_grad=False; call it through alignops.preference_loss (which "
            "sets it), or pass compute_grad=True, to differentiate"
        )
    scaled = grad * grad_loss  # one pass over [4, B]; rows are views
    grads = [scaled[k].to(dt) if ctx.needs_input_grad[k] else None for k, dt in enumerate(ctx.dtypes)]
    return (*grads, *([None] * 12))


# ---- selective_logprobs: backward is the registered backward op (softmax recomputed from the saved lse) --------


def selective_logprobs_fake(logits, targets, ignore_index, temperature):
    """(logp [N], lse [N]), empty, in the accumulation dtype: also the Triton twin's outputs."""
    n, acc = logits.shape[0], acc_dtype(logits.dtype)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


def selective_logprobs_backward_fake(grad_logp, logits, targets, lse, ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def selective_logprobs_setup(ctx, inputs, output):
    logits, targets, ignore_index, temperature = inputs
    ctx.set_materialize_grads(False)  # lse is never differentiated
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index, ctx.temperature = ignore_index, temperature


def selective_logprobs_backward_for(backward_op) -> Callable:
    """The autograd backward of selective_logprobs, which calls ``backward_op`` (native, Triton or stable)."""

    def backward(ctx, grad_logp, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        if grad_logp is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_logits = backward_op(grad_logp.contiguous(), logits, targets, lse, ctx.ignore_index, ctx.temperature)
        return grad_logits, None, None, None

    return backward
