"""Entropic OT between point clouds and the debiased Sinkhorn divergence, from the points (no cost matrix)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _backend
from .._api import legacy_order
from .._checks import check_python_float
from .._errors import AlignopsError
from ..ops._registration import run_checks, run_value_checks
from ..reference import ot as _ref
from .solver import _OPS, _check_mass, _geometric_schedule, _not_nan, _on_support, _tolerance, _weights


def _points_reference(x, y, a, b, n_sizes, m_sizes, p, schedule, eps, n_iters, tol):
    """The torch backend: the reference solver on the materialised cost (no autograd through it)."""
    C = _ref.point_cost(x, y, p)
    return tuple(
        t.detach() for t in _ref.sinkhorn(C.detach(), a, b, n_sizes, m_sizes, schedule, eps, n_iters, tol, False)
    )


def _cost_grad_chunks(x, y, f, g, eps, p, grad):
    """(d/dx, d/dy) of sum_b grad_b <P_b, C_b> with P held fixed (the envelope), streaming rows of x in chunks
    so that at most [chunk, M] of the plan exists: dC_ij/dx_i = p |x_i - y_j|^(p-2) (x_i - y_j)."""
    B, N, _ = x.shape
    M = y.shape[1]
    gx = torch.empty_like(x)
    gy = torch.zeros_like(y)
    chunk = max(1, (1 << 20) // max(M, 1))
    for r0 in range(0, N, chunk):
        xs = x[:, r0 : r0 + chunk]
        diff = xs[:, :, None, :] - y[:, None, :, :] if p != 2 else None
        C = _ref.point_cost(xs, y, p)
        P = torch.exp((f[:, r0 : r0 + chunk, None] + g[:, None, :] - C) / eps)
        if p == 2:
            W = 2 * P
        else:
            dist = diff.norm(dim=-1)
            W = torch.where(dist > 0, p * P * dist.clamp_min(1e-300) ** (p - 2), 0)
        W = W * grad[:, None, None]
        gx[:, r0 : r0 + chunk] = xs * W.sum(-1, keepdim=True) - W @ y
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
        value = torch.where(a > 0, a * (f - eps * a.log()), 0).sum(-1) + torch.where(
            b > 0, b * (g - eps * b.log()), 0
        ).sum(-1)
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


@legacy_order(2, "eps", "p", "a", "b")  # was (x, y, eps, p=2, a=None, b=None): eps is keyword-only in sinkhorn
def sinkhorn_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    p: float = 2,
    debias: bool = True,
    n_iters: int | None = None,
    tol: float | None = None,
    eps_scaling: float | None = None,
    diameter: float | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> DistanceOutput:
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
        eps: entropic regularisation (> 0) in cost units; p: cost exponent (finite, >= 1). Keyword-only, as in
            :func:`sinkhorn`; the old order ``(x, y, eps, p, a, b)`` still works, with a DeprecationWarning,
            until the next release.
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
    if x.dim() != 3 or y.dim() != 3:  # the ranks before the shapes are read; B and d agree: the op's check
        raise AlignopsError(
            f"x and y must have shapes [B, N, d] and [B, M, d], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not x.is_floating_point() or not y.is_floating_point():
        raise AlignopsError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
    check_python_float(eps, "eps")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = y.to(x.dtype)
    if n_iters is None:
        n_iters, tol = 1000, (1e-6 if tol is None else tol)
    tol_v = _tolerance(tol)
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    ns = torch.full((B,), N, dtype=torch.long, device=x.device)
    ms = torch.full((B,), M, dtype=torch.long, device=x.device)
    aw, bw = _weights(a, ns, B, N, x, "a"), _weights(b, ms, B, M, x, "b")
    # the op's argument checks (p, eps, n_iters, the weights' shapes and devices), whichever backend runs
    run_checks("alignops::sinkhorn_points", x, y, aw, bw, ns, ms, float(p), [], eps, n_iters, tol_v)
    be = _backend.resolve(backend, x.device, "alignops.ot.sinkhorn_distance", native_cuda=False)
    op = _points_reference if be == "torch" else getattr(torch.ops.alignops, _OPS["sinkhorn_points"][be])
    if check_values and be != "native" and not torch.compiler.is_compiling():  # the native op scans the points itself
        run_value_checks("alignops::sinkhorn_points", x, y, ns, ms)
    aw, bw = _on_support(a, aw, ns, "a", check_values), _on_support(b, bw, ms, "b", check_values)
    if check_values:
        _check_mass(aw, bw, ns, ms)
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
