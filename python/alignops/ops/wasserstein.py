"""Fake kernels and autograd of the wasserstein family (schemas in csrc/registration.cpp), shared by the Triton op."""

from __future__ import annotations

import torch

from ._registration import register_fake


@register_fake("alignops::wasserstein_1d")
def _wasserstein_1d_fake(u, v, u_weights, v_weights, p):
    return u.new_empty((u.shape[0],))


@register_fake("alignops::wasserstein_1d_backward")
def _wasserstein_1d_backward_fake(grad, u, v, u_weights, v_weights, p, weights_grad):
    gwu = torch.empty_like(u) if weights_grad and u_weights is not None else u.new_empty((0, 0))
    gwv = torch.empty_like(v) if weights_grad and v_weights is not None else v.new_empty((0, 0))
    return torch.empty_like(u), torch.empty_like(v), gwu, gwv


def _setup(ctx, inputs, output):
    u, v, u_weights, v_weights, p = inputs
    ctx.p = p
    ctx.save_for_backward(u, v, u_weights, v_weights)


def register_wasserstein_1d_autograd(op: str, backward: str) -> None:
    """Closed-form backward (sign(u_i - v_j) times the lengths of the merged CDF segments) by the op ``backward``."""
    backward_op = getattr(torch.ops.alignops, backward)

    def _backward(ctx, grad):
        u, v, u_weights, v_weights = ctx.saved_tensors
        weights_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        gu, gv, gwu, gwv = backward_op(grad.contiguous(), u, v, u_weights, v_weights, ctx.p, weights_grad)
        return (gu, gv, gwu if ctx.needs_input_grad[2] else None, gwv if ctx.needs_input_grad[3] else None, None)

    torch.library.register_autograd(op, _backward, setup_context=_setup)


register_wasserstein_1d_autograd("alignops::wasserstein_1d", "wasserstein_1d_backward")
