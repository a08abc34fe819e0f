r"""Optimal transport: batched log-domain Sinkhorn, UCoFiA's similarity normalisation and its peers,
entropic OT between point clouds.

Conventions (POT's ``ot.bregman.sinkhorn_log``, so that potentials compare one to one):

* cost ``C [B, N, M]``; ``scores=True`` means the input holds scores ``S = -C`` (similarities); no negated
  copy is made.
* plan ``P_ij = exp((f_i + g_j - C_ij) / eps)``: the potentials absorb the marginals, ``f = eps * log_u``
  and ``g = eps * log_v`` of POT's ``log=True`` output.
* an iteration updates g then f (``g = eps log b - eps LSE_i((f_i - C_ij) / eps)``, then the same for f),
  from f = g = 0, as POT does.
* marginal error: the L1 violation of the column marginal, ``sum_j |sum_i P_ij - b_j|`` (the rows are
  exact after the f update). POT's ``err`` is the L2 norm of the same vector.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from .ops.ot import envelope_grad_cost
from .reference import ot as _ref

_GRADS = ("envelope", "implicit", "unrolled")


class SinkhornOutput(NamedTuple):
    f: torch.Tensor  # [B, N] row potentials (0 on padding)
    g: torch.Tensor  # [B, M] column potentials (0 on padding)
    plan: torch.Tensor | None  # [B, N, M] when return_plan, else None
    n_iters: torch.Tensor  # [B] int64, iterations each problem ran
    err: torch.Tensor  # [B] L1 column-marginal error of the returned potentials at eps


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor of shape [B, N, M], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sizes(sizes, B: int, full: int, name: str, device) -> torch.Tensor:
    if sizes is None:
        return torch.full((B,), full, dtype=torch.long, device=device)
    sizes = torch.as_tensor(sizes, device=device)
    if sizes.dtype not in (torch.int64, torch.int32) or tuple(sizes.shape) != (B,):
        raise ValueError(f"{name} must be an int64 or int32 tensor of shape [B] = [{B}], got "
                         f"{sizes.dtype} {list(sizes.shape)}")
    return sizes.long()


def _marginal(w, sizes: torch.Tensor, B: int, K: int, like: torch.Tensor, name: str) -> torch.Tensor:
    valid = torch.arange(K, device=like.device) < sizes[:, None]
    if w is None:
        return torch.where(valid, 1.0 / sizes.clamp_min(1)[:, None].to(like.dtype), 0).to(like.dtype)
    if w.dim() == 1:
        w = w.expand(B, -1)
    if tuple(w.shape) != (B, K):
        raise ValueError(f"{name} must have shape [B, {'N' if name == 'a' else 'M'}] = [{B}, {K}] (or [{K}]), "
                         f"got {list(w.shape)}")
    if w.device != like.device:
        raise ValueError(f"{name} must be on the device of the cost ({like.device}), got {w.device}")
    w = torch.where(valid, w.to(like.dtype), 0)
    if not torch.compiler.is_compiling() and bool((w < 0).any() | ~torch.isfinite(w).all()):
        raise ValueError(f"{name} must hold finite non-negative weights")
    return w


def _check_mass(a: torch.Tensor, b: torch.Tensor, ns: torch.Tensor, ms: torch.Tensor) -> None:
    """Equal masses in every non-empty problem (one host read before the loop)."""
    if torch.compiler.is_compiling():
        return
    ma, mb = a.sum(-1), b.sum(-1)
    tol = 1e-4 if a.dtype == torch.float32 else 1e-10
    bad = ((ma - mb).abs() > tol * torch.maximum(ma, mb).clamp_min(1)) & (ns > 0) & (ms > 0)
    if bool(bad.any()):
        raise ValueError("a and b must have the same total mass in every problem, got sums "
                         f"{ma.tolist()[:8]} and {mb.tolist()[:8]}")


def eps_schedule(cost: torch.Tensor, eps: float, scaling: float | None, scores: bool) -> list[float]:
    """Epsilon scaling: eps_t = R * scaling^t while above eps, R the largest cost range of the batch
    (one host read before the loop). Each value runs one iteration, warm-starting the next."""
    if scaling is None:
        return []
    if not 0 < scaling < 1:
        raise ValueError(f"eps_scaling must lie in (0, 1), got {scaling}")
    if cost.numel() == 0:
        return []
    finite = cost[torch.isfinite(cost)]
    R = float(finite.max() - finite.min()) if finite.numel() else 0.0
    out = []
    e = R
    while e > eps and len(out) < 10_000:
        out.append(e)
        e *= scaling
    return out


class _Implicit(torch.autograd.Function):
    """Potentials from the op; backward by implicit differentiation of the fixed point.

    At the fixed point df = -R dg + (R o dC) 1 and dg = -S^T df + (S o dC)^T 1, with R = P / a (rows sum to
    1) and S = P / b (columns sum to 1). The system A = [[I, R], [S^T, I]] is singular along the gauge
    (f + c, g - c); the upstream gradient is projected off it, and A^T w = (grad_f, grad_g) is solved
    densely with a rank-one term that fixes the gauge: dC_ij = u_i R_ij + v_j S_ij. Exact for every
    gauge-invariant functional (plan, value, f_i + g_j, f_i - f_k); O((N + M)^3) per problem.
    """

    @staticmethod
    def forward(ctx, cost, a, b, n_sizes, m_sizes, schedule, eps, n_iters, tol, scores, op):
        f, g, iters, err = op(cost, a, b, n_sizes, m_sizes, schedule, eps, n_iters, tol, scores)
        ctx.eps, ctx.scores = eps, scores
        ctx.save_for_backward(cost, a, b, f, g, n_sizes, m_sizes)
        ctx.mark_non_differentiable(iters, err)
        return f, g, iters, err

    @staticmethod
    def backward(ctx, grad_f, grad_g, _gi, _ge):
        cost, a, b, f, g, n_sizes, m_sizes = ctx.saved_tensors
        return (implicit_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, ctx.eps, ctx.scores),
                None, None, None, None, None, None, None, None, None, None)


def implicit_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, eps, scores):
    B, N, M = cost.shape
    rows = torch.arange(N, device=cost.device) < n_sizes[:, None]
    cols = torch.arange(M, device=cost.device) < m_sizes[:, None]
    P = _ref.plan(cost, f, g, eps, n_sizes, m_sizes, scores)
    R = torch.where((rows & (a > 0))[:, :, None], P / a[:, :, None], 0)
    S = torch.where((cols & (b > 0))[:, None, :], P / b[:, None, :], 0)
    gf = torch.where(rows, grad_f, 0)
    gg = torch.where(cols, grad_g, 0)
    n, m = rows.sum(-1, keepdim=True).to(cost.dtype), cols.sum(-1, keepdim=True).to(cost.dtype)
    c = (gf.sum(-1, keepdim=True) - gg.sum(-1, keepdim=True)) / (n + m).clamp_min(1)
    rhs = torch.cat([torch.where(rows, gf - c, 0), torch.where(cols, gg + c, 0)], -1)
    eye = torch.eye(N + M, dtype=cost.dtype, device=cost.device).expand(B, -1, -1)
    At = eye + torch.cat([torch.cat([torch.zeros_like(R), S], -1),
                          torch.cat([R.transpose(1, 2), torch.zeros(B, M, M, dtype=cost.dtype, device=cost.device)],
                                    -1)], 1)
    left = torch.cat([rows.to(cost.dtype), -cols.to(cost.dtype)], -1)  # (1, -1): A's null vector
    right = torch.cat([-a * rows, b * cols], -1)  # (-a, b): A^T's null vector
    w = torch.linalg.solve(At + left[:, :, None] * right[:, None, :], rhs)
    u, v = w[:, :N], w[:, N:]
    out = u[:, :, None] * R + v[:, None, :] * S
    return -out if scores else out


def sinkhorn(
    cost_or_scores: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    n_iters: int | None = None,
    tol: float | None = None,
    log_domain: bool = True,
    return_plan: bool = False,
    scores: bool = False,
    n_sizes: torch.Tensor | None = None,
    m_sizes: torch.Tensor | None = None,
    eps_scaling: float | None = None,
    grad: str = "envelope",
    backend: str = "auto",
) -> SinkhornOutput:
    r"""Batched entropic OT by log-domain Sinkhorn: potentials f [B, N], g [B, M] of
    ``min_P <P, C> + eps sum P (log P - 1)`` s.t. ``P 1 = a``, ``P^T 1 = b``, with
    ``P_ij = exp((f_i + g_j - C_ij) / eps)`` (POT's sinkhorn_log convention; see the module docstring).

    Args:
        cost_or_scores: [B, N, M] (or [N, M], treated as B = 1) costs, or scores when ``scores=True``
            (C = -scores). float32/float64; fp16/bf16 are converted to float32.
        a, b: marginals [B, N] / [B, M] (or shared [N] / [M]), non-negative, same total mass per problem;
            default uniform over each problem's (ragged) size.
        eps: entropic regularisation (> 0), in cost units.
        n_iters: most iterations (epsilon-scaling ones included); default 1000.
        tol: stop a problem once its L1 column-marginal error is <= tol, checked on the same pass that
            computes the next g (no extra pass, no host sync); default 1e-6 when n_iters is None, else
            no check (fixed n_iters, as POT with stopThr=0).
        log_domain: False runs the classical u = a / (K v) iterations (torch backend, no ragged, no
            scaling): it underflows at small eps, as POT's ot.sinkhorn; kept for comparison.
        return_plan: also return P [B, N, M] (0 on padding).
        n_sizes, m_sizes: [B] int per-problem sizes (ragged batch): problem p is the top-left
            n_sizes[p] x m_sizes[p] block; padding is never read by the native kernel.
        eps_scaling: factor q in (0, 1): iterations first run at R, R q, R q^2, ... > eps (R the largest
            cost range), warm-starting each from the last, then at eps.
        grad: ``"envelope"`` (default): backward maps (grad_f, grad_g) to
            dC = P (grad_f / a + grad_g / b) / 2, exact (Danskin) for the dual value <a, f> + <b, g>
            whose gradient is the plan, and for sinkhorn_distance; ``"implicit"``: implicit
            differentiation of the fixed point (exact for gauge-invariant functionals, dense solve per
            problem, small problems); ``"unrolled"``: autograd through the iterations of the PyTorch
            reference (backend "torch"). No gradient flows to a and b.
        backend: "auto" | "native" | "triton" | "torch".

    Returns:
        SinkhornOutput(f, g, plan, n_iters [B] int64, err [B]).

    Raises:
        ValueError: bad shapes, eps <= 0, negative or unequal-mass marginals, NaN cost, bad sizes.
    """
    x = cost_or_scores
    squeeze = x.dim() == 2
    if squeeze:
        x = x[None]
    x = _as_batch(x, "cost_or_scores")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite value > 0, got {eps}")
    if grad not in _GRADS:
        raise ValueError(f"grad must be one of {_GRADS}, got {grad!r}")
    if n_iters is None:
        n_iters, tol = 1000, (1e-6 if tol is None else tol)
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    tol_v = -1.0 if tol is None else float(tol)
    B, N, M = x.shape
    ns = _sizes(n_sizes, B, N, "n_sizes", x.device)
    ms = _sizes(m_sizes, B, M, "m_sizes", x.device)
    if not torch.compiler.is_compiling() and bool(((ns < 0) | (ns > N) | (ms < 0) | (ms > M)).any()):
        raise ValueError(f"n_sizes must lie in [0, {N}] and m_sizes in [0, {M}]")
    aw = _marginal(a, ns, B, N, x, "a")
    bw = _marginal(b, ms, B, M, x, "b")
    _check_mass(aw, bw, ns, ms)
    if not log_domain:
        if n_sizes is not None or m_sizes is not None or eps_scaling is not None or backend not in ("auto", "torch"):
            raise ValueError("log_domain=False (the classical exp-domain iterations) runs on backend='torch' "
                             "without ragged sizes or eps_scaling")
        f, g = _ref.sinkhorn_exp(-x if scores else x, aw, bw, eps, n_iters)
        iters = torch.full((B,), n_iters, dtype=torch.long, device=x.device)
        err = (torch.exp((f[:, :, None] + g[:, None, :] - (-x if scores else x)) / eps).sum(1) - bw).abs().sum(-1)
        return _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze)
    schedule = eps_schedule(-x if scores else x, eps, eps_scaling, False)
    if grad == "unrolled":
        if backend not in ("auto", "torch"):
            raise ValueError("grad='unrolled' differentiates the PyTorch reference: use backend='torch' or 'auto'")
        be = "torch"
    else:
        be = _backend.resolve(backend, x.device, "alignops.ot.sinkhorn", native_cuda=False)
    if be == "torch":
        if bool(torch.isnan(x).any()):
            raise ValueError("cost contains NaN")
        f, g, iters, err = _ref.sinkhorn(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores)
        if grad == "envelope" and x.requires_grad:
            f, g = _envelope_reattach(x, aw, bw, f.detach(), g.detach(), ns, ms, eps, scores)
        elif grad == "implicit" and x.requires_grad:
            f, g, iters, err = _Implicit.apply(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores,
                                               lambda *args: tuple(t.detach() for t in _ref.sinkhorn(*args)))
    else:
        op = torch.ops.alignops.sinkhorn if be == "native" else torch.ops.alignops.sinkhorn_triton
        if grad == "implicit":
            f, g, iters, err = _Implicit.apply(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores, op)
        else:
            f, g, iters, err = op(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores)
    return _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze)


class _Envelope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost, a, b, f, g, n_sizes, m_sizes, eps, scores):
        ctx.eps, ctx.scores = eps, scores
        ctx.save_for_backward(cost, a, b, f, g, n_sizes, m_sizes)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        cost, a, b, f, g, n_sizes, m_sizes = ctx.saved_tensors
        return (envelope_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, ctx.eps, ctx.scores),
                None, None, None, None, None, None, None, None)


def _envelope_reattach(x, a, b, f, g, ns, ms, eps, scores):
    """The torch backend's potentials with the envelope backward of the native op."""
    return _Envelope.apply(x, a, b, f, g, ns, ms, eps, scores)


def _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze):
    P = _ref.plan(x, f, g, eps, ns, ms, scores) if return_plan else None
    if squeeze:
        f, g, iters, err = f[0], g[0], iters[0], err[0]
        P = P[0] if P is not None else None
    return SinkhornOutput(f, g, P, iters, err)
