"""Triton kernels of the watermark family: KGW logits processing, KGW greedy selection and Gumbel
(Aaronson) sampling fused over the vocabulary. Each program derives its row's hash state from the key and
the context tokens (no host work, no extra launch), then hashes every vocabulary id of its block on the fly
with the 32-bit hash of kernels/metrics.py: the words are bit-identical to the C++ kernels' and the PyTorch
reference's, and no V-sized random tensor exists.

The argmax kernels run one program per row over the whole vocabulary, keeping a per-lane running best
(strict >, so a lane keeps its first maximum) and reducing the lanes at the end to the smallest index among
the maxima: torch.argmax's first-occurrence rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .metrics import combine

BLOCK_V = 1024


@triton.jit
def _row_state(ctx_ptr, b, h, base):
    state = base.to(tl.uint32)
    for j in range(0, h):
        tok = tl.load(ctx_ptr + b * h + j)
        state = combine(state, tok.to(tl.uint32))
    return state


@triton.jit
def _unit_float(w):
    return ((w >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def kgw_logits_kernel(x_ptr, ctx_ptr, out_ptr, V, h, base, threshold, delta, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = v < V
    state = _row_state(ctx_ptr, b, h, base)
    green = combine(state, v.to(tl.uint32)).to(tl.int64) < threshold
    x = tl.load(x_ptr + b * V + v, mask=mask, other=0.0)
    acc = x.to(tl.float64) if x.dtype == tl.float64 else x.to(tl.float32)
    y = acc + tl.where(green, tl.full([], delta, tl.float32).to(acc.dtype), 0.0)
    if x.dtype == tl.float32 or x.dtype == tl.float64:
        tl.store(out_ptr + b * V + v, y.to(x.dtype), mask=mask)
    else:  # round to nearest even, as the CPU kernel and torch (the interpreter's default cast truncates)
        tl.store(out_ptr + b * V + v, y.to(x.dtype, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _fold(val, v, mask, best, best_idx, V):
    # A lane's first valid value always counts, so a row of -inf still yields its first index.
    take = (val > best) | (mask & (best_idx == V))
    return tl.where(take, val, best), tl.where(take, v, best_idx)


@triton.jit
def _finish(out_ptr, b, best, best_idx, V):
    m = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == m, best_idx, V), axis=0)
    tl.store(out_ptr + b, tl.where(idx == V, 0, idx))


@triton.jit
def kgw_argmax_kernel(x_ptr, ctx_ptr, out_ptr, V, h, base, threshold, delta, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    state = _row_state(ctx_ptr, b, h, base)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], V, tl.int64)
    for start in range(0, V, BLOCK):
        v = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = v < V
        x = tl.load(x_ptr + b * V + v, mask=mask, other=float("-inf")).to(tl.float32)
        green = combine(state, v.to(tl.uint32)).to(tl.int64) < threshold
        val = tl.where(mask, x + tl.where(green, tl.full([], delta, tl.float32), 0.0), float("-inf"))
        best, best_idx = _fold(val, v, mask, best, best_idx, V)
    _finish(out_ptr, b, best, best_idx, V)


@triton.jit
def gumbel_argmax_kernel(x_ptr, ctx_ptr, out_ptr, V, h, base, inv_temperature, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    state = _row_state(ctx_ptr, b, h, base)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], V, tl.int64)
    for start in range(0, V, BLOCK):
        v = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = v < V
        x = tl.load(x_ptr + b * V + v, mask=mask, other=float("-inf")).to(tl.float32)
        u = _unit_float(combine(state, v.to(tl.uint32)))
        # argmax u^(1/p) = argmax logit / T - log(-log u): see alignops.watermark.gumbel_sample.
        val = tl.where(mask, x * tl.full([], inv_temperature, tl.float32) - tl.log(-tl.log(u)), float("-inf"))
        best, best_idx = _fold(val, v, mask, best, best_idx, V)
    _finish(out_ptr, b, best, best_idx, V)


def _block(V: int) -> int:
    return max(16, min(BLOCK_V, triton.next_power_of_2(V))) if isinstance(V, int) else BLOCK_V


def launch_kgw_logits(x, ctx, out, base: int, threshold: int, delta: float) -> None:
    B, V = x.shape
    block = _block(V)
    wrap_triton(kgw_logits_kernel)[(B, triton.cdiv(V, block))](x, ctx, out, V, ctx.shape[1], base, threshold,
                                                               delta, BLOCK=block, num_warps=4)


def launch_kgw_argmax(x, ctx, out, base: int, threshold: int, delta: float) -> None:
    B, V = x.shape
    wrap_triton(kgw_argmax_kernel)[(B,)](x, ctx, out, V, ctx.shape[1], base, threshold, delta,
                                         BLOCK=_block(V), num_warps=4)


def launch_gumbel_argmax(x, ctx, out, base: int, inv_temperature: float) -> None:
    B, V = x.shape
    wrap_triton(gumbel_argmax_kernel)[(B,)](x, ctx, out, V, ctx.shape[1], base, inv_temperature,
                                            BLOCK=_block(V), num_warps=4)
