"""Triton kernels of the ot family and their launch helpers.

``sinkhorn_kernel``: one program per problem of the batch runs every iteration of that problem, so a
problem stops on its own (per-problem convergence, no host sync, no relaunch per iteration). The g
half-step is a column logsumexp, the f half-step a row logsumexp, each an online logsumexp over tiles of
the cost: nothing of size N x M is written. When the problem fits one [BLOCK_N, BLOCK_M] tile
(``SINGLE``), the tile is loaded once and stays in registers for all iterations; otherwise the tiles are
re-read each half-step (from L2 for matrices that fit there), with f, g and the column logsumexps kept
in global scratch between the passes.

``normalize_rows_kernel`` / ``normalize_cols_kernel``: the two halves of one pass of the log-domain UCoFiA
normalisation; a program per (row block, level) updates the row biases, then a program per (column block,
level) streams all rows for the column logsumexps.

Everything accumulates in the input dtype (fp32 or fp64). Running maxima are clamped at -1e30 so that
all -inf (padding, +inf costs) never forms -inf - -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

NEG = -1e30


@triton.jit
def _col_lse(z):
    mx = tl.maximum(tl.max(z, 0), NEG)
    return mx + tl.log(tl.sum(tl.exp(z - mx[None, :]), 0))


@triton.jit
def _row_lse(z):
    mx = tl.maximum(tl.max(z, 1), NEG)
    return mx + tl.log(tl.sum(tl.exp(z - mx[:, None]), 1))


@triton.jit
def _merge(m, s, m_new, s_new):
    """Online logsumexp: (max, sum) of two partial (max, sum) pairs."""
    mx = tl.maximum(m, m_new)
    return mx, s * tl.exp(m - mx) + s_new * tl.exp(m_new - mx)


@triton.jit
def _cost_tile(Cp, Xp, Yp, rows, cols, rmask, cmask, M, D, power, POINTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [rows, cols] tile of the cost: read from the matrix, or |x_i - y_j|^power computed from the points
    (only this tile exists)."""
    if POINTS:
        ks = tl.arange(0, BLOCK_D)
        d2 = tl.zeros([rows.shape[0], cols.shape[0]], dtype=Xp.dtype.element_ty)
        for k0 in range(0, D, BLOCK_D):
            kmask = (k0 + ks) < D
            xv = tl.load(Xp + rows[:, None] * D + k0 + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            yv = tl.load(Yp + cols[:, None] * D + k0 + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            diff = xv[:, None, :] - yv[None, :, :]
            d2 += tl.sum(diff * diff, 2)
        if power == 2.0:
            return d2
        return tl.where(d2 > 0, tl.exp(0.5 * power * tl.log(d2)), 0.0)
    else:
        return tl.load(Cp + rows[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def sinkhorn_kernel(C, X, Y, A, Bw, NS, MS, SCHED, F, G, L, ITERS, ERR, N, M, D, K, n_iters, eps, tol, sign, power,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SINGLE: tl.constexpr, POINTS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    n = tl.load(NS + p)
    m = tl.load(MS + p)
    Cp = C + p * N * M
    Xp = X + p * N * D
    Yp = Y + p * M * D
    Fp = F + p * N
    Gp = G + p * M
    Lp = L + p * M
    ri = tl.arange(0, BLOCK_N)
    cj = tl.arange(0, BLOCK_M)
    dt = C.dtype.element_ty
    t = tl.zeros([], dtype=tl.int32)
    done = (n == 0) | (m == 0)
    err = tl.zeros([], dtype=dt)
    if SINGLE:
        rmask = ri < n
        cmask = cj < m
        mask = rmask[:, None] & cmask[None, :]
        c = _cost_tile(Cp, Xp, Yp, ri, cj, rmask, cmask, M, D, power, POINTS, BLOCK_D)
        log_a = tl.log(tl.load(A + p * N + ri, mask=rmask, other=1.0))
        bw = tl.load(Bw + p * M + cj, mask=cmask, other=0.0)
        log_b = tl.log(tl.where(cmask, bw, 1.0))
        f = tl.zeros([BLOCK_N], dtype=dt)
        g = tl.zeros([BLOCK_M], dtype=dt)
        while (t < n_iters) & (done == 0):
            e = tl.where(t < K, tl.load(SCHED + tl.minimum(t, tl.maximum(K - 1, 0))).to(dt), eps)
            inv = 1.0 / e
            Lc = _col_lse(tl.where(mask, f[:, None] * inv - (sign * inv) * c, float("-inf")))
            e_t = tl.sum(tl.where(cmask, tl.abs(tl.exp(g * inv + Lc) - bw), 0.0), 0)
            conv = (t >= K) & (tol >= 0) & (e_t <= tol)
            err = tl.where((t >= K) & (tol >= 0), e_t, err)
            g_new = tl.where(cmask, e * (log_b - Lc), 0.0)
            Lr = _row_lse(tl.where(mask, g_new[None, :] * inv - (sign * inv) * c, float("-inf")))
            f_new = tl.where(rmask, e * (log_a - Lr), 0.0)
            g = tl.where(conv, g, g_new)
            f = tl.where(conv, f, f_new)
            done = conv
            t = tl.where(conv, t, t + 1)
        if done == 0:
            inv = 1.0 / eps
            Lc = _col_lse(tl.where(mask, f[:, None] * inv - (sign * inv) * c, float("-inf")))
            err = tl.sum(tl.where(cmask, tl.abs(tl.exp(g * inv + Lc) - bw), 0.0), 0)
        tl.store(Fp + ri, f, mask=ri < N)
        tl.store(Gp + cj, g, mask=cj < M)
    else:
        for r0 in range(0, N, BLOCK_N):
            tl.store(Fp + r0 + ri, tl.zeros([BLOCK_N], dtype=dt), mask=r0 + ri < N)
        for c0 in range(0, M, BLOCK_M):
            tl.store(Gp + c0 + cj, tl.zeros([BLOCK_M], dtype=dt), mask=c0 + cj < M)
        tl.debug_barrier()
        while (t < n_iters + 1) & (done == 0):
            last = t == n_iters  # one more column pass measures the final error
            e = tl.where((t < K) & (last == 0), tl.load(SCHED + tl.minimum(t, tl.maximum(K - 1, 0))).to(dt), eps)
            inv = 1.0 / e
            e_t = tl.zeros([], dtype=dt)
            for c0 in range(0, m, BLOCK_M):
                cols = c0 + cj
                cmask = cols < m
                mx = tl.full([BLOCK_M], NEG, dtype=dt)
                s = tl.zeros([BLOCK_M], dtype=dt)
                for r0 in range(0, n, BLOCK_N):
                    rows = r0 + ri
                    rmask = rows < n
                    mask = rmask[:, None] & cmask[None, :]
                    c = _cost_tile(Cp, Xp, Yp, rows, cols, rmask, cmask, M, D, power, POINTS, BLOCK_D)
                    fr = tl.load(Fp + rows, mask=rmask, other=0.0)
                    z = tl.where(mask, fr[:, None] * inv - (sign * inv) * c, float("-inf"))
                    bm = tl.maximum(tl.max(z, 0), NEG)
                    mx, s = _merge(mx, s, bm, tl.sum(tl.exp(z - bm[None, :]), 0))
                Lc = mx + tl.log(s)
                tl.store(Lp + cols, Lc, mask=cmask)
                gc = tl.load(Gp + cols, mask=cmask, other=0.0)
                bw = tl.load(Bw + p * M + cols, mask=cmask, other=0.0)
                e_t += tl.sum(tl.where(cmask, tl.abs(tl.exp(gc * inv + Lc) - bw), 0.0), 0)
            tl.debug_barrier()
            check = ((t >= K) & (tol >= 0)) | last
            conv = check & (e_t <= tol) & (tol >= 0)
            err = tl.where(check, e_t, err)
            done = conv | last
            if done == 0:
                for c0 in range(0, m, BLOCK_M):
                    cols = c0 + cj
                    cmask = cols < m
                    bw = tl.load(Bw + p * M + cols, mask=cmask, other=1.0)
                    Lc = tl.load(Lp + cols, mask=cmask, other=0.0)
                    tl.store(Gp + cols, e * (tl.log(bw) - Lc), mask=cmask)
                tl.debug_barrier()
                for r0 in range(0, n, BLOCK_N):
                    rows = r0 + ri
                    rmask = rows < n
                    mx = tl.full([BLOCK_N], NEG, dtype=dt)
                    s = tl.zeros([BLOCK_N], dtype=dt)
                    for c0 in range(0, m, BLOCK_M):
                        cols = c0 + cj
                        cmask = cols < m
                        mask = rmask[:, None] & cmask[None, :]
                        c = _cost_tile(Cp, Xp, Yp, rows, cols, rmask, cmask, M, D, power, POINTS, BLOCK_D)
                        gc = tl.load(Gp + cols, mask=cmask, other=0.0)
                        z = tl.where(mask, gc[None, :] * inv - (sign * inv) * c, float("-inf"))
                        bm = tl.maximum(tl.max(z, 1), NEG)
                        mx, s = _merge(mx, s, bm, tl.sum(tl.exp(z - bm[:, None]), 1))
                    aw = tl.load(A + p * N + rows, mask=rmask, other=1.0)
                    tl.store(Fp + rows, e * (tl.log(aw) - (mx + tl.log(s))), mask=rmask)
                tl.debug_barrier()
                t += 1
    tl.store(ITERS + p, t.to(tl.int64))
    tl.store(ERR + p, err)


@triton.jit
def normalize_rows_kernel(S, CB, RB, N, M, scale, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """row_bias_i = -LSE_j(scale * S_ij + col_bias_j) for a block of rows of one level."""
    level = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cj = tl.arange(0, BLOCK_M)
    dt = S.dtype.element_ty
    mx = tl.full([BLOCK_R], NEG, dtype=dt)
    s = tl.zeros([BLOCK_R], dtype=dt)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + cj
        cmask = cols < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(S + level * N * M + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
        cb = tl.load(CB + level * M + cols, mask=cmask, other=0.0)
        z = tl.where(mask, scale * x + cb[None, :], float("-inf"))
        bm = tl.maximum(tl.max(z, 1), NEG)
        mx, s = _merge(mx, s, bm, tl.sum(tl.exp(z - bm[:, None]), 1))
    tl.store(RB + level * N + rows, -(mx + tl.log(s)), mask=rmask)


@triton.jit
def normalize_cols_kernel(S, RB, OUT, N, M, scale, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """col_lse_j = LSE_i(scale * S_ij + row_bias_i) for a block of columns of one level, all rows streamed."""
    level = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < M
    ri = tl.arange(0, BLOCK_N)
    dt = S.dtype.element_ty
    mx = tl.full([BLOCK_M], NEG, dtype=dt)
    s = tl.zeros([BLOCK_M], dtype=dt)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + ri
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(S + level * N * M + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
        rb = tl.load(RB + level * N + rows, mask=rmask, other=0.0)
        z = tl.where(mask, scale * x + rb[:, None], float("-inf"))
        bm = tl.maximum(tl.max(z, 0), NEG)
        mx, s = _merge(mx, s, bm, tl.sum(tl.exp(z - bm[None, :]), 0))
    tl.store(OUT + level * M + cols, mx + tl.log(s), mask=cmask)


def _blocks(C: torch.Tensor, N: int, M: int, points: bool) -> tuple[int, int, bool]:
    interp = C.device.type == "cpu"
    # the point tiles hold a [BLOCK_N, BLOCK_M, BLOCK_D] difference: smaller tiles
    cap = 16 if interp else (32 if points else (64 if C.dtype == torch.float64 else 128))
    bn = max(16, min(cap, triton.next_power_of_2(max(N, 1))))
    bm = max(16, min(cap, triton.next_power_of_2(max(M, 1))))
    return bn, bm, (N <= bn and M <= bm)


def launch_sinkhorn(cost, a, b, n_sizes, m_sizes, sched, K, eps, n_iters, tol, scores, f, g, scratch, iters, err,
                    points=None, power=2.0):
    """sched holds the K epsilon-scaling values (at least one entry, unread when K = 0). With points = (x, y)
    ([B, N, d], [B, M, d]) the costs |x_i - y_j|^power are computed per tile and ``cost`` only gives the dtype."""
    B, N, M = f.shape[0], f.shape[1], g.shape[1]
    bn, bm, single = _blocks(cost, N, M, points is not None)
    x, y = points if points is not None else (cost, cost)
    D = x.shape[2] if points is not None else 1
    bd = max(2, min(8, triton.next_power_of_2(D)))
    wrap_triton(sinkhorn_kernel)[(B,)](
        cost, x, y, a, b, n_sizes, m_sizes, sched, f, g, scratch, iters, err, N, M, D,
        K, n_iters, eps, tol, -1.0 if scores else 1.0, power,
        BLOCK_N=bn, BLOCK_M=bm, SINGLE=single, POINTS=points is not None, BLOCK_D=bd, num_warps=4)


def launch_normalize_pass(sim, col_bias, scale, row_update, row_bias, col_lse):
    L, N, M = sim.shape
    interp = sim.device.type == "cpu"
    br = 16 if interp else 32
    bm = 16 if interp else 128
    if row_update and N > 0:
        wrap_triton(normalize_rows_kernel)[(triton.cdiv(N, br), L)](sim, col_bias, row_bias, N, M, scale,
                                                                    BLOCK_R=br, BLOCK_M=bm, num_warps=4)
    if M > 0:
        wrap_triton(normalize_cols_kernel)[(triton.cdiv(M, bm), L)](sim, row_bias, col_lse, N, M, scale,
                                                                    BLOCK_N=br, BLOCK_M=bm, num_warps=4)
