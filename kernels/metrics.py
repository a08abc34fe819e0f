"""Triton kernels of the metrics family: the counter-based hash (bit-identical to csrc/common/counter_hash.h,
32-bit integer ops only) and the bootstrap confusion matrices of ``alignops::bootstrap_confusion_triton``.

One program per (rater pair, resample): it walks the N draws of its resample in blocks, hashing each draw's
item index on the fly (no [R, N] index tensor), gathers both labels and adds the one-hot of the code
a * C + b into a [C * C] counter vector. Counts are int32, so results are exact and equal the C++ kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

MAX_CLASSES = 16  # the one-hot tile is [BLOCK_N, C * C]
BLOCK_N = 256


@triton.jit
def mix32(x):
    """lowbias32 on uint32 tensors."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def combine(h, x):
    """mix32(h ^ mix32(x)) on uint32."""
    return mix32(h ^ mix32(x))


@triton.jit
def bounded(h, n):
    """floor(h * n / 2^32) for uint32 h and a uint64 n: an index in [0, n)."""
    return ((h.to(tl.uint64) * n) >> 32).to(tl.int64)


# Never specialised: a value of 1 would turn them into constexprs, which have no .to().
@triton.jit(do_not_specialize=["N", "state"])
def bootstrap_confusion_kernel(
    a_ptr, b_ptr, out_ptr, N, R1, stride_b, state, C: tl.constexpr, CC_BLOCK: tl.constexpr, BLOCK: tl.constexpr
):
    # one flat grid axis (2^31 - 1 programs): grid.y and grid.z allow only 65535 resamples or pairs
    pid = tl.program_id(0).to(tl.int64)
    p = pid // R1
    r = (pid % R1).to(tl.int32)
    hr = combine(state.to(tl.uint32), r.to(tl.uint32))
    k = tl.arange(0, CC_BLOCK)
    counts = tl.zeros([CC_BLOCK], dtype=tl.int32)
    n = tl.full([BLOCK], N, tl.uint64)
    for start in range(0, N, BLOCK):
        j = start + tl.arange(0, BLOCK)
        valid = j < N
        drawn = bounded(combine(hr, j.to(tl.uint32)), n)
        item = tl.where(r == 0, j.to(tl.int64), drawn)
        la = tl.load(a_ptr + p * N + item, mask=valid, other=0)
        lb = tl.load(b_ptr + p * stride_b + item, mask=valid, other=0)
        code = tl.where(valid, la * C + lb, -1)
        counts += tl.sum((code[:, None] == k[None, :]).to(tl.int32), axis=0)
    tl.store(out_ptr + (p * R1 + r) * (C * C) + k, counts, mask=k < C * C)


def launch_bootstrap_confusion(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, num_classes: int, state: int
) -> None:
    """a [P, N] int64, b [P or 1, N] int64 (contiguous), out [P, R + 1, C, C] int32; state the seed's hash state."""
    P, N = a.shape
    R1 = out.shape[1]
    stride_b = 0 if b.shape[0] == 1 else N
    cc_block = max(16, triton.next_power_of_2(num_classes * num_classes))
    # the kernel reads only the low 32 bits: passed as a signed int32 with those bits, since an int argument
    # of 2^31 or more becomes int64 and broke Inductor's launcher on torch 2.11 ("'int' object has no
    # attribute 'xreplace'")
    state32 = (int(state) & 0xFFFFFFFF) - ((int(state) & 0x80000000) << 1)
    launch(
        bootstrap_confusion_kernel,
        (P * R1,),
        a,
        b,
        out,
        N,
        R1,
        stride_b,
        state32,
        C=num_classes,
        CC_BLOCK=cc_block,
        BLOCK=BLOCK_N,
        num_warps=4,
    )
