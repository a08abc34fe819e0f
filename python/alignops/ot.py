r"""Optimal transport: batched log-domain Sinkhorn, UCoFiA's similarity normalisation and its peers,
entropic OT between point clouds; the 1-D, sliced and Gaussian Wasserstein distances of
:mod:`alignops.wasserstein` are re-exported here.

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
from ._checks import check_finite, check_positive
from ._errors import AlignopsError
from ._sinkhorn_newton import check_newton, newton_polish
from .ops.ot import envelope_grad_cost
from .reference import ot as _ref
from .wasserstein import gaussian_w2, sliced_wasserstein, wasserstein_1d  # noqa: F401  (alignops.ot.* as well)

_GRADS = ("envelope", "implicit", "unrolled")
# op names per backend (torch.ops.alignops.<name>), looked up at call time: the Triton ops exist only where
# the triton package is installed
_OPS = {"sinkhorn": {"native": "sinkhorn", "triton": "sinkhorn_triton"},
        "sinkhorn_points": {"native": "sinkhorn_points", "triton": "sinkhorn_points_triton"}}


class SinkhornOutput(NamedTuple):
    f: torch.Tensor  # [B, N] row potentials (0 on padding)
    g: torch.Tensor  # [B, M] column potentials (0 on padding)
    plan: torch.Tensor | None  # [B, N, M] when return_plan, else None
    n_iters: torch.Tensor  # [B] int64, iterations each problem ran
    err: torch.Tensor  # [B] L1 column-marginal error of the returned potentials at eps


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 3:
        raise AlignopsError(f"{name} must be a 3-D tensor of shape [B, N, M], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AlignopsError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sizes(sizes, B: int, full: int, name: str, device) -> torch.Tensor:
    if sizes is None:
        return torch.full((B,), full, dtype=torch.long, device=device)
    sizes = _backend.to_device(torch.as_tensor(sizes), device)
    if sizes.dtype not in (torch.int64, torch.int32) or tuple(sizes.shape) != (B,):
        raise AlignopsError(f"{name} must be an int64 or int32 tensor of shape [B] = [{B}], got "
                         f"{sizes.dtype} {list(sizes.shape)}")
    return sizes.long()


def _marginal(w, sizes: torch.Tensor, B: int, K: int, like: torch.Tensor, name: str,
              check_values: bool = True) -> torch.Tensor:
    valid = torch.arange(K, device=like.device) < sizes[:, None]
    if w is None:
        return torch.where(valid, 1.0 / sizes.clamp_min(1)[:, None].to(like.dtype), 0).to(like.dtype)
    if w.dim() == 1:
        w = w.expand(B, -1)
    if tuple(w.shape) != (B, K):
        raise AlignopsError(f"{name} must have shape [B, {'N' if name == 'a' else 'M'}] = [{B}, {K}] (or [{K}]), "
                         f"got {list(w.shape)}")
    if w.device != like.device:
        raise AlignopsError(f"{name} must be on the device of the cost ({like.device}), got {w.device}")
    w = torch.where(valid, w.to(like.dtype), 0)
    if check_values and not torch.compiler.is_compiling() and bool((w < 0).any() | ~torch.isfinite(w).all()):
        raise AlignopsError(f"{name} must hold finite non-negative weights")
    return w


def _check_mass(a: torch.Tensor, b: torch.Tensor, ns: torch.Tensor, ms: torch.Tensor) -> None:
    """Equal, positive masses in every non-empty problem (one host read before the loop)."""
    if torch.compiler.is_compiling():
        return
    ma, mb = a.sum(-1), b.sum(-1)
    tol = 1e-4 if a.dtype == torch.float32 else 1e-10
    live = (ns > 0) & (ms > 0)
    bad = ((ma - mb).abs() > tol * torch.maximum(ma, mb).clamp_min(1)) & live
    empty = ((ma <= 0) | (mb <= 0)) & live  # equal, but no plan carries zero mass: f = g = log 0
    if bool((bad | empty).any()):
        what = "the same total mass" if bool(bad.any()) else "a positive total mass"
        raise AlignopsError(f"a and b must have {what} in every problem, got sums "
                         f"{ma.tolist()[:8]} and {mb.tolist()[:8]}")


def eps_schedule(cost: torch.Tensor, eps: float, scaling: float | None, n_sizes: torch.Tensor | None = None,
                 m_sizes: torch.Tensor | None = None) -> list[float]:
    """Epsilon scaling: eps_t = R * scaling^t while above eps, R the largest cost range of the batch
    (one host read before the loop; padding of a ragged batch excluded). Each value runs one iteration,
    warm-starting the next."""
    if scaling is None or cost.numel() == 0:
        return _geometric_schedule(0.0, eps, scaling)
    return _geometric_schedule(_cost_range(cost.detach(), n_sizes, m_sizes), eps, scaling)


def _geometric_schedule(R: float, eps: float, scaling: float | None) -> list[float]:
    """R, R q, R q^2, ... while above eps (none for scaling None or a non-finite R)."""
    if scaling is None:
        return []
    if not 0 < scaling < 1:
        raise AlignopsError(f"eps_scaling must lie in (0, 1), got {scaling}")
    out = []
    e = R if math.isfinite(R) else 0.0
    while e > eps and len(out) < 10_000:
        out.append(e)
        e *= scaling
    return out


def _not_nan(value: float | None, name: str) -> None:
    if value is not None and math.isnan(float(value)):
        raise AlignopsError(f"{name} must not be NaN, got {value}")


def _tolerance(tol: float | None) -> float:
    """The kernels' tol: -1 (never stop early) for None; NaN is refused (inf stops at the first check)."""
    if tol is None:
        return -1.0
    _not_nan(tol, "tol")
    return float(tol)


def _cost_range(cost: torch.Tensor, n_sizes: torch.Tensor | None, m_sizes: torch.Tensor | None) -> float:
    """max - min of the finite costs inside the problems' blocks (one host read)."""
    B, N, M = cost.shape
    ragged = n_sizes is not None and m_sizes is not None and bool(((n_sizes < N) | (m_sizes < M)).any())
    if not ragged:
        lo, hi = torch.aminmax(cost)  # no copy of the cost
        if math.isfinite(float(hi - lo)):
            return float(hi - lo)
    # Ragged (padding is never read by the solver, so it must not set the schedule either) or +inf costs
    # (forbidden pairs): masked per chunk of problems, so that the temporaries stay at an eighth of the cost.
    ns = n_sizes if n_sizes is not None else torch.full((B,), N, device=cost.device)
    ms = m_sizes if m_sizes is not None else torch.full((B,), M, device=cost.device)
    rows, cols = _ref._masks(ns, ms, N, M)
    lo = torch.full((), math.inf, dtype=cost.dtype, device=cost.device)
    hi = torch.full((), -math.inf, dtype=cost.dtype, device=cost.device)
    step = max(1, B // 8)
    for p in range(0, B, step):
        c = cost[p:p + step]
        valid = rows[p:p + step, :, None] & cols[p:p + step, None, :] & torch.isfinite(c)
        lo = torch.minimum(lo, torch.where(valid, c, math.inf).amin())
        hi = torch.maximum(hi, torch.where(valid, c, -math.inf).amax())
    return float(hi - lo)  # inf when no cost is finite: no schedule


class _Implicit(torch.autograd.Function):
    """Potentials from the op; backward by implicit differentiation of the fixed point.

    At the fixed point df = -R dg + (R o dC) 1 and dg = -S^T df + (S o dC)^T 1, with R = P / a (rows sum to
    1) and S = P / b (columns sum to 1). The system A = [[I, R], [S^T, I]] is singular along the gauge
    (f + c, g - c); the upstream gradient is projected off it, and A^T w = (grad_f, grad_g) is solved
    densely with a rank-one term that fixes the gauge: dC_ij = u_i R_ij + v_j S_ij. Exact for every
    gauge-invariant functional (plan, value, f_i + g_j, f_i - f_k); O((N + M)^3) per problem. The marginals
    enter through eps / a and eps / b: grad_a = eps u / a, grad_b = eps v / b (for a, b kept on the
    simplex, e.g. a = softmax(theta), the only changes the mass check accepts).
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
        grad_cost, grad_a, grad_b = implicit_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, ctx.eps,
                                                       ctx.scores)
        return grad_cost, grad_a, grad_b, None, None, None, None, None, None, None, None


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
    At = eye + torch.cat([torch.cat([torch.zeros(B, N, N, dtype=cost.dtype, device=cost.device), S], -1),
                          torch.cat([R.transpose(1, 2), torch.zeros(B, M, M, dtype=cost.dtype, device=cost.device)],
                                    -1)], 1)
    left = torch.cat([rows.to(cost.dtype), -cols.to(cost.dtype)], -1)  # (1, -1): A's null vector
    right = torch.cat([-a * rows, b * cols], -1)  # (-a, b): A^T's null vector
    w = torch.linalg.solve(At + left[:, :, None] * right[:, None, :], rhs)
    u, v = w[:, :N], w[:, N:]
    out = u[:, :, None] * R + v[:, None, :] * S
    # f = eps log a - eps LSE(...): the marginals enter the fixed point through eps / a and eps / b
    grad_a = torch.where(rows & (a > 0), eps * u / a, 0)
    grad_b = torch.where(cols & (b > 0), eps * v / b, 0)
    return (-out if scores else out), grad_a, grad_b


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
    cost_range: float | None = None,
    newton_steps: int = 0,
    grad: str = "envelope",
    backend: str = "auto",
    check_values: bool = True,
) -> SinkhornOutput:
    r"""Batched entropic OT by log-domain Sinkhorn: potentials f [B, N], g [B, M] of
    ``min_P <P, C> + eps sum P (log P - 1)`` s.t. ``P 1 = a``, ``P^T 1 = b``, with
    ``P_ij = exp((f_i + g_j - C_ij) / eps)`` (POT's sinkhorn_log convention; see the module docstring).

    Args:
        cost_or_scores: [B, N, M] (or [N, M], treated as B = 1) costs, or scores when ``scores=True``
            (C = -scores). float32/float64; fp16/bf16 are converted to float32. A +inf cost (-inf score)
            is a forbidden pair: P_ij = 0 there (the problem must stay feasible: every row and column with
            mass needs an allowed pair); a -inf cost (+inf score) raises, as does NaN.
        a, b: marginals [B, N] / [B, M] (or shared [N] / [M]), non-negative, same positive total mass per
            non-empty problem; default uniform over each problem's (ragged) size.
        eps: entropic regularisation (> 0), in cost units.
        n_iters: most iterations (epsilon-scaling ones included); default 1000.
        tol: stop a problem once its L1 column-marginal error is <= tol, checked on the same pass that
            computes the next g (no extra pass, no host sync) and only after a full (g, f) update at eps,
            as POT checks after its updates (so at least one iteration at eps runs); default 1e-6 when
            n_iters is None, else no check (fixed n_iters, as POT with stopThr=0).
        log_domain: False runs the classical u = a / (K v) iterations (torch backend, no ragged, no
            scaling): it underflows at small eps, as POT's ot.sinkhorn; kept for comparison.
        return_plan: also return P [B, N, M] (0 on padding).
        n_sizes, m_sizes: [B] int per-problem sizes (ragged batch): problem p is the top-left
            n_sizes[p] x m_sizes[p] block; padding is never read by the native kernel.
        eps_scaling: factor q in (0, 1): iterations first run at R, R q, R q^2, ... > eps (R the largest
            cost range), warm-starting each from the last, then at eps.
        cost_range: R of ``eps_scaling``, e.g. a known bound of the costs; by default it is read from the
            cost (max - min of the finite costs inside the problems: one host sync on a GPU).
        newton_steps: the last ``newton_steps`` iterations of the ``n_iters`` budget are Sinkhorn-Newton
            steps (Brauer et al. 2017; see ``alignops._sinkhorn_newton``) for the problems still above
            ``tol`` after the Sinkhorn iterations: quadratic convergence where Sinkhorn crawls (small eps
            relative to the costs; ``eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.9, newton_steps=10``
            reaches the tolerance on costs over [0, 1)). A step is three float64 passes over the plan
            (more when the line search backtracks) and a dense min(N, M)-wide solve per problem
            (min(N, M) <= 4096); ``n_iters`` in the output counts it as one iteration, ``err`` is that of
            the returned (rounded) potentials. 0 (default): Sinkhorn only, POT's iterates.
        grad: ``"envelope"`` (default): backward maps (grad_f, grad_g) to
            dC = P (grad_f / a + grad_g / b) / 2, exact (Danskin) for the dual value <a, f> + <b, g>
            whose gradient is the plan, and for sinkhorn_distance; ``"implicit"``: implicit
            differentiation of the fixed point (exact for gauge-invariant functionals, dense solve per
            problem, small problems; also differentiates a and b); ``"unrolled"``: autograd through the
            iterations of the PyTorch reference (backend "torch", also through a and b). The envelope
            gives no gradient to a and b.
        backend: "auto" | "native" | "triton" | "torch".
        check_values: ``False`` skips the checks that read tensor values on the device (sizes in range,
            marginals finite, non-negative and of equal mass, no NaN cost for the torch backend), so the
            call neither syncs nor breaks CUDA-graph capture (with ``cost_range`` given when
            ``eps_scaling`` is set, sizes and marginals as tensors on the device, ``newton_steps=0``: the
            Newton steps read the device once per step). The native kernel still checks the sizes; the
            Triton kernels would read out of bounds for sizes outside [0, N] / [0, M]; unchecked marginals
            give meaningless potentials.

    Returns:
        SinkhornOutput(f, g, plan, n_iters [B] int64, err [B]).

    Raises:
        ValueError: bad shapes, eps <= 0, negative, zero-mass or unequal-mass marginals, a NaN or -inf cost
            (+inf score), bad sizes.
    """
    x = cost_or_scores
    squeeze = x.dim() == 2
    if squeeze:
        x = x[None]
    x = _as_batch(x, "cost_or_scores")
    check_positive(eps, "eps")
    if grad not in _GRADS:
        raise AlignopsError(f"grad must be one of {_GRADS}, got {grad!r}")
    if n_iters is None:
        n_iters, tol = 1000, (1e-6 if tol is None else tol)
    if n_iters < 0:
        raise AlignopsError(f"n_iters must be >= 0, got {n_iters}")
    tol_v = _tolerance(tol)
    B, N, M = x.shape
    if isinstance(newton_steps, bool) or not (isinstance(newton_steps, int) and 0 <= newton_steps <= n_iters):
        raise AlignopsError(f"newton_steps must be an int in [0, n_iters = {n_iters}], got {newton_steps}")
    if newton_steps:
        check_newton(N, M)
        if grad == "unrolled" or not log_domain:
            raise AlignopsError("newton_steps runs after the log-domain iterations and has no unrolled gradient: "
                             "use grad='envelope' or 'implicit' with log_domain=True")
    ns = _sizes(n_sizes, B, N, "n_sizes", x.device)
    ms = _sizes(m_sizes, B, M, "m_sizes", x.device)
    if check_values and not torch.compiler.is_compiling() and bool(
            ((ns < 0) | (ns > N) | (ms < 0) | (ms > M)).any()):
        raise AlignopsError(f"n_sizes must lie in [0, {N}] and m_sizes in [0, {M}]")
    aw = _marginal(a, ns, B, N, x, "a", check_values)
    bw = _marginal(b, ms, B, M, x, "b", check_values)
    if check_values:
        _check_mass(aw, bw, ns, ms)
    if not log_domain:
        if n_sizes is not None or m_sizes is not None or eps_scaling is not None or backend not in ("auto", "torch"):
            raise AlignopsError("log_domain=False (the classical exp-domain iterations) runs on backend='torch' "
                             "without ragged sizes or eps_scaling")
        if check_values and not torch.compiler.is_compiling():
            _check_cost(x, scores)
        f, g = _ref.sinkhorn_exp(-x if scores else x, aw, bw, eps, n_iters)
        iters = torch.full((B,), n_iters, dtype=torch.long, device=x.device)
        err = (torch.exp((f[:, :, None] + g[:, None, :] - (-x if scores else x)) / eps).sum(1) - bw).abs().sum(-1)
        return _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze)
    _not_nan(cost_range, "cost_range")
    if cost_range is not None and eps_scaling is not None:
        schedule = _geometric_schedule(cost_range, eps, eps_scaling)
    else:
        schedule = eps_schedule(x, eps, eps_scaling, ns, ms)
    if grad == "unrolled":
        if backend not in ("auto", "torch"):
            raise AlignopsError("grad='unrolled' differentiates the PyTorch reference: use backend='torch' or 'auto'")
        be = "torch"
    else:
        be = _backend.resolve(backend, x.device, "alignops.ot.sinkhorn", native_cuda=False)
    if check_values and be != "native" and not torch.compiler.is_compiling():  # the native op scans it itself
        _check_cost(x, scores)
    if grad == "unrolled":
        f, g, iters, err = _ref.sinkhorn(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores)
        return _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze)
    # looked up by name: the Triton op exists only where the triton package is installed
    op = _reference_no_grad if be == "torch" else getattr(torch.ops.alignops, _OPS["sinkhorn"][be])
    if newton_steps:
        op = _with_newton(op, newton_steps)
    if grad == "implicit":
        f, g, iters, err = _Implicit.apply(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores, op)
    else:
        f, g, iters, err = op(x, aw, bw, ns, ms, schedule, eps, n_iters, tol_v, scores)
        if (be == "torch" or newton_steps) and x.requires_grad:  # these potentials carry no graph
            f, g = _Envelope.apply(x, aw, bw, f, g, ns, ms, eps, scores)
    return _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze)


def _check_cost(x: torch.Tensor, scores: bool) -> None:
    """No NaN, and no infinity of the wrong sign: +inf costs (-inf scores) are forbidden pairs, the opposite
    infinity a pair of infinite value that no finite plan has (the native op's messages)."""
    if bool(torch.isnan(x).any()):
        raise AlignopsError("cost contains NaN")
    if bool((x == (math.inf if scores else -math.inf)).any()):
        raise AlignopsError(f"cost contains {'+inf scores' if scores else '-inf costs'}: no finite plan exists "
                         f"({'-inf scores' if scores else '+inf costs'} mark forbidden pairs)")


def _with_newton(op, steps: int):
    """op followed by Sinkhorn-Newton steps: the Sinkhorn iterations get n_iters - steps of the budget."""

    def run(x, a, b, ns, ms, schedule, eps, n_iters, tol, scores):
        with torch.no_grad():  # the polished potentials carry no graph: the callers attach the gradient
            f, g, iters, err = op(x, a, b, ns, ms, schedule, eps, n_iters - steps, tol, scores)
            f, g, taken, err = newton_polish(x, a, b, f, g, ns, ms, eps, scores, steps, tol, err)
        return f, g, iters + taken, err

    return run


def _reference_no_grad(*args):
    """The torch backend for the envelope and implicit gradients: no autograd graph through the iterations."""
    with torch.no_grad():
        return _ref.sinkhorn(*args)


class _Envelope(torch.autograd.Function):
    """The torch backend's potentials with the envelope backward of the native op."""

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


def _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze):
    P = _ref.plan(x, f, g, eps, ns, ms, scores) if return_plan else None
    if squeeze:
        f, g, iters, err = f[0], g[0], iters[0], err[0]
        P = P[0] if P is not None else None
    return SinkhornOutput(f, g, P, iters, err)


# ---- UCoFiA's normalisation and the column normalisers of its peers ---------------------------------


class NormalizeOutput(NamedTuple):
    row_bias: torch.Tensor  # [L, N] log-softmax bias of the rows (this rank's rows when sharded)
    col_bias: torch.Tensor  # [L, M] log-softmax bias of the columns


def _sim_batch(sim: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if sim.dim() not in (2, 3):
        raise AlignopsError(f"{name} must have shape [N, M] or [L, N, M], got {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise AlignopsError(f"{name} must be float32, float64, float16 or bfloat16, got {sim.dtype}")
    x = sim if sim.dtype in (torch.float32, torch.float64) else sim.float()
    return (x[None], True) if x.dim() == 2 else (x, False)


def _normalize_pass(sim, col_bias, scale, row_update, chunk_size, be):
    """(row_bias [L, N], column logsumexp [L, M]) over the rows held here."""
    if be == "native":
        return torch.ops.alignops.sinkhorn_normalize_pass(sim, col_bias, scale, row_update)
    if be == "triton":
        return torch.ops.alignops.sinkhorn_normalize_pass_triton(sim, col_bias, scale, row_update)
    if torch.isnan(sim).any():
        raise AlignopsError("sim contains NaN")
    if (sim == math.inf).any():
        raise AlignopsError("sim contains +inf")
    N = sim.shape[1]
    chunk = N if chunk_size is None else max(1, chunk_size)
    rows, lse = [], None
    for r0 in range(0, max(N, 1), chunk):
        rb, cl = _ref.sinkhorn_normalize_pass(sim[:, r0:r0 + chunk], col_bias, scale, row_update)
        rows.append(rb)
        lse = cl if lse is None else torch.logaddexp(lse, cl)
    return torch.cat(rows, 1), lse


def _merge_lse(lse: torch.Tensor, process_group) -> torch.Tensor:
    """logsumexp over the ranks of per-rank logsumexps (two all-reduces: max, then the shifted sums)."""
    if process_group is None:
        return lse
    import torch.distributed as dist

    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    m = torch.where(torch.isfinite(m), m, 0)
    s = torch.exp(lse - m)
    dist.all_reduce(s, group=process_group)
    return m + s.log()


def _resolve_normalize(backend: str, sim: torch.Tensor, op: str) -> str:
    return _backend.resolve(backend, sim.device, op, native_cuda=False)


def sinkhorn_normalize(sim: torch.Tensor, n_iters: int = 4, *, temperature: float = 1.0,
                       chunk_size: int | None = None, process_group=None, backend: str = "auto") -> NormalizeOutput:
    r"""UCoFiA's Sinkhorn normalisation of a bank similarity matrix, in the log domain.

    UCoFiA (probability domain): ``K = exp(S / T - max)``, ``b = 1 / K.sum(0)``, then ``n_iters`` times
    ``a = 1 / (K b)``, ``b = 1 / (a^T K)``; the biases are ``log_softmax(log a)`` and
    ``log_softmax(log b)``. Here every step is a logsumexp (``log b_j = -LSE_i(S_ij / T + log a_i)``,
    ``log a_i = -LSE_j(S_ij / T + log b_j)``), so logits spread over more than 87 do not underflow, and
    one pass over S per iteration gives both updates: nothing of S's size is written.
    The normalised test scores are ``test_sim / T + col_bias`` per level (UCoFiA averages the levels).

    Args:
        sim: [N, M] or [L, N, M] (L granularity levels) bank-query x gallery similarities. -inf marks a pair
            that never matches; a row or column of only -inf (e.g. padding) carries no mass: its bias is
            -inf and the other biases are those of the matrix without it. NaN and +inf raise (native and
            torch backends).
        n_iters: alternating updates (UCoFiA: 4).
        temperature: S is divided by it.
        chunk_size: rows per step of the torch backend (bounds its [chunk, M] temporaries); the native and
            Triton kernels stream rows without temporaries.
        process_group: sim holds this rank's rows; column statistics are all-reduced (2 all-reduces per
            iteration), so every rank gets the column bias of the whole matrix and the log-softmax of its
            own rows over all rows; identical to one process up to rounding.
        backend: "auto" | "native" | "triton" | "torch".

    Returns:
        NormalizeOutput(row_bias [L, N] (or [N]), col_bias [L, M] (or [M])).
    """
    x, squeeze = _sim_batch(sim, "sim")
    if n_iters < 0:
        raise AlignopsError(f"n_iters must be >= 0, got {n_iters}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise AlignopsError(f"temperature must be a finite value > 0, got {temperature}")
    be = _resolve_normalize(backend, x, "alignops.ot.sinkhorn_normalize")
    L, N, M = x.shape
    scale = 1.0 / temperature
    _, lse = _normalize_pass(x, x.new_zeros(L, M), scale, False, chunk_size, be)
    lb = _column_bias(_merge_lse(lse, process_group))
    la = x.new_zeros(L, N)
    for _ in range(n_iters):
        la, lse = _normalize_pass(x, lb, scale, True, chunk_size, be)
        lb = _column_bias(_merge_lse(lse, process_group))
    row = la - _finite_or_zero(_merge_lse(torch.logsumexp(la, -1), process_group))[:, None]
    col = lb - _finite_or_zero(torch.logsumexp(lb, -1))[:, None]
    return NormalizeOutput(row[0], col[0]) if squeeze else NormalizeOutput(row, col)


def _column_bias(lse: torch.Tensor) -> torch.Tensor:
    """-lse, and -inf (no mass) for a column of only -inf similarities, whose bias would be +inf: the next row
    pass would add it to their -inf (NaN in every row bias)."""
    return torch.where(lse == -math.inf, -math.inf, -lse)


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    # a level with no finite similarity: every bias stays -inf instead of -inf - -inf = NaN
    return torch.where(torch.isfinite(lse), lse, 0)


def bank_column_lse(bank: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None,
                    process_group=None, backend: str = "auto") -> torch.Tensor:
    """``LSE_k(bank_kj / T)`` over the bank queries k (all ranks' rows), [M]: the streaming column
    normaliser behind inverted softmax, QB-Norm and DSL."""
    x, _ = _sim_batch(bank, "bank")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise AlignopsError(f"temperature must be a finite value > 0, got {temperature}")
    if x.shape[0] != 1:
        raise AlignopsError(f"bank must be a 2-D tensor [N_bank, M], got {tuple(bank.shape)}")
    be = _resolve_normalize(backend, x, "alignops.ot.bank_column_lse")
    _, lse = _normalize_pass(x, x.new_zeros(1, x.shape[2]), 1.0 / temperature, False, chunk_size, be)
    return _merge_lse(lse, process_group)[0]


def _check_pair(sim: torch.Tensor, bank: torch.Tensor) -> None:
    if sim.dim() != 2 or bank.dim() != 2 or sim.shape[1] != bank.shape[1]:
        raise AlignopsError(f"sim [Q, M] and bank [N_bank, M] must share the gallery dimension M, got "
                         f"{tuple(sim.shape)} and {tuple(bank.shape)}")


def inverted_softmax(sim: torch.Tensor, bank: torch.Tensor | None = None, *, temperature: float = 1.0,
                     chunk_size: int | None = None, process_group=None, backend: str = "auto") -> torch.Tensor:
    """Smith et al.'s inverted softmax, log domain: ``S_ij / T - LSE_k(bank_kj / T)`` (the bank defaults to
    the test queries themselves). Same ranking per query as the probability form, without overflow."""
    bank = sim if bank is None else bank
    _check_pair(sim, bank)
    lse = bank_column_lse(bank, temperature=temperature, chunk_size=chunk_size, process_group=process_group,
                          backend=backend)
    return sim / temperature - lse


def qb_norm(sim: torch.Tensor, bank: torch.Tensor, *, temperature: float = 1.0, k: int = 1,
            chunk_size: int | None = None, process_group=None, backend: str = "auto") -> torch.Tensor:
    """QB-Norm with the dynamic inverted softmax (Bogolin et al.): a test query whose top-1 gallery item is
    in the activation set (items in some bank query's top-k) gets the inverted softmax (log domain), the
    others keep their raw similarities. The activation set is merged over ranks (all-reduce MAX)."""
    _check_pair(sim, bank)
    if not 1 <= k <= bank.shape[1]:
        raise AlignopsError(f"k must lie in [1, M = {bank.shape[1]}], got {k}")
    normed = inverted_softmax(sim, bank, temperature=temperature, chunk_size=chunk_size,
                              process_group=process_group, backend=backend)
    active = torch.zeros(bank.shape[1], dtype=torch.int32, device=bank.device)
    active[bank.topk(k, dim=1).indices.flatten()] = 1
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(active, op=dist.ReduceOp.MAX, group=process_group)
    use = active.bool()[sim.argmax(dim=1)]
    return torch.where(use[:, None], normed, sim)


def dual_softmax(sim: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None,
                 process_group=None, backend: str = "auto") -> torch.Tensor:
    """DSL (Cheng et al.): ``S_ij * softmax_i(S / T)_ij``, the prior over the queries (all ranks' rows when
    sim is row-sharded) computed in the log domain."""
    if sim.dim() != 2:
        raise AlignopsError(f"sim must be a 2-D tensor [Q, M], got {tuple(sim.shape)}")
    lse = bank_column_lse(sim, temperature=temperature, chunk_size=chunk_size, process_group=process_group,
                          backend=backend)
    return sim * torch.exp(sim / temperature - lse)


def nnn(sim: torch.Tensor, bank: torch.Tensor, *, k: int = 16, alpha: float = 1.0, chunk_size: int | None = None,
        process_group=None) -> torch.Tensor:
    """NNN (Chowdhury et al.): ``S_ij - alpha * mean of the k largest bank similarities of item j``. The
    per-column top-k streams over bank chunks and merges over ranks (all-gather of [k, M] per rank);
    torch composite (a top-k merge, no kernel of its own)."""
    _check_pair(sim, bank)
    if k < 1:
        raise AlignopsError(f"k must be >= 1, got {k}")
    check_finite(alpha, "alpha")
    chunk = bank.shape[0] if chunk_size is None else max(1, chunk_size)
    top = bank.new_empty(0, bank.shape[1])
    for r0 in range(0, bank.shape[0], chunk):
        both = torch.cat([top, bank[r0:r0 + chunk]], 0)
        top = both.topk(min(k, both.shape[0]), dim=0).values
    if process_group is not None:
        import torch.distributed as dist

        parts = [torch.empty_like(top) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(parts, top.contiguous(), group=process_group)
        both = torch.cat(parts, 0)
        top = both.topk(min(k, both.shape[0]), dim=0).values
    if top.shape[0] < k:
        raise AlignopsError(f"k = {k} exceeds the {top.shape[0]} bank queries")
    return sim - alpha * top.mean(0)


# ---- entropic OT between point clouds ------------------------------------------------------------------


def _points_reference(x, y, a, b, n_sizes, m_sizes, p, schedule, eps, n_iters, tol):
    """The torch backend: the reference solver on the materialised cost (no autograd through it)."""
    C = _ref.point_cost(x, y, p)
    return tuple(t.detach() for t in _ref.sinkhorn(C.detach(), a, b, n_sizes, m_sizes, schedule, eps, n_iters, tol,
                                                   False))


def _cost_grad_chunks(x, y, f, g, eps, p, grad):
    """(d/dx, d/dy) of sum_b grad_b <P_b, C_b> with P held fixed (the envelope), streaming rows of x in chunks
    so that at most [chunk, M] of the plan exists: dC_ij/dx_i = p |x_i - y_j|^(p-2) (x_i - y_j)."""
    B, N, _ = x.shape
    M = y.shape[1]
    gx = torch.empty_like(x)
    gy = torch.zeros_like(y)
    chunk = max(1, (1 << 20) // max(M, 1))
    for r0 in range(0, N, chunk):
        xs = x[:, r0:r0 + chunk]
        diff = xs[:, :, None, :] - y[:, None, :, :] if p != 2 else None
        C = _ref.point_cost(xs, y, p)
        P = torch.exp((f[:, r0:r0 + chunk, None] + g[:, None, :] - C) / eps)
        if p == 2:
            W = 2 * P
        else:
            dist = diff.norm(dim=-1)
            W = torch.where(dist > 0, p * P * dist.clamp_min(1e-300) ** (p - 2), 0)
        W = W * grad[:, None, None]
        gx[:, r0:r0 + chunk] = xs * W.sum(-1, keepdim=True) - W @ y
        gy += y * W.sum(1)[..., None] - W.transpose(1, 2) @ xs
    return gx, gy


class _PointsOT(torch.autograd.Function):
    """OT_eps between point clouds, [B]; backward by the envelope theorem (dOT/dC = P)."""

    @staticmethod
    def forward(ctx, x, y, a, b, p, schedule, eps, n_iters, tol, op):
        B, N, M = x.shape[0], x.shape[1], y.shape[1]
        ns = torch.full((B,), N, dtype=torch.long, device=x.device)
        ms = torch.full((B,), M, dtype=torch.long, device=x.device)
        f, g, iters, err = op(x, y, a, b, ns, ms, float(p), schedule, eps, n_iters, tol)
        value = (torch.where(a > 0, a * (f - eps * a.log()), 0).sum(-1)
                 + torch.where(b > 0, b * (g - eps * b.log()), 0).sum(-1))
        ctx.p, ctx.eps = p, eps
        ctx.save_for_backward(x, y, f, g)
        ctx.mark_non_differentiable(iters, err)
        return value, iters, err

    @staticmethod
    def backward(ctx, grad_value, _gi, _ge):
        x, y, f, g = ctx.saved_tensors
        gx, gy = _cost_grad_chunks(x, y, f, g, ctx.eps, ctx.p, grad_value)
        return gx, gy, None, None, None, None, None, None, None, None


class DistanceOutput(NamedTuple):
    value: torch.Tensor  # [B] debiased Sinkhorn divergence, or OT_eps when debias=False
    n_iters: torch.Tensor  # [B] iterations of the (x, y) problem
    err: torch.Tensor  # [B] its L1 column-marginal error


def sinkhorn_distance(x: torch.Tensor, y: torch.Tensor, eps: float, p: float = 2, a: torch.Tensor | None = None,
                      b: torch.Tensor | None = None, *, debias: bool = True, n_iters: int | None = None,
                      tol: float | None = None, eps_scaling: float | None = None, diameter: float | None = None,
                      backend: str = "auto", check_values: bool = True) -> DistanceOutput:
    r"""Entropic OT between point clouds and the debiased Sinkhorn divergence, without the cost matrix.

    ``C_ij = |x_i - y_j|_2^p`` (p = 2: squared Euclidean, POT's ``ot.dist`` default; GeomLoss's p = 2 cost is
    half of it). ``OT_eps(a, b) = <a, f - eps log a> + <b, g - eps log b>``, which equals
    ``<P, C> + eps KL(P | a x b)`` at the fixed point (GeomLoss's convention); the divergence is
    ``S_eps = OT_eps(x, y) - OT_eps(x, x) / 2 - OT_eps(y, y) / 2`` (>= 0, 0 when the clouds coincide).
    The native and Triton kernels compute the costs of a row segment / tile from the points when they need
    them: nothing N x M is stored (the torch backend materialises C). Gradients w.r.t. x and y by the
    envelope theorem (dOT/dC = P), streamed over row chunks of the plan; none w.r.t. a and b.

    Args:
        x: [B, N, d] (or [N, d]); y: [B, M, d] (or [M, d]); float32/float64, finite (NaN or inf raises).
        eps: entropic regularisation (> 0) in cost units; p: cost exponent (>= 1).
        a, b: weights [B, N] / [B, M] (or [N] / [M]), default uniform; same mass.
        n_iters, tol, eps_scaling, backend: as in :func:`sinkhorn`.
        diameter: a bound of the distances |x_i - y_j| (GeomLoss's ``diameter``): ``eps_scaling`` starts at
            ``diameter ** p``; by default the bounding box of the points gives it (one host sync on a GPU).
        check_values: ``False`` skips the checks that read tensor values on the device (weights finite,
            non-negative and of equal mass), so the call neither syncs nor breaks CUDA-graph capture
            (with ``diameter`` given when ``eps_scaling`` is set).

    Returns:
        DistanceOutput(value [B] (or scalar), n_iters, err) of the (x, y) problem.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x, y = x[None], y[None] if y.dim() == 2 else y
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise AlignopsError(f"x and y must have shapes [B, N, d] and [B, M, d], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise AlignopsError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
    check_positive(eps, "eps")
    if not p >= 1:
        raise AlignopsError(f"p must be >= 1, got {p}")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = y.to(x.dtype)
    if n_iters is None:
        n_iters, tol = 1000, (1e-6 if tol is None else tol)
    tol_v = _tolerance(tol)
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    full = lambda K: torch.full((B,), K, dtype=torch.long, device=x.device)  # noqa: E731
    aw = _marginal(a, full(N), B, N, x, "a", check_values)
    bw = _marginal(b, full(M), B, M, x, "b", check_values)
    if check_values:
        _check_mass(aw, bw, full(N), full(M))
    be = _backend.resolve(backend, x.device, "alignops.ot.sinkhorn_distance", native_cuda=False)
    op = _points_reference if be == "torch" else getattr(torch.ops.alignops, _OPS["sinkhorn_points"][be])
    if check_values and be != "native" and not torch.compiler.is_compiling() and not bool(
            torch.isfinite(x).all() & torch.isfinite(y).all()):  # the native op scans the points itself
        raise AlignopsError("x and y must not contain NaN or inf (an infinite point has infinite costs)")
    _not_nan(diameter, "diameter")
    if eps_scaling is not None and diameter is not None:
        schedule = _geometric_schedule(float(diameter) ** p, eps, eps_scaling)
    elif eps_scaling is not None:
        with torch.no_grad():
            lo, hi = torch.minimum(x.amin((0, 1)), y.amin((0, 1))), torch.maximum(x.amax((0, 1)), y.amax((0, 1)))
            diameter = float((hi - lo).norm()) ** p  # the largest cost, bounded without the cost matrix
        schedule = _geometric_schedule(diameter, eps, eps_scaling)
    else:
        schedule = []

    def ot_value(u, v, wu, wv):
        return _PointsOT.apply(u, v, wu, wv, p, schedule, eps, n_iters, tol_v, op)

    value, iters, err = ot_value(x, y, aw, bw)
    if debias:
        value = value - 0.5 * ot_value(x, x, aw, aw)[0] - 0.5 * ot_value(y, y, bw, bw)[0]
    if squeeze:
        value, iters, err = value[0], iters[0], err[0]
    return DistanceOutput(value, iters, err)
