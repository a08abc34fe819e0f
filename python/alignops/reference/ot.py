"""Pure-PyTorch references of the ot family: the spec, the ``backend="torch"`` path, the test oracle.

Conventions (POT's ``ot.bregman.sinkhorn_log``): the plan is ``P_ij = exp((f_i + g_j - C_ij) / eps)``,
so the potentials absorb the marginals (``f = eps * log_u`` of POT); each iteration updates g, then f,
from f = g = 0. The marginal error is the L1 violation of the column marginal, ``sum_j |P^T 1 - b|_j``
(the row marginal is exact after the f update). Everything here is differentiable by autograd, which
gives the *unrolled* gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def masks(n_sizes: torch.Tensor, m_sizes: torch.Tensor, N: int, M: int):
    """([B, N], [B, M]) bool: which rows and columns of each padded problem are real."""
    rows = torch.arange(N, device=n_sizes.device) < n_sizes[:, None]
    cols = torch.arange(M, device=m_sizes.device) < m_sizes[:, None]
    return rows, cols


def masked_cost(cost: torch.Tensor, n_sizes: torch.Tensor, m_sizes: torch.Tensor, scores: bool) -> torch.Tensor:
    """C (= -scores when ``scores``) with +inf outside each problem's n x m block."""
    C = -cost if scores else cost
    rows, cols = masks(n_sizes, m_sizes, C.shape[1], C.shape[2])
    valid = rows[:, :, None] & cols[:, None, :]
    return C if bool(valid.all()) else C.masked_fill(~valid, math.inf)


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    n_sizes: torch.Tensor,
    m_sizes: torch.Tensor,
    eps_schedule: Sequence[float],
    eps: float,
    n_iters: int,
    tol: float,
    scores: bool,
):
    """Batched log-domain Sinkhorn with the semantics of ``torch.ops.alignops.sinkhorn``.

    Returns (f [B, N], g [B, M], iterations [B] int64, err [B]). Iteration t runs at ``eps_schedule[t]``
    while t < len(eps_schedule), then at ``eps``; with ``tol >= 0`` a problem stops at the first iteration
    at ``eps`` whose starting column-marginal error is <= tol; the first such check comes after a full (g, f)
    update at ``eps`` (as POT's checks follow its updates): the potentials f = g = 0, or those of the last
    scaling step, may fit the columns while the rows were never fitted. Padding of f and g is 0.
    """
    B, N, M = cost.shape
    rows, cols = masks(n_sizes, m_sizes, N, M)
    C = masked_cost(cost, n_sizes, m_sizes, scores)
    log_a = torch.where(rows, a.log(), -math.inf)
    log_b = torch.where(cols, b.log(), -math.inf)
    f = cost.new_zeros(B, N)
    g = cost.new_zeros(B, M)
    iters = torch.zeros(B, dtype=torch.long, device=cost.device)
    err = cost.new_zeros(B)
    active = (n_sizes > 0) & (m_sizes > 0)
    K = len(eps_schedule)

    def column_error(f, g, e):
        L = torch.logsumexp((f[:, :, None] - C) / e, dim=1)
        return torch.where(cols, (torch.exp(g / e + L) - b).abs(), 0).sum(-1)

    for t in range(n_iters):
        e = eps_schedule[t] if t < K else eps
        if t > K and tol >= 0:
            e_t = column_error(f, g, e)
            err = torch.where(active, e_t, err)
            active = active & (e_t > tol)
            if not bool(active.any()):
                break
        L = torch.logsumexp((f[:, :, None] - C) / e, dim=1)
        g_new = torch.where(cols, e * (log_b - L), 0)
        f_new = torch.where(rows, e * (log_a - torch.logsumexp((g_new[:, None, :] - C) / e, dim=2)), 0)
        g = torch.where(active[:, None], g_new, g)
        f = torch.where(active[:, None], f_new, f)
        iters = iters + active.long()
    err = torch.where(active, column_error(f, g, eps), err)
    return f, g, iters, err


def sinkhorn_exp(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iters: int):
    """Classical (probability-domain) Sinkhorn, ``u = a / (K v)``, ``v = b / (K^T u)`` with K = exp(-C / eps),
    as POT's ``ot.sinkhorn`` (method="sinkhorn"); returns the potentials f = eps log u, g = eps log v. It
    underflows once C / eps spreads over ~87 in fp32 (the reason the log domain is the default)."""
    K = torch.exp(-cost / eps)
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    for _ in range(n_iters):
        v = b / (K.transpose(1, 2) @ u[..., None])[..., 0]
        u = a / (K @ v[..., None])[..., 0]
    return eps * u.log(), eps * v.log()


def plan(
    cost: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    n_sizes: torch.Tensor,
    m_sizes: torch.Tensor,
    scores: bool,
) -> torch.Tensor:
    """P_ij = exp((f_i + g_j - C_ij) / eps), 0 outside each problem's block."""
    C = masked_cost(cost, n_sizes, m_sizes, scores)
    return torch.exp((f[:, :, None] + g[:, None, :] - C) / eps)


# ---- UCoFiA normalisation and its peers ------------------------------------------------------------


def sinkhorn_normalize_ucofia(sim: torch.Tensor, n_iters: int = 4, temperature: float = 1.0):
    """UCoFiA's procedure, in the probability domain as the paper's code does it, on sim [N, M].

    K = exp(S / T - max S / T); b = 1 / K.sum(0); n times: a = 1 / (K b), b = 1 / (a^T K). Returns the
    log-softmax biases (log_softmax(log a) [N], log_softmax(log b) [M]). Underflows (K columns of 0,
    infinite b) once S / T spreads over ~87 in fp32: the oracle for well-scaled inputs only.
    """
    S = sim / temperature
    K = torch.exp(S - S.max())
    b = 1 / K.sum(0)
    a = torch.ones(S.shape[0], dtype=S.dtype, device=S.device)
    for _ in range(n_iters):
        a = 1 / (K @ b)
        b = 1 / (a @ K)
    return torch.log_softmax(a.log(), 0), torch.log_softmax(b.log(), 0)


def column_lse(sim: torch.Tensor, row_bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """logsumexp_i (scale * S_ij + row_bias_i) over the rows of sim [..., N, M]."""
    z = scale * sim
    if row_bias is not None:
        z = z + row_bias[..., :, None]
    return torch.logsumexp(z, dim=-2)


def sinkhorn_normalize_pass(sim: torch.Tensor, col_bias: torch.Tensor, scale: float, row_update: bool):
    """The semantics of ``torch.ops.alignops.sinkhorn_normalize_pass`` on sim [L, N, M]. A row with no term
    above -inf carries no mass: its bias is -inf (not +inf, which would make every column's terms NaN)."""
    if row_update:
        lse = torch.logsumexp(scale * sim + col_bias[:, None, :], dim=-1)
        row_bias = torch.where(lse == -math.inf, -math.inf, -lse)
    else:
        row_bias = sim.new_zeros(sim.shape[:2])
    return row_bias, column_lse(sim, row_bias, scale)


def inverted_softmax(sim: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of Smith et al.'s inverted softmax: S_ij / T - logsumexp_k(bank_kj / T) (k over bank queries)."""
    return sim / temperature - torch.logsumexp(bank / temperature, dim=0)


def qb_norm(sim: torch.Tensor, bank: torch.Tensor, temperature: float, k: int = 1) -> torch.Tensor:
    """QB-Norm's dynamic inverted softmax (Bogolin et al.): a test query whose top-1 gallery item is in the
    activation set (the items in some bank query's top-k) gets the inverted-softmax scores (log domain),
    the others keep their raw similarities."""
    active = torch.zeros(bank.shape[1], dtype=torch.bool, device=bank.device)
    active[bank.topk(k, dim=1).indices.flatten()] = True
    normed = inverted_softmax(sim, bank, temperature)
    use = active[sim.argmax(dim=1)]
    return torch.where(use[:, None], normed, sim)


def dual_softmax(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """DSL (Cheng et al.): S_ij * softmax over queries i of (S / T), column by column."""
    return sim * torch.softmax(sim / temperature, dim=0)


def nnn(sim: torch.Tensor, bank: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """NNN (Chowdhury et al.): S_ij - alpha * mean of the k largest bank similarities of gallery item j."""
    return sim - alpha * bank.topk(k, dim=0).values.mean(0)


# ---- entropic OT between point clouds -------------------------------------------------------------


def point_cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """C_ij = |x_i - y_j|^p (p = 2: squared Euclidean, POT's ot.dist default) for x [B, N, d], y [B, M, d]."""
    if p == 2:
        return ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return torch.cdist(x, y, p=2) ** p


def entropic_ot(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """OT_eps = <a, f - eps log a> + <b, g - eps log b> = <P, C> + eps KL(P | a x b) at the fixed point
    (GeomLoss's convention); [B]."""
    B, N, M = C.shape
    n = torch.full((B,), N, dtype=torch.long, device=C.device)
    m = torch.full((B,), M, dtype=torch.long, device=C.device)
    f, g, _, _ = sinkhorn(C, a, b, n, m, [], eps, n_iters, -1.0, False)
    return (a * (f - eps * a.log())).sum(-1) + (b * (g - eps * b.log())).sum(-1)
