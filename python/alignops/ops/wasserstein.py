"""Fake kernels and autograd of the wasserstein family (schemas in csrc/wasserstein/wasserstein_1d_cpu.cpp), shared
by its Triton
twins below: ``alignops::wasserstein_1d_triton`` and its backward ``alignops::wasserstein_1d_backward_triton``,
with the schemas of the native ops.

In the twins torch.sort sorts each problem (stable) and torch.cumsum builds the normalised CDFs (fp64, then the
accumulation dtype); the merge of the two CDFs is the Triton kernel of kernels/wasserstein.py. The backward
runs the same kernel for per-step value gradients and sums the runs of each atom by fp64 prefix sums; the
breakpoint (weight) gradients are closed forms at the step where each breakpoint is passed, found by
searchsorted. No atomics: the results are deterministic. No host sync, so the weights' values (>= 0, a
positive sum) are not checked there, unlike the native op.
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._dtypes import acc_dtype
from ._registration import register_fake, register_triton_twin


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


def _sorted_cdf(x: torch.Tensor, w: torch.Tensor | None):
    """(sorted values, CDF in the accumulation dtype, order, fp64 CDF, fp64 total weight [B, 1])."""
    acc = acc_dtype(x.dtype)
    xs, order = torch.sort(x.to(acc), dim=-1, stable=True)
    n = x.shape[-1]
    if w is None:
        ws = torch.ones(x.shape, dtype=torch.float64, device=x.device)
    else:
        ws = torch.gather(w.to(torch.float64), -1, order)
    c = torch.cumsum(ws, -1)
    total = c[:, n - 1 :]
    c = torch.cat([c[:, : n - 1] / total, torch.ones_like(total)], -1)  # the last breakpoint exactly 1
    return xs, c.to(acc).contiguous(), order, c, total


@register_triton_twin("alignops::wasserstein_1d")
def wasserstein_1d_triton(
    u: torch.Tensor, v: torch.Tensor, u_weights: torch.Tensor | None, v_weights: torch.Tensor | None, p: float
) -> torch.Tensor:
    """Triton twin of ``alignops::wasserstein_1d``: W_p^p [B] in u's dtype."""
    from ..kernels.wasserstein import launch_merge

    check_triton_device(u, "u")
    xu, cu, _, _, _ = _sorted_cdf(u, u_weights)
    xv, cv, _, _, _ = _sorted_cdf(v, v_weights)
    out = u.new_empty((u.shape[0],), dtype=acc_dtype(u.dtype))
    launch_merge(xu, cu, xv, cv, p, out)
    return out.to(u.dtype)


def _cost(d: torch.Tensor, p: float) -> torch.Tensor:
    return d.abs() if p == 1.0 else d.abs().pow(p)


def _breakpoint_grad(x_self, c_self, x_other, c_other, g, p, right: bool) -> torch.Tensor:
    """d/dC_i of the cost for each breakpoint of one sample: c(step where C_i is passed) - c(next step),
    0 where either step lies past the end of the merge (the C++ walk's convention)."""
    n, m = x_self.shape[-1], x_other.shape[-1]
    # the partner atom of the other sample when C_i is passed (ties: u's breakpoint first)
    J = torch.searchsorted(c_other, c_self, right=right)
    valid = J < m
    partner = torch.gather(x_other, -1, J.clamp_max(m - 1))
    here = _cost(x_self.double() - partner.double(), p)
    nxt = torch.cat([x_self[:, 1:], x_self[:, -1:]], -1)
    there = _cost(nxt.double() - partner.double(), p)
    has_next = torch.arange(n, device=x_self.device) < n - 1
    return torch.where(valid & has_next, g * (here - there), 0.0)


def _weight_grad(
    gc: torch.Tensor, c64: torch.Tensor, total: torch.Tensor, order: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Chain rule from d/dC_i to the input weights: (sum_{i>=l} gc_i - sum_i gc_i C_i) / S, unsorted."""
    tail = torch.flip(torch.cumsum(torch.flip(gc, [-1]), -1), [-1])
    gw = (tail - (gc * c64).sum(-1, keepdim=True)) / total
    return torch.empty_like(gw, dtype=dtype).scatter_(-1, order, gw.to(dtype))


@register_triton_twin("alignops::wasserstein_1d_backward")
def wasserstein_1d_backward_triton(
    grad: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    u_weights: torch.Tensor | None,
    v_weights: torch.Tensor | None,
    p: float,
    weights_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::wasserstein_1d_backward``: (grad_u, grad_v, grad_u_weights, grad_v_weights)."""
    from ..kernels.wasserstein import launch_merge

    check_triton_device(u, "u")
    B, n = u.shape
    m = v.shape[1]
    xu, cu, ou, cu64, su = _sorted_cdf(u, u_weights)
    xv, cv, ov, cv64, sv = _sorted_cdf(v, v_weights)
    steps = u.new_empty((B, n + m), dtype=xu.dtype)
    launch_merge(xu, cu, xv, cv, p, steps, grad.to(xu.dtype).contiguous())
    # step k pairs u[i_k] with v[j_k], both non-decreasing in k: an atom's gradient is the sum over its run
    # of steps, which ends where its breakpoint is passed (u: i + #{cv < cu_i}; v: j + #{cu <= cv_j}).
    prefix = torch.cumsum(steps.double(), -1)
    end_u = torch.arange(n, device=u.device) + torch.searchsorted(cv, cu, right=False)
    end_v = torch.arange(m, device=u.device) + torch.searchsorted(cu, cv, right=True)
    pu = torch.gather(prefix, -1, end_u.clamp_max(n + m - 1))
    pv = torch.gather(prefix, -1, end_v.clamp_max(n + m - 1))
    gxu = torch.diff(pu, dim=-1, prepend=torch.zeros_like(pu[:, :1]))
    gxv = -torch.diff(pv, dim=-1, prepend=torch.zeros_like(pv[:, :1]))
    gu = torch.empty_like(u).scatter_(-1, ou, gxu.to(u.dtype))
    gv = torch.empty_like(v).scatter_(-1, ov, gxv.to(v.dtype))
    gwu, gwv = u.new_empty((0, 0)), v.new_empty((0, 0))
    if weights_grad:
        g = grad.double().unsqueeze(-1)
        if u_weights is not None:
            gwu = _weight_grad(_breakpoint_grad(xu, cu, xv, cv, g, p, False), cu64, su, ou, u.dtype)
        if v_weights is not None:
            gwv = _weight_grad(_breakpoint_grad(xv, cv, xu, cu, g, p, True), cv64, sv, ov, v.dtype)
    return gu, gv, gwu, gwv


register_wasserstein_1d_autograd("alignops::wasserstein_1d_triton", "wasserstein_1d_backward_triton")
