"""Triton kernels of the ot family and their launch helpers.

``sinkhorn_kernel``: one program per problem of the batch runs every iteration of that problem, so a
problem stops on its own (per-problem convergence, no host sync, no relaunch per iteration). The g
half-step is a column logsumexp, the f half-step a row logsumexp, each an online logsumexp over tiles of
the cost: nothing of size N x M is written. When the problem fits one [BLOCK_N, BLOCK_M] tile
(``SINGLE``), the tile is loaded once and stays in registers for all iterations; otherwise the tiles are
re-read each half-step (from L2 for matrices that fit there), with f, g and the column logsumexps kept
in global scratch between the passes. The column pass of iteration t also measures the column error of
iteration t - 1's potentials; a problem may stop on it only once a full (g, f) update at eps has run
(t > K, K the epsilon-scaling steps): the starting potentials (0, or the last scaling step's) can fit the
columns while the rows were never fitted.

``split_*_kernel`` (few large problems, see ``use_split``): each half-step is a launch over column or row
blocks of every problem, from a host loop that never waits on the device; a per-problem ``done`` flag in
device memory stops converged problems. The point-cloud variants (``POINTS``) compute the cost tile
``|x_i - y_j|^p`` from the points where the matrix variants load it.

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

from ._launch import launch, tile

NEG = tl.constexpr(-1e30)  # a constexpr: a plain module global is a NameError for the compiler


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
            xv = tl.load(
                Xp + rows[:, None].to(tl.int64) * D + k0 + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
            )
            yv = tl.load(
                Yp + cols[:, None].to(tl.int64) * D + k0 + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0
            )
            diff = xv[:, None, :] - yv[None, :, :]
            d2 += tl.sum(diff * diff, 2)
        # one exit: a run-time return inside a helper that loops call does not compile on Triton 3.6
        powered = tl.where(d2 > 0, tl.exp(0.5 * power * tl.log(d2)), 0.0)
        c = tl.where(power == 2.0, d2, powered)
    else:
        # int64: one problem of N x M > 2^31 entries (50k x 50k fits an H200) overflows int32 offsets
        c = tl.load(
            Cp + rows[:, None].to(tl.int64) * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        )
    return c


# Sizes and counts not specialised (one compile serves every batch); M stays: as a row stride its divisibility
# by 16 lets the loads vectorise, and it has at most three versions.
@triton.jit(do_not_specialize=["N", "D", "K", "n_iters"])
def sinkhorn_kernel(
    C,
    X,
    Y,
    A,
    Bw,
    NS,
    MS,
    SCHED,
    F,
    G,
    L,
    ITERS,
    ERR,
    N,
    M,
    D,
    K,
    n_iters,
    tol,
    sign,
    power,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SINGLE: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    n = tl.load(NS + p).to(tl.int32)  # int32 like N: the loops over n and N share their variables
    m = tl.load(MS + p).to(tl.int32)
    Cp = C + p * N * M
    Xp = X + p * N * D
    Yp = Y + p * M * D
    Fp = F + p * N
    Gp = G + p * M
    Lp = L + p * M
    ri = tl.arange(0, BLOCK_N)
    cj = tl.arange(0, BLOCK_M)
    dt = F.dtype.element_ty
    eps = tl.load(SCHED + K)  # in the input dtype: a Python float argument would be fp32
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
            e = tl.load(SCHED + tl.minimum(t, K))
            inv = 1.0 / e
            Lc = _col_lse(tl.where(mask, f[:, None] * inv - (sign * inv) * c, float("-inf")))
            e_t = tl.sum(tl.where(cmask, tl.abs(tl.exp(g * inv + Lc) - bw), 0.0), 0)
            # t > K: the first check follows a full (g, f) update at eps (see the module docstring)
            conv = (t > K) & (tol >= 0) & (e_t <= tol)
            err = tl.where((t > K) & (tol >= 0), e_t, err)
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
            e = tl.load(SCHED + tl.where(last, K, tl.minimum(t, K)))
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
            check = ((t > K) & (tol >= 0)) | last
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
    # a row of only -inf carries no mass: bias -inf (not +inf, which makes the column pass's terms NaN)
    tl.store(RB + level * N + rows, tl.where(s > 0, -(mx + tl.log(s)), float("-inf")), mask=rmask)


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


def _warps(tile_elems: int, dtype: torch.dtype) -> int:
    """Warps for a tile of ``tile_elems`` values: about 128 bytes of each live tile per thread. A 128 x 128
    fp32 tile on 4 warps held 128 values per thread and spilled 4.4 KB on sm_90 (bench/results/triton_sm90.csv)."""
    return max(4, min(16, tile_elems * dtype.itemsize // (32 * 128)))


def _blocks(C: torch.Tensor, N: int, M: int, points: bool) -> tuple[int, int, bool]:
    # the point tiles hold a [BLOCK_N, BLOCK_M, BLOCK_D] difference: smaller tiles
    cap = tile(C, "ot.block", 32 if points else (64 if C.dtype == torch.float64 else 128))
    bn = max(16, min(cap, triton.next_power_of_2(max(N, 1))))
    bm = max(16, min(cap, triton.next_power_of_2(max(M, 1))))
    single = N <= bn and M <= bm
    if not single:  # tiles streamed from memory: half as many rows keep the registers (no spill; 16 stays 16)
        bn = max(16, bn // 2)
    return bn, bm, single


def launch_sinkhorn(
    cost, a, b, n_sizes, m_sizes, sched, K, n_iters, tol, scores, f, g, scratch, iters, err, points=None, power=2.0
):
    """sched holds the K epsilon-scaling values then eps, in the dtype of f. With points = (x, y)
    ([B, N, d], [B, M, d]) the costs |x_i - y_j|^power are computed per tile and ``cost`` only gives the dtype."""
    B, N, M = f.shape[0], f.shape[1], g.shape[1]
    bn, bm, single = _blocks(cost, N, M, points is not None)
    x, y = points if points is not None else (cost, cost)
    D = x.shape[2] if points is not None else 1
    bd = max(2, min(8, triton.next_power_of_2(D)))
    launch(
        sinkhorn_kernel,
        (B,),
        cost,
        x,
        y,
        a,
        b,
        n_sizes,
        m_sizes,
        sched,
        f,
        g,
        scratch,
        iters,
        err,
        N,
        M,
        D,
        K,
        n_iters,
        tol,
        -1.0 if scores else 1.0,
        power,
        BLOCK_N=bn,
        BLOCK_M=bm,
        SINGLE=single,
        POINTS=points is not None,
        BLOCK_D=bd,
        num_warps=_warps(bn * bm * (bd if points is not None else 1), cost.dtype),
    )


def launch_normalize_pass(sim, col_bias, scale, row_update, row_bias, col_lse):
    L, N, M = sim.shape
    br = tile(sim, "ot.block", 32)
    bm = tile(sim, "ot.block", 128)
    warps = _warps(br * bm, sim.dtype)
    if row_update and N > 0:
        launch(
            normalize_rows_kernel,
            (triton.cdiv(N, br), L),
            sim,
            col_bias,
            row_bias,
            N,
            M,
            scale,
            BLOCK_R=br,
            BLOCK_M=bm,
            num_warps=warps,
        )
    if M > 0:
        launch(
            normalize_cols_kernel,
            (triton.cdiv(M, bm), L),
            sim,
            row_bias,
            col_lse,
            N,
            M,
            scale,
            BLOCK_N=br,
            BLOCK_M=bm,
            num_warps=warps,
        )


# ---- the split path: a few big problems, spread over many programs ---------------------------------------
# One program per problem leaves most of a GPU idle when B is small and the matrices large (one 8192 x 8192).
# There each half-step is its own launch over column or row blocks of every problem, driven by a host loop
# that never reads the device: a per-problem `done` flag in device memory makes converged problems' programs
# return at once.


# The iteration number t and the flags change every launch of the host loop: never specialised.
@triton.jit(do_not_specialize=["t", "N", "D", "n_col_blocks"])
def split_cols_kernel(
    C,
    X,
    Y,
    Bw,
    NS,
    MS,
    F,
    G,
    L,
    ERRP,
    DONE,
    EPS_T,
    t,
    N,
    M,
    D,
    n_col_blocks,
    sign,
    power,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """L_j = LSE_i((f_i - C_ij) / e) for one column block of one problem, and its part of the column error."""
    cb = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    if tl.load(DONE + p) != 0:
        return
    n = tl.load(NS + p).to(tl.int32)  # int32 like N: the loops over n and N share their variables
    m = tl.load(MS + p).to(tl.int32)
    dt = F.dtype.element_ty
    inv = 1.0 / tl.load(EPS_T + t)
    cols = cb * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < m
    ri = tl.arange(0, BLOCK_N)
    mx = tl.full([BLOCK_M], NEG, dtype=dt)
    s = tl.zeros([BLOCK_M], dtype=dt)
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + ri
        rmask = rows < n
        mask = rmask[:, None] & cmask[None, :]
        c = _cost_tile(
            C + p * N * M, X + p * N * D, Y + p * M * D, rows, cols, rmask, cmask, M, D, power, POINTS, BLOCK_D
        )
        fr = tl.load(F + p * N + rows, mask=rmask, other=0.0)
        z = tl.where(mask, fr[:, None] * inv - (sign * inv) * c, float("-inf"))
        bm = tl.maximum(tl.max(z, 0), NEG)
        mx, s = _merge(mx, s, bm, tl.sum(tl.exp(z - bm[None, :]), 0))
    Lc = mx + tl.log(s)
    tl.store(L + p * M + cols, Lc, mask=cmask)
    gc = tl.load(G + p * M + cols, mask=cmask, other=0.0)
    bw = tl.load(Bw + p * M + cols, mask=cmask, other=0.0)
    tl.store(ERRP + p * n_col_blocks + cb, tl.sum(tl.where(cmask, tl.abs(tl.exp(gc * inv + Lc) - bw), 0.0), 0))


@triton.jit(do_not_specialize=["t", "check", "last", "n_col_blocks"])
def split_check_kernel(
    Bw,
    MS,
    G,
    L,
    ERRP,
    DONE,
    ITERS,
    ERR,
    EPS_T,
    M,
    n_col_blocks,
    t,
    tol,
    check,
    last,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Per problem: the column error of this iteration, the stop decision, then g = e (log b - L)."""
    p = tl.program_id(0).to(tl.int64)
    if tl.load(DONE + p) != 0:
        return
    m = tl.load(MS + p)
    dt = G.dtype.element_ty
    e = tl.load(EPS_T + t)
    ks = tl.arange(0, BLOCK_E)
    e_t = tl.zeros([], dtype=dt)
    for k0 in range(0, n_col_blocks, BLOCK_E):
        e_t += tl.sum(tl.load(ERRP + p * n_col_blocks + k0 + ks, mask=k0 + ks < n_col_blocks, other=0.0), 0)
    if check != 0:
        tl.store(ERR + p, e_t)
    if (last != 0) | ((check != 0) & (tol >= 0) & (e_t <= tol)):
        tl.store(DONE + p, 1)
        tl.store(ITERS + p, t)
    else:
        cj = tl.arange(0, BLOCK_M)
        for c0 in range(0, m, BLOCK_M):
            cols = c0 + cj
            cmask = cols < m
            bw = tl.load(Bw + p * M + cols, mask=cmask, other=1.0)
            Lc = tl.load(L + p * M + cols, mask=cmask, other=0.0)
            tl.store(G + p * M + cols, e * (tl.log(bw) - Lc), mask=cmask)


@triton.jit(do_not_specialize=["t", "N", "D"])
def split_rows_kernel(
    C,
    X,
    Y,
    A,
    NS,
    MS,
    F,
    G,
    DONE,
    EPS_T,
    t,
    N,
    M,
    D,
    sign,
    power,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """f_i = e (log a_i - LSE_j((g_j - C_ij) / e)) for one row block of one problem."""
    rb = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    if tl.load(DONE + p) != 0:
        return
    n = tl.load(NS + p).to(tl.int32)  # int32 like N: the loops over n and N share their variables
    m = tl.load(MS + p).to(tl.int32)
    dt = F.dtype.element_ty
    e = tl.load(EPS_T + t)
    inv = 1.0 / e
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    cj = tl.arange(0, BLOCK_M)
    mx = tl.full([BLOCK_N], NEG, dtype=dt)
    s = tl.zeros([BLOCK_N], dtype=dt)
    for c0 in range(0, m, BLOCK_M):
        cols = c0 + cj
        cmask = cols < m
        mask = rmask[:, None] & cmask[None, :]
        c = _cost_tile(
            C + p * N * M, X + p * N * D, Y + p * M * D, rows, cols, rmask, cmask, M, D, power, POINTS, BLOCK_D
        )
        gc = tl.load(G + p * M + cols, mask=cmask, other=0.0)
        z = tl.where(mask, gc[None, :] * inv - (sign * inv) * c, float("-inf"))
        bm = tl.maximum(tl.max(z, 1), NEG)
        mx, s = _merge(mx, s, bm, tl.sum(tl.exp(z - bm[:, None]), 1))
    aw = tl.load(A + p * N + rows, mask=rmask, other=1.0)
    tl.store(F + p * N + rows, e * (tl.log(aw) - (mx + tl.log(s))), mask=rmask)


def use_split(device: torch.device, B: int, N: int, M: int) -> bool:
    """The split path when the batch is too small to fill the device and the problems are large."""
    # (the interpreter's thresholds are small, so that the tests' shapes take this path)
    return B < tile(device, "ot.split_batch_below", 32) and N * M >= tile(device, "ot.split_size_from", 256 * 256)


def launch_sinkhorn_split(
    cost, a, b, n_sizes, m_sizes, eps_t, K, n_iters, tol, scores, f, g, scratch, iters, err, points=None, power=2.0
):
    """The host loop of the split path: 3 launches per iteration, no read of the device. ``eps_t`` [n_iters + 1]
    holds the eps of every iteration (the K epsilon-scaling steps, then eps; the last entry serves the final
    error pass) in the dtype of f, on its device: the caller builds it (without a host sync)."""
    B, N, M = f.shape[0], f.shape[1], g.shape[1]
    bn = tile(cost, "ot.block", 32 if f.dtype == torch.float64 else 64)
    bm = tile(cost, "ot.block", 128)
    if points is not None:
        bn = bm = tile(cost, "ot.block", 32)
    x, y = points if points is not None else (cost, cost)
    D = x.shape[2] if points is not None else 1
    bd = max(2, min(8, triton.next_power_of_2(D)))
    n_cb = triton.cdiv(max(M, 1), bm)
    errp = f.new_zeros(B, n_cb)
    done = torch.where((n_sizes == 0) | (m_sizes == 0), 1, 0).to(torch.int32)
    sign = -1.0 if scores else 1.0
    common = dict(
        BLOCK_N=bn,
        BLOCK_M=bm,
        POINTS=points is not None,
        BLOCK_D=bd,
        num_warps=_warps(bn * bm * (bd if points is not None else 1), f.dtype),
    )
    for t in range(n_iters + 1):
        last = t == n_iters
        check = last or (t > K and tol >= 0)
        launch(
            split_cols_kernel,
            (n_cb, B),
            cost,
            x,
            y,
            b,
            n_sizes,
            m_sizes,
            f,
            g,
            scratch,
            errp,
            done,
            eps_t,
            t,
            N,
            M,
            D,
            n_cb,
            sign,
            power,
            **common,
        )
        launch(
            split_check_kernel,
            (B,),
            b,
            m_sizes,
            g,
            scratch,
            errp,
            done,
            iters,
            err,
            eps_t,
            M,
            n_cb,
            t,
            tol,
            int(check),
            int(last),
            BLOCK_M=bm,
            BLOCK_E=128,
            num_warps=4,
        )
        if not last:
            launch(
                split_rows_kernel,
                (triton.cdiv(max(N, 1), bn), B),
                cost,
                x,
                y,
                a,
                n_sizes,
                m_sizes,
                f,
                g,
                done,
                eps_t,
                t,
                N,
                M,
                D,
                sign,
                power,
                **common,
            )
