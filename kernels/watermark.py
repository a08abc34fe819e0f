"""Triton kernels of the watermark family: KGW logits processing, KGW greedy selection and Gumbel
(Aaronson) sampling fused over the vocabulary. Each program derives its row's hash state from the key and
the context tokens (no host work, no extra launch), then hashes every vocabulary id of its block on the fly
with the 32-bit hash of kernels/metrics.py: the words are bit-identical to the C++ kernels' and the PyTorch
reference's, and no V-sized random tensor exists.

The argmax kernels split each row over several programs (enough programs to fill the GPU at decode batch
sizes), each keeping a per-lane running best (strict >, so a lane keeps its first maximum) and reducing its
lanes to (max, smallest index among the maxima); a [B, splits] reduction in PyTorch then picks the smallest
index holding the row maximum: torch.argmax's first-occurrence rule, under which a NaN beats every number
(the first NaN of a row wins).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from .metrics import combine

BLOCK_V = 1024
SPAN_BLOCKS = 8  # blocks per argmax program: B x ceil(V / (8 * 1024)) programs (64 x 16 for Llama-3)


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


@triton.jit(do_not_specialize=["base"])  # a base of 1 would be a constexpr (no .to())
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
    # A lane's first valid value always counts, so a row of -inf still yields its first index; a NaN replaces
    # any number and is never replaced (no comparison with NaN is true), so a lane keeps its first NaN.
    take = (val > best) | (mask & (best_idx == V)) | ((val != val) & (best == best))
    return tl.where(take, val, best), tl.where(take, v, best_idx)


@triton.jit
def _finish(val_ptr, idx_ptr, slot, best, best_idx, V):
    # tl.max leaves NaN unspecified: lanes holding NaN are found with x != x and win, as in torch.argmax.
    nan = best != best
    any_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    m = tl.max(tl.where(nan, float("-inf"), best), axis=0)
    idx = tl.min(tl.where(tl.where(any_nan, nan, best == m), best_idx, V), axis=0)
    tl.store(val_ptr + slot, tl.where(any_nan, float("nan"), m))
    tl.store(idx_ptr + slot, idx)


@triton.jit(do_not_specialize=["base"])  # a base of 1 would be a constexpr (no .to())
def kgw_argmax_kernel(
    x_ptr, ctx_ptr, val_ptr, idx_ptr, V, h, base, threshold, delta, SPAN: tl.constexpr, BLOCK: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    state = _row_state(ctx_ptr, b, h, base)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], V, tl.int64)
    for start in range(0, SPAN, BLOCK):
        v = s.to(tl.int64) * SPAN + start + tl.arange(0, BLOCK).to(tl.int64)
        mask = v < V
        x = tl.load(x_ptr + b * V + v, mask=mask, other=float("-inf")).to(tl.float32)
        green = combine(state, v.to(tl.uint32)).to(tl.int64) < threshold
        val = tl.where(mask, x + tl.where(green, tl.full([], delta, tl.float32), 0.0), float("-inf"))
        best, best_idx = _fold(val, v, mask, best, best_idx, V)
    _finish(val_ptr, idx_ptr, b * tl.num_programs(1) + s, best, best_idx, V)


@triton.jit(do_not_specialize=["base"])  # a base of 1 would be a constexpr (no .to())
def gumbel_argmax_kernel(
    x_ptr, ctx_ptr, val_ptr, idx_ptr, V, h, base, inv_temperature, SPAN: tl.constexpr, BLOCK: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    state = _row_state(ctx_ptr, b, h, base)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], V, tl.int64)
    for start in range(0, SPAN, BLOCK):
        v = s.to(tl.int64) * SPAN + start + tl.arange(0, BLOCK).to(tl.int64)
        mask = v < V
        x = tl.load(x_ptr + b * V + v, mask=mask, other=float("-inf")).to(tl.float32)
        u = _unit_float(combine(state, v.to(tl.uint32)))
        # argmax u^(1/p) = argmax logit / T - log(-log u): see alignops.watermark.
        val = tl.where(mask, x * tl.full([], inv_temperature, tl.float32) - tl.log(-tl.log(u)), float("-inf"))
        best, best_idx = _fold(val, v, mask, best, best_idx, V)
    _finish(val_ptr, idx_ptr, b * tl.num_programs(1) + s, best, best_idx, V)


def _block(V: int) -> int:
    return max(16, min(BLOCK_V, triton.next_power_of_2(V))) if isinstance(V, int) else BLOCK_V


def launch_kgw_logits(x, ctx, out, base: int, threshold: int, delta: float) -> None:
    B, V = x.shape
    block = _block(V)
    launch(
        kgw_logits_kernel,
        (B, triton.cdiv(V, block)),
        x,
        ctx,
        out,
        V,
        ctx.shape[1],
        base,
        threshold,
        delta,
        BLOCK=block,
        num_warps=4,
    )


def _split(V) -> tuple[int, int, int]:
    """(block, span, splits): each program scans ``span`` entries (a multiple of the block) of one row. A
    symbolic V (a dynamic shape under torch.compile) gets the largest span."""
    block = _block(V)
    span = block * (min(SPAN_BLOCKS, triton.cdiv(V, block)) if isinstance(V, int) else SPAN_BLOCKS)
    return block, span, triton.cdiv(V, span)


def _reduce(vals: torch.Tensor, idxs: torch.Tensor, out: torch.Tensor, V) -> None:
    """out[b] = the smallest index among the splits holding the row maximum (first occurrence), or among the
    splits holding a NaN (amax propagates it, so then nothing equals m): torch.argmax's rule."""
    m = vals.amax(-1, keepdim=True)
    first = torch.where((vals == m) | vals.isnan(), idxs, V).amin(-1)
    out.copy_(torch.where(first == V, 0, first))


def _launch_split_argmax(kernel, x, ctx, out, *scalars) -> None:
    """The split argmax of the kgw / gumbel kernels: each of ``splits`` programs per row scores a span of the
    vocabulary (``scalars`` are the kernel's own), then _reduce picks the first maximum of the spans'."""
    B, V = x.shape
    block, span, splits = _split(V)
    vals = x.new_empty((B, splits), dtype=torch.float32)
    idxs = x.new_empty((B, splits), dtype=torch.int64)
    launch(kernel, (B, splits), x, ctx, vals, idxs, V, ctx.shape[1], *scalars, SPAN=span, BLOCK=block, num_warps=4)
    _reduce(vals, idxs, out, V)


def launch_kgw_argmax(x, ctx, out, base: int, threshold: int, delta: float) -> None:
    _launch_split_argmax(kgw_argmax_kernel, x, ctx, out, base, threshold, delta)


def launch_gumbel_argmax(x, ctx, out, base: int, inv_temperature: float) -> None:
    _launch_split_argmax(gumbel_argmax_kernel, x, ctx, out, base, inv_temperature)
