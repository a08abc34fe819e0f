"""Fake kernels and the envelope autograd of the ot family's native ops (schemas in csrc/registration.cpp),
shared by the Triton twins in ops/ot_triton.py."""

from __future__ import annotations

import torch

from ._registration import register_fake


@register_fake("alignops::sinkhorn")
def sinkhorn_fake(cost, a, b, n_sizes, m_sizes, eps_schedule, eps, n_iters, tol, scores):
    B, N, M = cost.shape
    return (cost.new_empty(B, N), cost.new_empty(B, M), cost.new_empty(B, dtype=torch.long), cost.new_empty(B))


@register_fake("alignops::sinkhorn_points")
def sinkhorn_points_fake(x, y, a, b, n_sizes, m_sizes, p, eps_schedule, eps, n_iters, tol):
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    return (x.new_empty(B, N), x.new_empty(B, M), x.new_empty(B, dtype=torch.long), x.new_empty(B))


@register_fake("alignops::sinkhorn_normalize_pass")
def sinkhorn_normalize_pass_fake(sim, col_bias, scale, row_update):
    L, N, M = sim.shape
    return sim.new_empty(L, N), sim.new_empty(L, M)


def envelope_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, eps, scores):
    """d/dC of the envelope linearisation: P_ij (grad_f_i / a_i + grad_g_j / b_j) / 2 (negated for scores).

    For (grad_f, grad_g) = (a, b), the gradient of the dual value <a, f> + <b, g>, this is the plan P,
    Danskin's exact gradient; other functionals of (f, g) need grad="implicit" or "unrolled".
    """
    B, N, M = cost.shape
    rows = torch.arange(N, device=cost.device) < n_sizes[:, None]
    cols = torch.arange(M, device=cost.device) < m_sizes[:, None]
    u = torch.zeros_like(f) if grad_f is None else torch.where(rows & (a > 0), grad_f / a, 0)
    v = torch.zeros_like(g) if grad_g is None else torch.where(cols & (b > 0), grad_g / b, 0)
    sign = -1.0 if scores else 1.0
    # log P in one buffer (the gradient's), turned into the gradient in place; the weights are applied by
    # row chunks so that no second B x N x M temporary exists.
    out = torch.sub(f[:, :, None], cost, alpha=sign).add_(g[:, None, :]).div_(eps).exp_()
    step = max(1, (1 << 20) // max(B * M, 1))
    for r0 in range(0, N, step):
        block = out[:, r0 : r0 + step]
        valid = rows[:, r0 : r0 + step, None] & cols[:, None, :]
        # padding holds whatever exp((0 + 0 - C) / eps) gave (even inf): overwritten, not multiplied by 0
        block.mul_((0.5 * sign) * (u[:, r0 : r0 + step, None] + v[:, None, :])).masked_fill_(~valid, 0)
    return out


def _setup(ctx, inputs, output):
    cost, a, b, n_sizes, m_sizes, eps_schedule, eps, n_iters, tol, scores = inputs
    f, g, _, _ = output
    ctx.eps, ctx.scores = eps, scores
    ctx.save_for_backward(cost, a, b, f, g, n_sizes, m_sizes)


def _backward(ctx, grad_f, grad_g, _gi, _ge):
    cost, a, b, f, g, n_sizes, m_sizes = ctx.saved_tensors
    if grad_f is None and grad_g is None:
        return (None,) * 10
    grad_cost = envelope_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, ctx.eps, ctx.scores)
    return (grad_cost,) + (None,) * 9


def register_sinkhorn_autograd(op: str) -> None:
    """The envelope backward (closed form, see envelope_grad_cost), shared by native and Triton."""
    torch.library.register_autograd(op, _backward, setup_context=_setup)


register_sinkhorn_autograd("alignops::sinkhorn")
