"""Triton kernel of the ctc_segmentation family: the package's utterance score.

``utterance_score_kernel``: one program per utterance. score = mean(cp[s:e]) when e - s <= n, else
min(0, min over t in [s, e - n) of mean(cp[t:t+n])), and -1e10 when e <= s. Sums in fp64 (the package's
char_probs are fp64); a block of BLOCK >= n frames holds one window. The tree sum differs from numpy's
pairwise order by a few fp64 ulp; the native op reproduces numpy's order exactly.

The trellis itself has no Triton kernel: its fill is a sequential max-plus scan per column whose fp32
rounding the package's backtrace depends on bit for bit, and the backtrace is a data-dependent walk; a GPU
version would need an associative scan (different rounding, so not the package's segments).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

EMPTY_SCORE = tl.constexpr(
    -10000000000.0
)  # a constexpr (plain globals do not compile): the package's score of an empty span


@triton.jit
def utterance_score_kernel(cp_ptr, starts_ptr, ends_ptr, out_ptr, T, U, window, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = cp_ptr + (pid // U) * T
    s = tl.load(starts_ptr + pid)
    e = tl.load(ends_ptr + pid)
    offs = tl.arange(0, BLOCK)
    span = e - s
    x = tl.load(row + s + offs, mask=offs < span, other=0.0).to(tl.float64)
    short = tl.sum(x, axis=0) / tl.maximum(span, 1).to(tl.float64)
    m = tl.full([], 0.0, tl.float64)  # the package's initial min (not short * 0: NaN for a span with a NaN)
    for t in range(s, e - window):
        w = tl.load(row + t + offs, mask=offs < window, other=0.0).to(tl.float64)
        mean = tl.sum(w, axis=0) / window
        m = tl.where(mean < m, mean, m)  # the package's min(m, mean): a NaN window never wins
    res = tl.where(span <= window, short, m)
    res = tl.where(span <= 0, EMPTY_SCORE, res)
    tl.store(out_ptr + pid, res)


def launch_utterance_score(
    cp: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, window: int, out: torch.Tensor
) -> None:
    """out [B, U] fp64 from cp [B, T] and starts / ends [B, U] (all contiguous)."""
    B, T = cp.shape
    U = starts.shape[1]
    if B * U == 0:
        return
    block = max(16, triton.next_power_of_2(window))
    launch(utterance_score_kernel, (B * U,), cp, starts, ends, out, T, U, window, BLOCK=block)
