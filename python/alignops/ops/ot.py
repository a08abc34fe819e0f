"""Fake kernels and the envelope autograd of the ot family's native ops (schemas in csrc/ot/sinkhorn_cpu.cpp),
shared by their Triton twins below: ``alignops::sinkhorn_triton``, ``alignops::sinkhorn_points_triton`` and
``alignops::sinkhorn_normalize_pass_triton``, the same arguments and outputs as the native ops, computed by
kernels/ot.py. On CPU tensors the kernels run only in the Triton interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from .._backend import to_device
from .._checks import check_triton_device
from ._registration import register_fake, register_triton_twin


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


def schedule_on_device(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A list of floats as a tensor of ``like``'s dtype on its device, with no host sync (see
    ``alignops._backend.to_device``); under torch.compile a constant of the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return to_device(torch.tensor(values, dtype=like.dtype), like.device)


def _split_schedule(eps_schedule: list[float], eps: float, n_iters: int, like: torch.Tensor) -> torch.Tensor:
    """The split path's eps per iteration (the schedule, then eps) and one more eps for the final error pass."""
    K = len(eps_schedule)
    return schedule_on_device([eps_schedule[t] if t < K else eps for t in range(n_iters)] + [eps], like)


def _outputs(like, B, N, M):
    return (like.new_zeros(B, N), like.new_zeros(B, M), like.new_zeros(B, dtype=torch.int64), like.new_zeros(B))


@register_triton_twin("alignops::sinkhorn")
def sinkhorn_triton(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    n_sizes: torch.Tensor,
    m_sizes: torch.Tensor,
    eps_schedule: list[float],
    eps: float,
    n_iters: int,
    tol: float,
    scores: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::sinkhorn``: (f [B, N], g [B, M], iterations [B] int64, err [B])."""
    check_triton_device(cost, "cost")
    cost = cost.contiguous()
    return _solve(cost, *cost.shape, a, b, n_sizes, m_sizes, eps_schedule, eps, n_iters, tol, scores)


register_sinkhorn_autograd("alignops::sinkhorn_triton")


@register_triton_twin("alignops::sinkhorn_points")
def sinkhorn_points_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    n_sizes: torch.Tensor,
    m_sizes: torch.Tensor,
    p: float,
    eps_schedule: list[float],
    eps: float,
    n_iters: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::sinkhorn_points``: the cost |x_i - y_j|^p exists one tile at a time."""
    check_triton_device(x, "x")
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    points = (x.contiguous(), y.contiguous())
    return _solve(x, B, N, M, a, b, n_sizes, m_sizes, eps_schedule, eps, n_iters, tol, False, points=points, power=p)


def _solve(like, B, N, M, a, b, n_sizes, m_sizes, eps_schedule, eps, n_iters, tol, scores, **points):
    """The Triton launch of both Sinkhorn twins into fresh outputs (f, g, iterations, err): the split path
    (one problem over several programs, for few large problems) or one program per problem. ``like`` is the
    cost, or the points x (``points``: the point clouds and the cost exponent) whose dtype and device it gives."""
    from ..kernels.ot import launch_sinkhorn, launch_sinkhorn_split, use_split

    f, g, iters, err = _outputs(like, B, N, M)
    if B == 0:
        return f, g, iters, err
    split = use_split(like.device, B, N, M)
    if split:
        schedule, launch = _split_schedule(eps_schedule, eps, n_iters, like), launch_sinkhorn_split
    else:
        schedule, launch = schedule_on_device([*eps_schedule, eps], like), launch_sinkhorn
    sizes = (n_sizes.contiguous(), m_sizes.contiguous())
    buffer = like.new_empty(B, M)
    launch(
        like,
        a.contiguous(),
        b.contiguous(),
        *sizes,
        schedule,
        len(eps_schedule),
        n_iters,
        tol,
        scores,
        f,
        g,
        buffer,
        iters,
        err,
        **points,
    )
    return f, g, iters, err


@register_triton_twin("alignops::sinkhorn_normalize_pass")
def sinkhorn_normalize_pass_triton(
    sim: torch.Tensor, col_bias: torch.Tensor, scale: float, row_update: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::sinkhorn_normalize_pass``: (row_bias [L, N], col_lse [L, M])."""
    from ..kernels.ot import launch_normalize_pass

    check_triton_device(sim, "sim")
    L, N, M = sim.shape
    sim = sim.contiguous()
    row_bias = sim.new_zeros(L, N)
    col_lse = sim.new_empty(L, M)
    launch_normalize_pass(sim, col_bias.contiguous(), scale, row_update, row_bias, col_lse)
    return row_bias, col_lse
