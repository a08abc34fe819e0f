r"""Sinkhorn-Newton steps on the entropic OT dual (Brauer, Clason, Lorenz and Wirth 2017), used by
:func:`alignops.ot.sinkhorn` (``newton_steps=``) to finish problems that Sinkhorn converges to slowly.

Why: at small eps relative to the costs (eps = 1e-3 on costs over [0, 1): C / eps up to 1000) Sinkhorn's
contraction is so weak that no epsilon-scaling schedule brings the marginal error to 1e-4 in 300
iterations, while Newton's method on the dual converges quadratically once the scaled iterations have
brought the potentials close (3-6 steps from 1e-2 to below 1e-6 on 64 x 64 and 256 x 256 problems).

The dual ``D(f, g) = <a, f> + <b, g> - eps sum_ij P_ij``, ``P_ij = exp((f_i + g_j - C_ij) / eps)``, has
gradient ``(a - r, b - c)`` (r = P 1, c = P^T 1) and Hessian ``-(1/eps) [[diag r, P], [P^T, diag c]]``.
The Newton direction solves ``[[diag r, P], [P^T, diag c]] (df, dg) = eps (a - r, b - c)``; the larger
side is eliminated (``df = (eps (a - r) - P dg) / r``), leaving the Schur complement
``S = diag c - P^T diag(1/r) P`` on the smaller side, a dense graph Laplacian (positive semi-definite; its
diagonal is summed from the off-diagonal weights, without cancellation) with the gauge
``(f + t, g - t)`` as its null vector, which a rank-one term ``mean(diag S) 1 1^T`` removes (the right-hand
side is orthogonal to 1 when the masses agree, and is projected onto 1's complement so that the rounding of
the masses never becomes a step along the gauge). A backtracking line search on D (Armijo up to D's own
rounding, halving up to 2^-30) keeps every step an ascent step; a step whose potentials overflow the output
dtype is dropped; an exact row update (the f half-step of Sinkhorn) follows, so the rows stay exact and the
error is the column violation, as for the Sinkhorn iterations.

Everything runs in float64 on chunks of the batch, whatever the cost dtype: a chunk's plan takes an
eighth of the cost matrix's bytes (at least 2 MiB, or one problem), and a step holds a few such buffers.
A step costs O(N M min(N, M)) flops, three passes of exp over the plan when the full step is accepted
(the plan, the trial point, the row update), and a dense solve that limits it to min(N, M) <= 4096. Each
step and line-search trial reads one flag from the device (an early exit), unlike the Sinkhorn loop,
which reads none. Problems already within tol, and chunks holding none other, are not touched.
"""

from __future__ import annotations

import math

import torch

from .._errors import AlignopsError
from ..reference import ot as _ref

MAX_SIDE = 4096
_MIN_CHUNK_BYTES = 1 << 21
_ARMIJO = 1e-4
_HALVINGS = 30
_RIDGE = 1e-10  # least Levenberg-Marquardt ridge, relative to the mean diagonal of S


def check_newton(N: int, M: int) -> None:
    if min(N, M) > MAX_SIDE:
        raise AlignopsError(
            f"newton_steps solves a dense min(N, M) x min(N, M) system per problem; min(N, M) must "
            f"be <= {MAX_SIDE}, got {min(N, M)}: use more Sinkhorn iterations instead"
        )


def _plan(C, f, g, eps):
    # In place after the first sum: one plan-sized buffer. C holds +inf outside each problem's block.
    Z = f[:, :, None] + g[:, None, :]
    return Z.sub_(C).div_(eps).exp_()


def _row_update(C, log_a, g, rows, eps):
    Z = (g[:, None, :] - C).div_(eps)
    return torch.where(rows, eps * (log_a - torch.logsumexp(Z, dim=2)), 0)


def _column_error(C, b, f, g, cols, eps):
    return torch.where(cols, _plan(C, f, g, eps).sum(1) - b, 0).abs().sum(-1)


def _direction(P, r, c, a, b, rows, cols, eps, ridge):
    """The Newton direction (df, dg), eliminating the rows (N >= M is the caller's orientation). P is
    overwritten (scaled by 1 / sqrt(r) per row) to keep one plan-sized buffer."""
    r_safe = torch.where(rows & (r > 0), r, 1)
    rhs_f = torch.where(rows, eps * (a - r), 0)
    rhs_g = torch.where(cols, eps * (b - c), 0)
    root = r_safe.sqrt()
    Pr = P.div_(root[:, :, None])  # diag(1/sqrt(r)) P
    # S = diag(c) - W with W = P^T diag(1/r) P, whose rows sum to c: S is the Laplacian of W's off-diagonal
    # weights. Its diagonal is summed from those (positive) weights, not taken as c - W_jj, which cancels
    # catastrophically when the plan is nearly a permutation (eps << costs) and breaks the factorisation.
    S = Pr.transpose(1, 2) @ Pr
    S.diagonal(dim1=1, dim2=2).zero_()
    deg = torch.where(cols, S.sum(-1), 0)
    colf = cols.to(P.dtype)
    # the mean diagonal over the problem's own columns (padding excluded) scales the gauge term and ridge
    scale = (deg.sum(-1) / colf.sum(-1).clamp_min(1)).clamp_min(torch.finfo(P.dtype).tiny)
    S.neg_().diagonal(dim1=1, dim2=2).copy_(torch.where(cols, deg, scale[:, None]))  # padding: scale * I, rhs 0
    S.baddbmm_((scale[:, None] * colf)[:, :, None], colf[:, None, :])  # the gauge: + scale 1 1^T
    # A plan that is nearly a permutation splits into components joined by weights ~1e-19: S has
    # near-zero eigenvalues besides the gauge. A Levenberg-Marquardt ridge proportional to the current
    # marginal error bounds the step along them and vanishes as the error does (quadratic convergence kept).
    S.diagonal(dim1=1, dim2=2).add_((ridge * scale)[:, None])
    rhs = rhs_g - (Pr.transpose(1, 2) @ (rhs_f / root)[:, :, None])[..., 0]
    # 1^T rhs = eps (sum b - sum a) is 0 only up to the rounding of the masses (fp32 marginals: ~1e-8); the
    # gauge term scaled by a degree that underflows (M = 1, or a plan that is a permutation in float64) would
    # turn that rounding into a step of 1e296 along the gauge, which the line search accepts and fp32 turns
    # into f = -inf, g = +inf. Projected off the gauge, the gauge part of the step is exactly 0.
    rhs = torch.where(cols, rhs - (rhs.sum(-1, keepdim=True) / colf.sum(-1, keepdim=True).clamp_min(1)), 0)
    L, info = torch.linalg.cholesky_ex(S)
    dg = torch.cholesky_solve(rhs[:, :, None], L)[..., 0]
    dg = torch.where(cols & (info == 0)[:, None], dg, 0)  # a failed factorisation takes no step
    df = torch.where(rows, (rhs_f - root * (Pr @ dg[:, :, None])[..., 0]) / r_safe, 0)
    df = torch.where((info == 0)[:, None], df, 0)
    return df, dg, rhs_f, rhs_g


def _polish_chunk(C, a, b, f, g, ns, ms, eps, steps, tol, todo):
    B, N, M = C.shape
    rows, cols = _ref.masks(ns, ms, N, M)
    log_a = torch.where(rows, a.log(), -math.inf)
    # <a, f> + <b, g> over the mass-carrying entries: a zero weight has a -inf potential (0 * -inf = NaN)
    mass_rows, mass_cols = rows & (a > 0), cols & (b > 0)

    def linear(f, g):
        return torch.where(mass_rows, a * f, 0).sum(-1) + torch.where(mass_cols, b * g, 0).sum(-1)

    taken = torch.zeros(B, dtype=torch.long, device=C.device)
    active = (ns > 0) & (ms > 0) & todo
    for k in range(steps + 1):
        # One plan per step serves the error check, the direction and the dual value at t = 0.
        P = _plan(C, f, g, eps)
        r, c = P.sum(2), P.sum(1)
        # the larger of the two L1 violations: in the flipped orientation the exact side is the other one
        e = torch.maximum(torch.where(rows, r - a, 0).abs().sum(-1), torch.where(cols, c - b, 0).abs().sum(-1))
        active = active & (e > tol)
        if k == steps or not bool(active.any()):
            break
        df, dg, rf, rg = _direction(P, r, c, a, b, rows, cols, eps, e.clamp(_RIDGE, 1.0))
        D0 = linear(f, g) - eps * r.sum(-1)
        # the rounding of D itself: near the fixed point the gain t * slope falls below it and the comparison
        # with D0 is noise (which, without this slack, halves a good step or rejects it)
        noise = (
            64
            * torch.finfo(C.dtype).eps
            * (
                torch.where(mass_rows, (a * f).abs(), 0).sum(-1)
                + torch.where(mass_cols, (b * g).abs(), 0).sum(-1)
                + eps * r.sum(-1)
            )
        )
        del P
        slope = ((rf * df).sum(-1) + (rg * dg).sum(-1)) / eps  # <grad D, d> >= 0
        t = torch.ones(B, dtype=C.dtype, device=C.device)
        ok = torch.zeros(B, dtype=torch.bool, device=C.device)
        for _ in range(_HALVINGS + 1):
            ft, gt = f + t[:, None] * df, g + t[:, None] * dg
            trial = linear(ft, gt) - eps * _plan(C, ft, gt, eps).sum((1, 2))
            ok = ok | (trial >= D0 + _ARMIJO * t * slope - noise)
            if bool((ok | ~active).all()):
                break
            t = torch.where(ok, t, t / 2)
        step = active & ok & (slope > 0)
        g = torch.where(step[:, None], g + t[:, None] * dg, g)
        f = torch.where(step[:, None], _row_update(C, log_a, g, rows, eps), f)
        taken = taken + step.long()
        active = step  # a problem that could not step has stalled: it stops
    return f, g, taken


def _polish(cost, a, b, f, g, ns, ms, eps, scores, steps, tol, todo, out_dtype):
    """newton_polish on one chunk of the batch (float64 inside)."""
    N, M = cost.shape[1], cost.shape[2]
    C = _ref.masked_cost(cost, ns, ms, scores).double()
    a, b, f, g = a.double(), b.double(), f.double(), g.double()
    # The float64 iterate stops at tol / 2: rounding the potentials to out_dtype moves the error, and the
    # error reported is that of the rounded potentials (in fp32 with large potentials, e.g. costs offset by
    # 10, rounding alone can leave it above tol: the figure says so).
    tol = tol / 2 if tol > 0 else tol
    if M > N:  # eliminate the larger side: the dense solve is min(N, M) wide
        g, f, taken = _polish_chunk(C.transpose(1, 2), b, a, g, f, ms, ns, eps, steps, tol, todo)
        # the eliminated side was g: make the rows exact again
        rows, _ = _ref.masks(ns, ms, N, M)
        f = torch.where((taken > 0)[:, None], _row_update(C, torch.where(rows, a.log(), -math.inf), g, rows, eps), f)
    else:
        f, g, taken = _polish_chunk(C, a, b, f, g, ns, ms, eps, steps, tol, todo)
    f, g = f.to(out_dtype), g.to(out_dtype)
    _, cols = _ref.masks(ns, ms, N, M)
    # the error of the potentials as returned (rounded to out_dtype), not of the float64 iterate
    return f, g, taken, _column_error(C, b, f.double(), g.double(), cols, eps).to(out_dtype)


def newton_polish(
    cost, a, b, f, g, n_sizes, m_sizes, eps: float, scores: bool, steps: int, tol: float, err: torch.Tensor
):
    """Up to ``steps`` Sinkhorn-Newton steps on each problem whose column error ``err`` (the Sinkhorn
    iterations' figure) exceeds ``tol`` (on all of them when tol < 0). Returns (f, g) in f's dtype, the
    steps each problem took [B] int64 and the column error [B]: recomputed, for the returned potentials,
    where a step was taken, ``err`` unchanged elsewhere."""
    B, N, M = cost.shape
    check_newton(N, M)
    taken = torch.zeros(B, dtype=torch.long, device=cost.device)
    todo = err > tol if tol >= 0 else torch.ones_like(err, dtype=torch.bool)
    if B == 0 or not bool(todo.any()):
        return f, g, taken, err
    # A chunk's float64 plan takes an eighth of the cost's bytes (a step holds a few such buffers), at
    # least _MIN_CHUNK_BYTES so that small batches are not cut into tiny pieces.
    budget = max(_MIN_CHUNK_BYTES, cost.numel() * cost.element_size() // 8)
    chunk = max(1, budget // max(1, 8 * N * M))
    f, g, err = f.clone(), g.clone(), err.clone()
    for s in range(0, B, chunk):
        part = slice(s, s + chunk)
        if not bool(todo[part].any()):
            continue
        fp, gp, tp, ep = _polish(
            cost[part],
            a[part],
            b[part],
            f[part],
            g[part],
            n_sizes[part],
            m_sizes[part],
            eps,
            scores,
            steps,
            tol,
            todo[part],
            f.dtype,
        )
        # a step whose rounded potentials give a non-finite error (f or g overflowing out_dtype) is not taken:
        # Sinkhorn's finite potentials stay
        stepped = (tp > 0) & torch.isfinite(ep)
        tp = torch.where(stepped, tp, 0)
        f[part] = torch.where(stepped[:, None], fp, f[part])
        g[part] = torch.where(stepped[:, None], gp, g[part])
        err[part] = torch.where(stepped, ep, err[part])
        taken[part] = tp
    return f, g, taken, err
