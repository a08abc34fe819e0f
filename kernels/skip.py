"""Triton kernels of the skip family and their launch helpers.

``alignops::skip_ffn_triton`` (python/alignops/ops/skip.py) runs y = x + FFN(RMSNorm(x)) on the kept
rows only, in four or five launches and without a host sync: the number of kept rows, ``count``, lives in
device memory and every kernel after the compaction reads it there. Buffers are sized by the capacity N
(all rows), so no shape depends on ``keep``; programs whose rows lie at or beyond ``count`` return at once.

1. ``keep_count_kernel`` (only when N spans several blocks): kept rows per block of ``keep``.
2. ``compact_kernel``: ``index[:count]`` the kept rows ascending, -1 after them, and ``count``. Each
   block's offset is the sum of the counts of the blocks before it, read from step 1.
3. ``gather_rms_norm_kernel`` (only with a norm weight): xn[r] = RMSNorm(x[index[r]]) for r < count, with
   HF LlamaRMSNorm's rounding; rstd[r] when saved (0 for r >= count). Without a norm weight the GEMM
   gathers x directly.
4. ``ffn_up_kernel``: act[r] = act(xn[r] @ w_gate_up^T + b_gate_up) for r < count, the activation fused in
   the epilogue; SwiGLU computes the gate and the up tile of the same columns in one program. The saved
   pre-activations are 0 for r >= count: the tiles past count write those zeros and nothing else.
5. ``ffn_down_kernel``: y[index[r]] = x[index[r]] + (act[r] @ w_down^T + b_down) for r < count, scattered
   into y, which holds a copy of x: the skipped rows are x bit for bit.

Precision. The GEMMs accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use IEEE products (no TF32).
Values are rounded to the input dtype where the PyTorch reference rounds them: the normalised row before
the weight multiplies it, the pre-activation (GEMM output plus bias), the activation (computed in fp32 from
the rounded pre-activation, rounded once), the down projection, and the residual sum.

On CPU tensors (the Triton interpreter) the tiles are 16 wide, so that small test shapes cover several
tiles in every dimension, and bf16 tiles are widened to fp32 before ``tl.dot``, whose interpreter version
multiplies the raw bf16 bits. Products of bf16 values are exact in fp32, so the widened dot is the GPU's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._codes import Activation, Criterion
from ._launch import INTERPRETER_TILES, interpreter_upcasts_bf16, interpreting, launch
from .preference import launch_config

# alignops._codes as constexpr globals (a plain module global is a NameError for the compiler)
SWIGLU = tl.constexpr(int(Activation.SWIGLU))
GELU = tl.constexpr(int(Activation.GELU))
COSINE = tl.constexpr(int(Criterion.COSINE))

# ---- block sizes ------------------------------------------------------------------------------------

MAX_BLOCK_ROWS = 4096  # rows of `keep` per compaction program
MAX_BLOCK_H = 4096  # hidden entries per step of the RMSNorm row loops


class GemmBlocks(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


class SkipBlocks(NamedTuple):
    rows: int  # compaction block
    rows_warps: int
    hidden: int  # RMSNorm block
    hidden_warps: int
    up: GemmBlocks  # [rows, I] <- [rows, H] x [H, I] (x2 for SwiGLU)
    down: GemmBlocks  # [rows, H] <- [rows, I] x [I, H]


def _clamp(n, block: int) -> int:
    # A symbolic n (a dynamic shape under torch.compile) keeps the largest block, as launch_config does.
    return max(16, min(block, triton.next_power_of_2(n))) if isinstance(n, int) else block


def _gemm_blocks(dtype: torch.dtype, n_rows, n_cols, k, n_operands: int) -> GemmBlocks:
    if dtype in (torch.float16, torch.bfloat16):  # tensor cores
        bm, bn, bk, warps, stages = 128, 128 // n_operands, 64, 8, 3
    elif dtype == torch.float32:  # IEEE fp32: FMA, smaller tiles
        bm, bn, bk, warps, stages = 64, 64 // n_operands, 32, 4, 2
    else:  # fp64
        bm, bn, bk, warps, stages = 64, 32, 16, 4, 2
    bm, bn, bk = _clamp(n_rows, bm), _clamp(n_cols, bn), _clamp(k, bk)
    return GemmBlocks(bm, bn, bk, 8, warps if bm * bn * n_operands >= 128 * 128 else 4, stages)


def skip_blocks(device: torch.device, dtype: torch.dtype, N, H, I, activation: int) -> SkipBlocks:
    """Every block size of skip_ffn's kernels, from the capacity N, the hidden size H and the FFN width I."""
    if interpreting(device):  # every tile at the interpreter's size, to exercise the tile edges in tests
        b = INTERPRETER_TILES["skip.block"]
        gemm = GemmBlocks(b, b, b, 2, 1, 1)
        return SkipBlocks(b, 1, b, 1, gemm, gemm)
    rows, rows_warps = launch_config(N, MAX_BLOCK_ROWS)
    hidden, hidden_warps = launch_config(H, MAX_BLOCK_H)
    up = _gemm_blocks(dtype, N, I, H, 2 if activation == Activation.SWIGLU else 1)
    down = _gemm_blocks(dtype, N, H, I, 1)
    return SkipBlocks(rows, rows_warps, hidden, hidden_warps, up, down)


# ---- compaction -----------------------------------------------------------------------------------------


@triton.jit
def keep_count_kernel(keep_ptr, partial_ptr, N, BLOCK: tl.constexpr):
    """partial[b] = number of kept rows in block b of ``keep`` (uint8 view of the bool mask)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(keep_ptr + offs, mask=offs < N, other=0).to(tl.int32)
    tl.store(partial_ptr + pid, tl.sum(k, axis=0).to(tl.int64))


@triton.jit
def compact_kernel(
    keep_ptr,
    partial_ptr,
    index_ptr,
    count_ptr,
    N,
    num_blocks,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Block b writes its kept rows to index[kept rows before them] and -1 to index[count + skipped rows
    before them], so that index is fully written, as by the native op. Program 0 writes count. SINGLE: one
    block, which counts itself (no partial sums)."""
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid.to(tl.int64) * BLOCK + lane
    mask = offs < N
    k = tl.load(keep_ptr + offs, mask=mask, other=0).to(tl.int32)
    kept_incl = tl.cumsum(k, axis=0)
    if SINGLE:
        total = tl.sum(k, axis=0).to(tl.int64)
        before = tl.full([], 0, tl.int64)
    else:
        # The counts of all blocks, and of the blocks before this one: O(num_blocks) loads per program,
        # a few hundred for a million rows.
        total = tl.full([], 0, tl.int64)
        before = tl.full([], 0, tl.int64)
        for start in range(0, num_blocks, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            c = tl.load(partial_ptr + p, mask=p < num_blocks, other=0)
            total += tl.sum(c, axis=0)
            before += tl.sum(tl.where(p < pid, c, 0), axis=0)
    kept_pos = before + kept_incl.to(tl.int64) - 1
    skipped_before = pid.to(tl.int64) * BLOCK - before
    skipped_pos = total + skipped_before + (lane + 1 - kept_incl).to(tl.int64) - 1
    kept = k != 0
    tl.store(index_ptr + tl.where(kept, kept_pos, skipped_pos), tl.where(kept, offs, -1), mask=mask)
    if pid == 0:
        tl.store(count_ptr, total)


# ---- RMSNorm of the kept rows ---------------------------------------------------------------------------


@triton.jit
def gather_rms_norm_kernel(
    x_ptr,
    index_ptr,
    count_ptr,
    w_ptr,
    out_ptr,
    rstd_ptr,
    H,
    eps: tl.float64,
    SAVE_RSTD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program r < count: out[r] = w * (x_f * rstd).to(dtype), rstd = rsqrt(mean(x_f^2) + eps) for the row
    x[index[r]], x_f in the accumulation dtype (HF LlamaRMSNorm). Programs r >= count write rstd = 0."""
    r = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr)
    if r >= count:
        if SAVE_RSTD:
            tl.store(rstd_ptr + r, tl.zeros([], rstd_ptr.dtype.element_ty))
        return
    DT = out_ptr.dtype.element_ty
    ACC = rstd_ptr.dtype.element_ty
    row_ptr = x_ptr + tl.load(index_ptr + r) * H
    ss = tl.zeros([BLOCK_H], ACC)
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        v = tl.load(row_ptr + offs, mask=offs < H, other=0).to(ACC)
        ss += v * v
    # Not tl.rsqrt: on NVIDIA GPUs it is the approximate instruction, far from fp64-grade; fp64 sqrt and
    # division are correctly rounded (fp32 ones are within 2 ulp).
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / H + tl.full([], eps, ACC))
    if SAVE_RSTD:
        tl.store(rstd_ptr + r, rstd)
    out_row = out_ptr + r * H
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < H
        v = tl.load(row_ptr + offs, mask=mask, other=0).to(ACC)
        w = tl.load(w_ptr + offs, mask=mask, other=0).to(ACC)
        n = (v * rstd).to(DT).to(ACC)
        tl.store(out_row + offs, (w * n).to(DT), mask=mask)


# ---- residual add + change criterion ------------------------------------------------------------------------


@triton.jit
def add_score_kernel(r_ptr, d_ptr, h_ptr, score_ptr, H, CRITERION: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program n: h[n] = (r[n] + d[n]).to(dtype) and score[n] = 1 - cos(h, r) (CRITERION 0) or
    |h - r| / |r| (1), from sums in the score dtype over the rounded h (what the FFN then sees)."""
    n = tl.program_id(0).to(tl.int64)
    DT = h_ptr.dtype.element_ty
    ACC = score_ptr.dtype.element_ty
    hr = tl.zeros([BLOCK_H], ACC)
    hh = tl.zeros([BLOCK_H], ACC)
    rr = tl.zeros([BLOCK_H], ACC)
    dd = tl.zeros([BLOCK_H], ACC)
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < H
        r = tl.load(r_ptr + n * H + offs, mask=mask, other=0).to(ACC)
        d = tl.load(d_ptr + n * H + offs, mask=mask, other=0).to(ACC)
        h = (r + d).to(DT)
        tl.store(h_ptr + n * H + offs, h, mask=mask)
        hf = h.to(ACC)
        hr += hf * r
        hh += hf * hf
        rr += r * r
        dd += (hf - r) * (hf - r)
    eps = tl.full([], 1e-12, ACC)
    nr = tl.maximum(tl.sqrt(tl.sum(rr, axis=0)), eps)
    if CRITERION == COSINE:
        score = 1 - tl.sum(hr, axis=0) / (tl.maximum(tl.sqrt(tl.sum(hh, axis=0)), eps) * nr)
    else:
        score = tl.sqrt(tl.sum(dd, axis=0)) / nr
    tl.store(score_ptr + n, score)


# ---- the two GEMMs ------------------------------------------------------------------------------------------


@triton.jit
def _live_tile(count, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n, live) for this program of a grid over all cdiv(N, BLOCK_M) x cdiv(n_cols, BLOCK_N)
    tiles: the live tiles cover rows [0, count) and come first in launch order, GROUP_M row tiles at a time
    (the column tiles of a group share the weight tiles in L2); the dead tiles, rows past count, follow."""
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = tl.cdiv(count, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    num_live = num_pid_m * num_pid_n
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.maximum(tl.minimum(num_pid_m - first_m, GROUP_M), 1)
    live = pid < num_live
    dead = pid - num_live
    pid_m = tl.where(live, first_m + (pid % per_group) % group_m, num_pid_m + dead // num_pid_n)
    pid_n = tl.where(live, (pid % per_group) // group_m, dead % num_pid_n)
    return pid_m, pid_n, live


@triton.jit
def _acc_dot(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # out_dtype: an fp64 accumulator is rejected without it before Triton 3.8
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def ffn_up_kernel(
    a_ptr,  # [N, H]: xn (rows r), or x itself (rows index[r]) when GATHER
    index_ptr,
    count_ptr,  # [N] int64, [1] int64
    w_ptr,  # [G, H], G = 2I (gate rows, then up rows) for SwiGLU, else I
    b_ptr,  # [G]; read only when HAS_BIAS
    act_ptr,  # [N, I] in x's dtype: rows [0, count) written
    pre_ptr,  # [N, G] in x's dtype, written when SAVE_PRE: rows [0, count), zeros after
    N,
    H,
    I,
    ACTIVATION: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of act = act(a @ w^T + b) over the rows r < count; SwiGLU accumulates the
    gate columns j and the up columns I + j of the same tile side by side. A tile past count writes zero
    pre-activations when SAVE_PRE, and nothing else."""
    count = tl.load(count_ptr)
    pid_m, pid_n, live = _live_tile(count, I, BLOCK_M, BLOCK_N, GROUP_M)
    DT = act_ptr.dtype.element_ty
    SWI: tl.constexpr = ACTIVATION == SWIGLU
    G = 2 * I if SWI else I
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    pre_ptrs = pre_ptr + offs_m[:, None] * G + offs_n[None, :]
    pre_mask = (offs_m < N)[:, None] & n_mask[None, :]
    if not live:
        if SAVE_PRE:
            zero = tl.zeros([BLOCK_M, BLOCK_N], DT)
            tl.store(pre_ptrs, zero, mask=pre_mask)
            if SWI:
                tl.store(pre_ptrs + I, zero, mask=pre_mask)
        return
    if DT == tl.float64:
        ACC = tl.float64
    else:
        ACC = tl.float32

    m_mask = offs_m < count
    if GATHER:
        rows = tl.load(index_ptr + offs_m, mask=m_mask, other=0)
    else:
        rows = offs_m
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * H + offs_k[None, :]
    g_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * H + offs_k[:, None]
    u_ptrs = w_ptr + (offs_n[None, :].to(tl.int64) + I) * H + offs_k[:, None]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc_g = _acc_dot(a, tl.load(g_ptrs, mask=w_mask, other=0), acc_g, UPCAST, INPUT_PRECISION)
        if SWI:
            acc_u = _acc_dot(a, tl.load(u_ptrs, mask=w_mask, other=0), acc_u, UPCAST, INPUT_PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(ACC)[None, :]
    gate = acc_g.to(DT)
    # The rows of the last live tile past count get their zeros here.
    if SAVE_PRE:
        tl.store(pre_ptrs, tl.where(m_mask[:, None], gate, 0), mask=pre_mask)
    g = gate.to(ACC)
    if SWI:
        if HAS_BIAS:
            acc_u += tl.load(b_ptr + I + offs_n, mask=n_mask, other=0).to(ACC)[None, :]
        up = acc_u.to(DT)
        if SAVE_PRE:
            tl.store(pre_ptrs + I, tl.where(m_mask[:, None], up, 0), mask=pre_mask)
        act = g / (1 + tl.exp(-g)) * up.to(ACC)
    elif ACTIVATION == GELU:
        act = 0.5 * g * (1 + tl.erf(g * 0.7071067811865476))
    else:
        # 0.5 g (1 + tanh(z)) = g sigmoid(2z), z = sqrt(2 / pi) (g + 0.044715 g^3): no tanh, no cancellation.
        act = g / (1 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
    tl.store(act_ptr + offs_m[:, None] * I + offs_n[None, :], act.to(DT), mask=out_mask)


@triton.jit
def ffn_down_kernel(
    act_ptr,  # [N, I]: rows [0, count) valid
    index_ptr,
    count_ptr,  # [N] int64, [1] int64
    w_ptr,  # [H, I]
    b_ptr,  # [H]; read only when HAS_BIAS
    x_ptr,
    y_ptr,  # [N, H]; y holds a copy of x, its rows index[r < count] are overwritten
    H,
    I,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y[index[r]] = x[index[r]] + (act[r] @ w^T + b) over the rows r < count."""
    count = tl.load(count_ptr)
    pid_m, pid_n, live = _live_tile(count, H, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    DT = y_ptr.dtype.element_ty
    if DT == tl.float64:
        ACC = tl.float64
    else:
        ACC = tl.float32

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m[:, None] * I + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * I + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k in range(0, I, BLOCK_K):
        k_mask = offs_k < I - k
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = _acc_dot(a, w, acc, UPCAST, INPUT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(ACC)[None, :]
    delta = acc.to(DT).to(ACC)
    out_mask = m_mask[:, None] & n_mask[None, :]
    dst = tl.load(index_ptr + offs_m, mask=m_mask, other=0)
    offs = dst[:, None] * H + offs_n[None, :]
    x = tl.load(x_ptr + offs, mask=out_mask, other=0).to(ACC)
    tl.store(y_ptr + offs, (x + delta).to(DT), mask=out_mask)


# ---- launch ------------------------------------------------------------------------------------------------


def _gemm_options(dtype: torch.dtype, device: torch.device, blocks: GemmBlocks) -> dict:
    return dict(
        UPCAST=interpreter_upcasts_bf16(device, dtype),
        INPUT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        BLOCK_M=blocks.BLOCK_M,
        BLOCK_N=blocks.BLOCK_N,
        BLOCK_K=blocks.BLOCK_K,
        GROUP_M=blocks.GROUP_M,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )


def launch_skip_ffn(
    x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps, y, index, count, rstd, pre_act, xn, act
):
    """Launch the skip_ffn pipeline on contiguous inputs and preallocated buffers: ``y`` a copy of x [N, H],
    ``index`` [N] int64, ``count`` [1] int64, ``rstd`` [N] (or empty: not saved), ``pre_act`` [N, G] (or
    [0, G]: not saved), ``xn`` [N, H] (used only with ``norm_weight``), ``act`` [N, I]. ``keep`` is the
    [N] mask viewed as uint8. Optional inputs are None."""
    N, H = x.shape
    I = act.shape[1]
    blocks = skip_blocks(x.device, x.dtype, N, H, I, activation)

    num_blocks = triton.cdiv(N, blocks.rows)
    partial = index.new_empty(num_blocks)
    if num_blocks > 1:
        launch(keep_count_kernel, (num_blocks,), keep, partial, N, BLOCK=blocks.rows, num_warps=blocks.rows_warps)
    block_p, _ = launch_config(num_blocks, 1024)
    launch(
        compact_kernel,
        (num_blocks,),
        keep,
        partial,
        index,
        count,
        N,
        num_blocks,
        BLOCK=blocks.rows,
        BLOCK_P=block_p,
        SINGLE=num_blocks == 1,
        num_warps=blocks.rows_warps,
    )

    if norm_weight is not None:
        launch(
            gather_rms_norm_kernel,
            (N,),
            x,
            index,
            count,
            norm_weight,
            xn,
            rstd,
            H,
            float(eps),
            SAVE_RSTD=rstd.numel() > 0,
            BLOCK_H=blocks.hidden,
            num_warps=blocks.hidden_warps,
        )

    up, down = blocks.up, blocks.down
    if I > 0:
        grid = (triton.cdiv(N, up.BLOCK_M) * triton.cdiv(I, up.BLOCK_N),)
        launch(
            ffn_up_kernel,
            grid,
            x if norm_weight is None else xn,
            index,
            count,
            w_gate_up,
            w_gate_up if b_gate_up is None else b_gate_up,
            act,
            pre_act,
            N,
            H,
            I,
            ACTIVATION=int(activation),
            GATHER=norm_weight is None,
            HAS_BIAS=b_gate_up is not None,
            SAVE_PRE=pre_act.numel() > 0,
            **_gemm_options(x.dtype, x.device, up),
        )
    if H > 0:
        grid = (triton.cdiv(N, down.BLOCK_M) * triton.cdiv(H, down.BLOCK_N),)
        launch(
            ffn_down_kernel,
            grid,
            act,
            index,
            count,
            w_down,
            w_down if b_down is None else b_down,
            x,
            y,
            H,
            I,
            HAS_BIAS=b_down is not None,
            **_gemm_options(x.dtype, x.device, down),
        )


def launch_add_score(residual, delta, criterion: int, h, score):
    """h = residual + delta and the per-row change criterion, on contiguous [N, H] tensors."""
    N, H = residual.shape
    if N == 0:
        return
    blocks = skip_blocks(residual.device, residual.dtype, N, H, 1, Activation.SWIGLU)
    launch(
        add_score_kernel,
        (N,),
        residual,
        delta,
        h,
        score,
        H,
        CRITERION=int(criterion),
        BLOCK_H=blocks.hidden,
        num_warps=blocks.hidden_warps,
    )
