"""The entropic OT solver: batched log-domain Sinkhorn over a cost (or score) matrix, its input checks,
epsilon scaling and the envelope / implicit / unrolled gradients. Conventions: see :mod:`alignops.ot`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend
from .._api import keyword_only
from .._checks import check_floating, check_python_float
from .._errors import AlignopsError
from ..ops._registration import run_checks, run_value_checks
from ..ops.ot import envelope_grad_cost
from ..reference import ot as _ref
from .newton import check_newton, newton_polish

_GRADS = ("envelope", "implicit", "unrolled")
# op names per backend (torch.ops.alignops.<name>), looked up at call time: the Triton ops exist only where
# the triton package is installed
_OPS = {
    "sinkhorn": {"native": "sinkhorn", "triton": "sinkhorn_triton"},
    "sinkhorn_points": {"native": "sinkhorn_points", "triton": "sinkhorn_points_triton"},
}


class SinkhornOutput(NamedTuple):
    f: torch.Tensor  # [B, N] row potentials (0 on padding)
    g: torch.Tensor  # [B, M] column potentials (0 on padding)
    plan: torch.Tensor | None  # [B, N, M] when return_plan, else None
    n_iters: torch.Tensor  # [B] int64, iterations each problem ran
    err: torch.Tensor  # [B] L1 column-marginal error of the returned potentials at eps


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 3:
        raise AlignopsError(f"{name} must be a 3-D tensor of shape [B, N, M], got shape {tuple(x.shape)}")
    check_floating(x, name)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sizes(sizes, B: int, full: int, name: str, device) -> torch.Tensor:
    if sizes is None:
        return torch.full((B,), full, dtype=torch.long, device=device)
    sizes = _backend.to_device(torch.as_tensor(sizes), device)
    if sizes.dtype not in (torch.int64, torch.int32) or tuple(sizes.shape) != (B,):
        raise AlignopsError(
            f"{name} must be an int64 or int32 tensor of shape [B] = [{B}], got {sizes.dtype} {list(sizes.shape)}"
        )
    return sizes.long()


def _weights(w, sizes: torch.Tensor, B: int, K: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """The op's marginal from the public forms, in the cost's dtype: None (uniform over each problem's size) or a
    [K] shared by the problems, which this checks; a [B, K] (its shape and device) is the op's to check
    (``run_checks``, before ``_on_support``)."""
    if w is None:
        valid = torch.arange(K, device=like.device) < sizes[:, None]
        return torch.where(valid, 1.0 / sizes.clamp_min(1)[:, None].to(like.dtype), 0).to(like.dtype)
    if w.dim() == 1:
        if w.shape[0] != K:
            dim = "N" if name == "a" else "M"
            raise AlignopsError(f"{name} must have shape [B, {dim}] = [{B}, {K}] (or [{K}]), got {list(w.shape)}")
        w = w.expand(B, -1)
    return w.to(like.dtype)


def _on_support(w, weights: torch.Tensor, sizes: torch.Tensor, name: str, check_values: bool) -> torch.Tensor:
    """The given marginal ``w`` (``weights`` as ``_weights`` built it) zeroed on the padding of a ragged batch and,
    with check_values, finite and non-negative (one host read; the ops read the marginals unchecked)."""
    if w is None:  # the uniform default: already zero on the padding
        return weights
    valid = torch.arange(weights.shape[1], device=weights.device) < sizes[:, None]
    w = torch.where(valid, weights, 0)
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
        raise AlignopsError(
            f"a and b must have {what} in every problem, got sums {ma.tolist()[:8]} and {mb.tolist()[:8]}"
        )


@keyword_only("eps", "scaling", "n_sizes", "m_sizes")
def eps_schedule(
    cost: torch.Tensor,
    *,
    eps: float,
    scaling: float | None,
    n_sizes: torch.Tensor | None = None,
    m_sizes: torch.Tensor | None = None,
) -> list[float]:
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
    rows, cols = _ref.masks(ns, ms, N, M)
    lo = torch.full((), math.inf, dtype=cost.dtype, device=cost.device)
    hi = torch.full((), -math.inf, dtype=cost.dtype, device=cost.device)
    step = max(1, B // 8)
    for p in range(0, B, step):
        c = cost[p : p + step]
        valid = rows[p : p + step, :, None] & cols[p : p + step, None, :] & torch.isfinite(c)
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
        grad_cost, grad_a, grad_b = implicit_grad_cost(
            grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, eps=ctx.eps, scores=ctx.scores
        )
        return grad_cost, grad_a, grad_b, None, None, None, None, None, None, None, None


@keyword_only("eps", "scores")
def implicit_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, *, eps: float, scores: bool):
    B, N, M = cost.shape
    rows, cols = _ref.masks(n_sizes, m_sizes, N, M)
    P = _ref.plan(cost, f, g, eps, n_sizes, m_sizes, scores)
    R = torch.where((rows & (a > 0))[:, :, None], P / a[:, :, None], 0)
    S = torch.where((cols & (b > 0))[:, None, :], P / b[:, None, :], 0)
    gf = torch.where(rows, grad_f, 0)
    gg = torch.where(cols, grad_g, 0)
    n, m = rows.sum(-1, keepdim=True).to(cost.dtype), cols.sum(-1, keepdim=True).to(cost.dtype)
    c = (gf.sum(-1, keepdim=True) - gg.sum(-1, keepdim=True)) / (n + m).clamp_min(1)
    rhs = torch.cat([torch.where(rows, gf - c, 0), torch.where(cols, gg + c, 0)], -1)
    eye = torch.eye(N + M, dtype=cost.dtype, device=cost.device).expand(B, -1, -1)
    At = eye + torch.cat(
        [
            torch.cat([torch.zeros(B, N, N, dtype=cost.dtype, device=cost.device), S], -1),
            torch.cat([R.transpose(1, 2), torch.zeros(B, M, M, dtype=cost.dtype, device=cost.device)], -1),
        ],
        1,
    )
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
            steps (Brauer et al. 2017; see ``alignops.ot.newton``) for the problems still above
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
    check_python_float(eps, "eps")
    if grad not in _GRADS:
        raise AlignopsError(f"grad must be one of {_GRADS}, got {grad!r}")
    if n_iters is None:
        n_iters, tol = 1000, (1e-6 if tol is None else tol)
    tol_v = _tolerance(tol)
    B, N, M = x.shape
    ns = _sizes(n_sizes, B, N, "n_sizes", x.device)
    ms = _sizes(m_sizes, B, M, "m_sizes", x.device)
    aw, bw = _weights(a, ns, B, N, x, "a"), _weights(b, ms, B, M, x, "b")
    # the op's argument checks (eps, n_iters, the marginals' shapes and devices), whichever backend runs
    run_checks("alignops::sinkhorn", x, aw, bw, ns, ms, [], eps, n_iters, tol_v, scores)
    if isinstance(newton_steps, bool) or not (isinstance(newton_steps, int) and 0 <= newton_steps <= n_iters):
        raise AlignopsError(f"newton_steps must be an int in [0, n_iters = {n_iters}], got {newton_steps}")
    if newton_steps:
        check_newton(N, M)
        if grad == "unrolled" or not log_domain:
            raise AlignopsError(
                "newton_steps runs after the log-domain iterations and has no unrolled gradient: "
                "use grad='envelope' or 'implicit' with log_domain=True"
            )
    be = _solver_backend(backend, x, log_domain, grad, n_sizes is not None or m_sizes is not None, eps_scaling)
    if check_values and not torch.compiler.is_compiling():
        # sizes in range (before the masses are read), and the cost's NaN / infinity scan except for the native
        # op, which scans it itself: the op's value checks, one host read
        run_value_checks("alignops::sinkhorn", x, ns, ms, scores, be != "native")
    aw, bw = _on_support(a, aw, ns, "a", check_values), _on_support(b, bw, ms, "b", check_values)
    if check_values:
        _check_mass(aw, bw, ns, ms)
    if not log_domain:
        f, g = _ref.sinkhorn_exp(-x if scores else x, aw, bw, eps, n_iters)
        iters = torch.full((B,), n_iters, dtype=torch.long, device=x.device)
        err = (torch.exp((f[:, :, None] + g[:, None, :] - (-x if scores else x)) / eps).sum(1) - bw).abs().sum(-1)
        return _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze)
    _not_nan(cost_range, "cost_range")
    if cost_range is not None and eps_scaling is not None:
        schedule = _geometric_schedule(cost_range, eps, eps_scaling)
    else:
        schedule = eps_schedule(x, eps=eps, scaling=eps_scaling, n_sizes=ns, m_sizes=ms)
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


def _solver_backend(
    backend: str, x: torch.Tensor, log_domain: bool, grad: str, ragged: bool, eps_scaling: float | None
) -> str:
    """The backend that runs: the torch reference for the exp-domain iterations and the unrolled gradient."""
    if not log_domain:
        if ragged or eps_scaling is not None or backend not in ("auto", "torch"):
            raise AlignopsError(
                "log_domain=False (the classical exp-domain iterations) runs on backend='torch' "
                "without ragged sizes or eps_scaling"
            )
        return "torch"
    if grad == "unrolled":
        if backend not in ("auto", "torch"):
            raise AlignopsError("grad='unrolled' differentiates the PyTorch reference: use backend='torch' or 'auto'")
        return "torch"
    return _backend.resolve(backend, x.device, "alignops.ot.sinkhorn", native_cuda=False)


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
        return (
            envelope_grad_cost(grad_f, grad_g, cost, a, b, f, g, n_sizes, m_sizes, ctx.eps, ctx.scores),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _finish(x, f, g, iters, err, eps, ns, ms, scores, return_plan, squeeze):
    P = _ref.plan(x, f, g, eps, ns, ms, scores) if return_plan else None
    if squeeze:
        f, g, iters, err = f[0], g[0], iters[0], err[0]
        P = P[0] if P is not None else None
    return SinkhornOutput(f, g, P, iters, err)
