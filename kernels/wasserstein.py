"""Triton kernel of the wasserstein family: the merge of two sorted 1-D CDFs, and its launch helper.

``alignops::wasserstein_1d_triton`` (python/alignops/ops/wasserstein.py) sorts the samples with
``torch.sort`` and builds the normalised cumulative weights with ``torch.cumsum``; this kernel does the merge.
Merging the breakpoints ``cu [n]`` and ``cv [m]`` (ties: u first) gives n + m steps; step k pairs atom
``u[i_k]`` with ``v[j_k]`` (``i_k + j_k = k``) over the quantile segment ``(max(cu[i-1], cv[j-1]),
min(cu[i], cv[j])]``. Instead of a serial two-pointer walk, every lane of a program finds its own ``i_k``
by a binary search on the merge-path diagonal (``i_k`` = the largest i with ``cu[i-1] <= cv[k-i]``), so a
block of steps is processed in parallel; one program per problem loops over blocks of steps, so the sum is
deterministic (no atomics).

``STEP_GRAD=False``: ``out[b] = sum_k len_k |u[i_k] - v[j_k]|^p`` (W_p^p). ``STEP_GRAD=True``: writes the
per-step value gradient ``steps[b, k] = g[b] len_k p |d|^(p-1) sign(d)`` (0 on the steps past the end
of either sample); the op sums the runs of equal ``i_k`` / ``j_k`` by prefix sums (deterministic).

Precision: the input dtype's accumulation type (fp32, fp64 for fp64); the CDFs come in that dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import launch, tile
from .preference import launch_config

MAX_BLOCK_STEPS = 1024  # merge steps per block of a program


@triton.jit
def _cost_and_slope(d, p, P_MODE: tl.constexpr):
    # |d|^p and d/dd |d|^p; P_MODE 1: p = 1 (slope sign(d), 0 at 0), 2: p = 2, 0: any p >= 1 via exp/log.
    ad = tl.abs(d)
    sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    if P_MODE == 1:
        return ad, sgn
    elif P_MODE == 2:
        return ad * ad, 2.0 * d
    else:
        lg = tl.log(tl.where(ad > 0, ad, 1.0))
        pw = tl.where(ad > 0, tl.exp((p - 1.0) * lg), 0.0)
        return pw * ad, p * pw * sgn


# log_steps is a run-time loop count (it grows with the sizes): one compile serves every size
@triton.jit(do_not_specialize=["log_steps"])
def wasserstein_merge_kernel(
    xu_ptr,
    cu_ptr,
    xv_ptr,
    cv_ptr,
    g_ptr,
    out_ptr,
    n,
    m,
    p_value: tl.float64,
    log_steps,
    BLOCK: tl.constexpr,
    P_MODE: tl.constexpr,
    STEP_GRAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    xu_ptr += b * n
    cu_ptr += b * n
    xv_ptr += b * m
    cv_ptr += b * m
    total = n + m
    acc = tl.zeros([BLOCK], dtype=xu_ptr.dtype.element_ty)
    p = tl.full([], p_value, xu_ptr.dtype.element_ty)
    if STEP_GRAD:
        g = tl.load(g_ptr + b)
    for k0 in range(0, total, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        live = k < total
        # largest i in [lo, hi] with cu[i-1] <= cv[k-i] (i = 0 and k - i = m always qualify)
        lo = tl.maximum(k - m, 0)
        hi = tl.minimum(k, n)
        for _ in range(log_steps):
            mid = (lo + hi + 1) // 2
            jm = k - mid
            a = tl.load(cu_ptr + mid - 1, mask=live & (mid > 0) & (lo < hi), other=0.0)
            c = tl.load(cv_ptr + jm, mask=live & (jm < m) & (lo < hi), other=2.0)  # CDFs are <= 1
            ok = (mid == 0) | (jm >= m) | (a <= c)
            active = lo < hi
            lo, hi = tl.where(active & ok, mid, lo), tl.where(active & ~ok, mid - 1, hi)
        i = lo
        j = k - i
        step = live & (i < n) & (j < m)
        cui = tl.load(cu_ptr + i, mask=step, other=0.0)
        cvj = tl.load(cv_ptr + j, mask=step, other=0.0)
        cup = tl.load(cu_ptr + i - 1, mask=step & (i > 0), other=0.0)
        cvp = tl.load(cv_ptr + j - 1, mask=step & (j > 0), other=0.0)
        seg = tl.where(step, tl.minimum(cui, cvj) - tl.maximum(cup, cvp), 0.0)
        seg = tl.maximum(seg, 0.0)
        d = tl.load(xu_ptr + i, mask=step, other=0.0) - tl.load(xv_ptr + j, mask=step, other=0.0)
        cost, slope = _cost_and_slope(d, p, P_MODE)
        if STEP_GRAD:
            tl.store(out_ptr + b * total + k, tl.where(step, g * seg * slope, 0.0), mask=live)
        else:
            acc += tl.where(step, seg * cost, 0.0)
    if not STEP_GRAD:
        tl.store(out_ptr + b, tl.sum(acc, axis=0))


def launch_merge(xu, cu, xv, cv, p: float, out, g=None) -> None:
    """Forward (``g`` None: ``out [B]`` = W_p^p) or per-step value gradients (``out [B, n + m]``), contiguous
    sorted values and CDFs of one dtype."""
    B, n = xu.shape
    m = xv.shape[1]
    if B == 0:
        return
    block, warps = launch_config(n + m, tile(xu, "wasserstein.block_steps", MAX_BLOCK_STEPS))
    p_mode = 1 if p == 1.0 else (2 if p == 2.0 else 0)
    log_steps = max(1, int(min(n, m) + 1).bit_length())
    launch(
        wasserstein_merge_kernel,
        (B,),
        xu,
        cu,
        xv,
        cv,
        g if g is not None else out,
        out,
        n,
        m,
        float(p),
        log_steps=log_steps,
        BLOCK=block,
        P_MODE=p_mode,
        STEP_GRAD=g is not None,
        num_warps=warps,
    )
