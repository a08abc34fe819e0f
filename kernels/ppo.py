"""Triton kernel of the ppo family: GAE as one reverse scan per row. Each program owns BLOCK_B rows and walks
t = T-1 .. 0, loading one element of each of its rows per step (the scan is sequential in t; the rows are
the parallelism). The running advantage and next value stay in registers in fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._launch import launch, tile


@triton.jit
def gae_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    last_ptr,
    adv_ptr,
    ret_ptr,
    B,
    T,
    gamma_hi,
    gamma_lo,
    gl_hi,
    gl_lo,
    HAS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    base = rows * T
    # The accumulator's dtype comes as a bool constexpr (fp64 or fp32), not a tl.dtype: the compile gate's launch
    # capture writes every argument as JSON.
    if FP64:
        gae = tl.zeros([BLOCK_B], dtype=tl.float64)
    else:
        gae = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_LAST:
        next_value = tl.load(last_ptr + rows, mask=live, other=0.0).to(gae.dtype)
    else:
        next_value = gae
    # Float arguments reach a kernel as fp32: gamma and gamma * lam come as two fp32 parts each, summed in ACC,
    # so that fp64 inputs get gamma to ~48 bits instead of 24.
    gamma = gae + gamma_hi + gamma_lo
    gamma_lam = gae + gl_hi + gl_lo
    for i in range(0, T):
        offs = base + (T - 1 - i)
        keep = tl.load(m_ptr + offs, mask=live, other=0) != 0
        r = tl.load(r_ptr + offs, mask=live, other=0.0).to(gae.dtype)
        v = tl.load(v_ptr + offs, mask=live, other=0.0).to(gae.dtype)
        # A position outside the mask ends the episode: A = R = 0 there, no bootstrap into the one before.
        gae = tl.where(keep, r + gamma * next_value - v + gamma_lam * gae, 0.0)
        next_value = tl.where(keep, v, 0.0)
        tl.store(adv_ptr + offs, gae.to(adv_ptr.dtype.element_ty), mask=live)
        tl.store(ret_ptr + offs, tl.where(keep, gae + v, 0.0).to(ret_ptr.dtype.element_ty), mask=live)


def launch_gae(
    r: torch.Tensor,
    v: torch.Tensor,
    m: torch.Tensor,
    last: torch.Tensor | None,
    adv: torch.Tensor,
    ret: torch.Tensor,
    gamma: float,
    lam: float,
) -> None:
    """r, v, adv, ret [B, T] contiguous of one float dtype; m [B, T] uint8 (the bool mask's bytes); last [B]."""
    B, T = r.shape
    # 32 rows per program: one row per lane of a single warp, so B / 32 programs fill the GPU from B ~ 4k rows
    # on (the rows are the only parallelism).
    block = tile(r, "ppo.block_rows", 32)
    launch(
        gae_kernel,
        (triton.cdiv(B, block),),
        r,
        v,
        m,
        last if last is not None else r,
        adv,
        ret,
        B,
        T,
        *_split_fp32(gamma),
        *_split_fp32(gamma * lam),
        HAS_LAST=last is not None,
        FP64=r.dtype == torch.float64,
        BLOCK_B=block,
        num_warps=1,
    )


def _split_fp32(x: float) -> tuple[float, float]:
    """(hi, lo), both exact in fp32, with hi + lo = x to about 48 bits."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]
