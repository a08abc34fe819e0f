"""Triton ops of the ot family: ``alignops::sinkhorn_triton`` and ``alignops::sinkhorn_normalize_pass_triton``,
the same arguments and outputs as the native ops of csrc/registration.cpp, computed by kernels/ot.py.
On CPU tensors the kernels run only in the Triton interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from .._backend import to_device
from .._checks import check_triton_device
from ..kernels.ot import launch_normalize_pass, launch_sinkhorn, launch_sinkhorn_split, use_split
from ._registration import register_triton_twin
from .ot import register_sinkhorn_autograd


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
    B, N, M = cost.shape
    cost = cost.contiguous()
    f, g, iters, err = _outputs(cost, B, N, M)
    if B > 0 and use_split(cost.device, B, N, M):
        launch_sinkhorn_split(
            cost,
            a.contiguous(),
            b.contiguous(),
            n_sizes.contiguous(),
            m_sizes.contiguous(),
            _split_schedule(eps_schedule, eps, n_iters, cost),
            len(eps_schedule),
            n_iters,
            tol,
            scores,
            f,
            g,
            cost.new_empty(B, M),
            iters,
            err,
        )
    elif B > 0:
        sched = schedule_on_device([*eps_schedule, eps], cost)
        launch_sinkhorn(
            cost,
            a.contiguous(),
            b.contiguous(),
            n_sizes.contiguous(),
            m_sizes.contiguous(),
            sched,
            len(eps_schedule),
            n_iters,
            tol,
            scores,
            f,
            g,
            cost.new_empty(B, M),
            iters,
            err,
        )
    return f, g, iters, err


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
    f, g, iters, err = _outputs(x, B, N, M)
    if B > 0 and use_split(x.device, B, N, M):
        launch_sinkhorn_split(
            x,
            a.contiguous(),
            b.contiguous(),
            n_sizes.contiguous(),
            m_sizes.contiguous(),
            _split_schedule(eps_schedule, eps, n_iters, x),
            len(eps_schedule),
            n_iters,
            tol,
            False,
            f,
            g,
            x.new_empty(B, M),
            iters,
            err,
            points=(x.contiguous(), y.contiguous()),
            power=p,
        )
    elif B > 0:
        sched = schedule_on_device([*eps_schedule, eps], x)
        launch_sinkhorn(
            x,
            a.contiguous(),
            b.contiguous(),
            n_sizes.contiguous(),
            m_sizes.contiguous(),
            sched,
            len(eps_schedule),
            n_iters,
            tol,
            False,
            f,
            g,
            x.new_empty(B, M),
            iters,
            err,
            points=(x.contiguous(), y.contiguous()),
            power=p,
        )
    return f, g, iters, err


@register_triton_twin("alignops::sinkhorn_normalize_pass")
def sinkhorn_normalize_pass_triton(
    sim: torch.Tensor, col_bias: torch.Tensor, scale: float, row_update: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::sinkhorn_normalize_pass``: (row_bias [L, N], col_lse [L, M])."""
    check_triton_device(sim, "sim")
    L, N, M = sim.shape
    sim = sim.contiguous()
    row_bias = sim.new_zeros(L, N)
    col_lse = sim.new_empty(L, M)
    launch_normalize_pass(sim, col_bias.contiguous(), scale, row_update, row_bias, col_lse)
    return row_bias, col_lse
