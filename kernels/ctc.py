"""Triton kernel of ctc_posteriors (``alignops::ctc_posteriors_triton``, python/alignops/ops/ctc_posteriors.py).

One program per utterance; the time loop runs inside the kernel and the 2L+1 states of a frame are
processed in chunks of BLOCK_S across the block. A step reads the neighbours s - 1, s - 2 (alpha) or s + 1,
s + 2 (beta) of the previous frame, which other chunks and threads wrote, so each frame lives in global
memory and a block barrier separates frames.

Precision and memory: alpha and beta are log-domain fp64 whatever the input dtype, as on the CPU. The
forward pass stores log-alpha for every frame ([B, T, 2L+1] fp64 scratch, 8 bytes per cell: T = 45000,
L = 13500 needs 9.7 GB); the backward pass keeps beta + emission of one frame in a two-row ring
([B, 2, 2L+1]) and writes the occupancy gamma [B, T, 2L+1] (fp32, fp64 for fp64 inputs) as it goes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, tile
from .preference import launch_config


@triton.jit
def _lse3(a, b, c):
    # Shifting by 0 when all three are -inf gives log(0) = -inf instead of -inf - -inf.
    m = tl.maximum(tl.maximum(a, b), c)
    ms = tl.where(m == float("-inf"), 0.0, m)
    return ms + tl.log(tl.exp(a - ms) + tl.exp(b - ms) + tl.exp(c - ms))


@triton.jit
def _emission(tgt_b, lp_b, t, C, blank, s, S):
    """For extended-label states s (even: blank, odd: the target (s - 1) / 2): (live, odd, j, token, e_t(s) in
    fp64), shared by the forward and the backward recursions."""
    live = s < S
    odd = (s % 2) == 1
    j = tl.maximum(s - 1, 0) // 2
    tok = tl.load(tgt_b + j, mask=live & odd, other=0)
    em = tl.load(lp_b + t * C + tl.where(odd, tok, blank), mask=live, other=float("-inf")).to(tl.float64)
    return live, odd, j, tok, em


@triton.jit
def ctc_posteriors_kernel(
    lp_ptr, tgt_ptr, il_ptr, tl_ptr, alpha_ptr, bb_ptr, gamma_ptr, loss_ptr, T, C, L, blank, BLOCK_S: tl.constexpr
):
    NEG = float("-inf")
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(il_ptr + b).to(tl.int64)
    Lb = tl.load(tl_ptr + b).to(tl.int64)
    S = 2 * Lb + 1
    SF = 2 * L + 1
    lp_b = lp_ptr + b * T * C
    tgt_b = tgt_ptr + b * L
    alpha_b = alpha_ptr + b * T * SF
    bb_b = bb_ptr + b * 2 * SF
    gamma_b = gamma_ptr + b * T * SF
    offs = tl.arange(0, BLOCK_S)

    # Forward: alpha_t(s) = lse(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2) if allowed) + e_t(s).
    for t in range(0, Tb):
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs
            live, odd, j, tok, em = _emission(tgt_b, lp_b, t, C, blank, s, S)
            before = tl.load(tgt_b + j - 1, mask=live & odd & (s >= 3), other=0)
            skip = live & odd & (s >= 3) & (tok != before)
            pa = alpha_b + (t - 1) * SF + s
            a0 = tl.load(pa, mask=live & (t > 0), other=NEG)
            a1 = tl.load(pa - 1, mask=live & (t > 0) & (s >= 1), other=NEG)
            a2 = tl.load(pa - 2, mask=skip & (t > 0), other=NEG)
            a = tl.where(t > 0, _lse3(a0, a1, a2) + em, tl.where(s < 2, em, NEG))
            tl.store(alpha_b + t * SF + s, a, mask=live)
        tl.debug_barrier()

    last = tl.maximum(Tb - 1, 0) * SF
    z1 = tl.load(alpha_b + last + S - 1, mask=Tb > 0, other=NEG)
    z2 = tl.load(alpha_b + last + tl.maximum(S - 2, 0), mask=(Tb > 0) & (S >= 2), other=NEG)
    m = tl.maximum(z1, z2)
    ms = tl.where(m == NEG, 0.0, m)
    log_z = ms + tl.log(tl.exp(z1 - ms) + tl.exp(z2 - ms))
    log_z = tl.where(Tb > 0, log_z, tl.where(Lb == 0, 0.0, NEG))
    feasible = log_z > NEG
    tl.store(loss_ptr + b, tl.where(feasible, -log_z, float("inf")))
    lz = tl.where(feasible, log_z, 0.0)

    # Backward: beta_t(s) = lse over successors s' of (beta_{t+1}(s') + e_{t+1}(s')); the ring holds the sum.
    for i in range(0, Tb):
        t = Tb - 1 - i
        cur = t % 2
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs
            live, odd, j, tok, em = _emission(tgt_b, lp_b, t, C, blank, s, S)
            after = tl.load(tgt_b + j + 1, mask=live & odd & (s + 2 < S), other=0)
            skip2 = live & odd & (s + 2 < S) & (after != tok)
            inner = t < Tb - 1
            pq = bb_b + (1 - cur) * SF + s
            q0 = tl.load(pq, mask=live & inner, other=NEG)
            q1 = tl.load(pq + 1, mask=(s + 1 < S) & inner, other=NEG)
            q2 = tl.load(pq + 2, mask=skip2 & inner, other=NEG)
            end = live & ((s == S - 1) | (s == S - 2))
            beta = tl.where(inner, _lse3(q0, q1, q2), tl.where(end, 0.0, NEG))
            alpha = tl.load(alpha_b + t * SF + s, mask=live, other=NEG)
            g = tl.where(live, tl.exp(alpha + beta - lz), 0.0)
            g = tl.where(feasible, g, 0.0)
            tl.store(gamma_b + t * SF + s, g, mask=live)
            tl.store(bb_b + cur * SF + s, beta + em, mask=live)
        tl.debug_barrier()


def launch_ctc_posteriors(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], gamma [B, T, 2L+1]) in ``acc``, from contiguous inputs already checked."""
    B, T, C = log_probs.shape
    L = targets.shape[1]
    SF = 2 * L + 1
    dev = log_probs.device
    alpha = torch.empty(B, T, SF, dtype=torch.float64, device=dev)
    bb = torch.empty(B, 2, SF, dtype=torch.float64, device=dev)
    gamma = torch.zeros(B, T, SF, dtype=acc, device=dev)
    loss = torch.empty(B, dtype=acc, device=dev)
    if B == 0:
        return loss, gamma
    block, warps = launch_config(SF, tile(dev, "ctc_posteriors.block", 1024))
    launch(
        ctc_posteriors_kernel,
        (B,),
        log_probs,
        targets,
        input_lengths,
        target_lengths,
        alpha,
        bb,
        gamma,
        loss,
        T,
        C,
        L,
        blank,
        BLOCK_S=block,
        num_warps=warps,
    )
    return loss, gamma
