"""Fake kernel, autograd and Triton op of ctc_posteriors (schema in csrc/ctc/ctc_posteriors_cpu.cpp).

The kernels return the exact gradient d loss_b / d log_probs[b, t, c] = -sum_{s: label(s) = c} gamma_t(s)
with the loss, so the backward is one multiply by the incoming [B] gradient (shared by native and Triton).
The occupancy outputs are not differentiable.

``alignops::ctc_posteriors_triton`` has the native op's arguments and outputs, computed by
kernels/ctc.py; ``torch.library.triton_op`` traces its body, so torch.compile sees the kernel. On CPU
tensors it runs only in the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._dtypes import acc_dtype
from ._registration import register_fake, register_triton_twin


@register_fake("alignops::ctc_posteriors")
def _ctc_posteriors_fake(
    log_probs, targets, input_lengths, target_lengths, blank, return_states, return_tokens, compute_grad
):
    B, T, C = log_probs.shape
    L = targets.shape[1]
    acc = acc_dtype(log_probs.dtype)
    return (
        log_probs.new_empty((B,), dtype=acc),
        log_probs.new_empty((B, T, 2 * L + 1) if return_states else (0,), dtype=acc),
        log_probs.new_empty((B, T, L) if return_tokens else (0,), dtype=acc),
        log_probs.new_empty((B, T, C) if compute_grad else (0,)),
    )


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the first-order gradient, attached to log_probs when the backward builds a graph
    (create_graph=True), so that differentiating it again raises a clear error instead of torch's "element 0
    of tensors does not require grad"."""

    @staticmethod
    def forward(ctx, grad, log_probs):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "ctc_loss / ctc_posteriors: double backward is not supported; the kernel computes the "
            "gradient in closed form, without a graph to differentiate again"
        )


def _setup(ctx, inputs, output):
    _, states, tokens, grad = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(states, tokens, grad)
    ctx.save_for_backward(grad, inputs[0])


def _backward(ctx, grad_loss, _grad_states, _grad_tokens, _grad_grad):
    if grad_loss is None:
        return (None,) * 8
    grad, log_probs = ctx.saved_tensors
    if grad.dim() != 3:  # the empty [0] placeholder
        raise RuntimeError(
            "alignops::ctc_posteriors was called with compute_grad=False; call it through "
            "alignops.ctc_posteriors.ctc_loss (which sets it) to differentiate"
        )
    out = grad * grad_loss.to(grad.dtype)[:, None, None]
    if torch.is_grad_enabled() and log_probs.requires_grad:  # backward with create_graph=True
        out = _NoDoubleBackward.apply(out, log_probs)
    return (out, *([None] * 7))


def register_ctc_posteriors_autograd(op: str) -> None:
    torch.library.register_autograd(op, _backward, setup_context=_setup)


register_ctc_posteriors_autograd("alignops::ctc_posteriors")


@register_triton_twin("alignops::ctc_posteriors")
def ctc_posteriors_triton(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    return_states: bool,
    return_tokens: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::ctc_posteriors``, same outputs. Unlike the CPU kernel it stores the
    fp64 log-alpha of every frame ([B, T, 2L+1] fp64 scratch) and the occupancy [B, T, 2L+1] whatever
    is requested; tokens and the gradient are read off the occupancy."""
    from ..kernels.ctc import launch_ctc_posteriors

    check_triton_device(log_probs, "log_probs")
    B, T, C = log_probs.shape
    L = targets.shape[1]
    acc = acc_dtype(log_probs.dtype)
    loss, states = launch_ctc_posteriors(
        log_probs.contiguous(),
        targets.contiguous(),
        input_lengths.contiguous(),
        target_lengths.contiguous(),
        blank,
        acc,
    )
    tokens = states[..., 1::2].contiguous() if return_tokens else states.new_empty((0,))
    if compute_grad:
        labels = torch.full((B, 2 * L + 1), blank, dtype=torch.long, device=log_probs.device)
        labels[:, 1::2] = torch.where(
            torch.arange(L, device=targets.device) < target_lengths[:, None], targets.long(), blank
        )
        grad = torch.zeros(B, T, C, dtype=acc, device=log_probs.device)
        grad.scatter_add_(2, labels[:, None, :].expand(B, T, 2 * L + 1), -states)
        grad = grad.to(log_probs.dtype)
    else:
        grad = log_probs.new_empty((0,))
    return loss, states if return_states else states.new_empty((0,)), tokens, grad


register_ctc_posteriors_autograd("alignops::ctc_posteriors_triton")
