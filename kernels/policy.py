"""Triton kernel of the policy family: TRL 1.16 GRPOTrainer's loss (``alignops::policy_loss_triton``) with its
closed-form gradient w.r.t. per_token_logps, one program per row; the math of csrc/policy/policy_loss_cpu.cpp.

A row's program walks its T tokens in tiles of BLOCK_T, in up to three passes:

1. sums: the mask count M_b and, when needed, the sequence log-ratio sum_t m_t lr_t (sequence-level importance
   sampling, lr = lp - old), VESPO's sum_t m_t clamp(lr_t, +-20) plus its log IS-ratio terms, and the off-policy
   mask's sum_t m_t (sampling_t - lp_t);
2. per token: TRL's loss ptl_t and its partial derivatives w.r.t. lp_t through lp_t alone (``direct``) and
   through coef_1 (``dc1``); the row's loss and statistics accumulate, and at token level the gradient
   rs_b m_t (direct_t + coef_1_t dc1_t) is stored (d coef_1_t / d lp_t = coef_1_t);
3. sequence level only: coef_1 = exp(sum_t m_t lr_t / max(M_b, 1)) depends on every token of the row, so the
   gradient rs_b m_t (direct_t + coef_1 / max(M_b, 1) sum_s m_s dc1_s) needs pass 2's sum: pass 3 recomputes
   the tile and stores it (rounded once to lp's dtype).

Gradient conventions are torch autograd's, so that they match autograd on the reference: torch.min splits the
gradient half/half at a tie, torch.clamp passes it only strictly inside its bounds. Clamps propagate NaN as
torch.clamp does (Triton's minimum / maximum drop it on the GPU by default).

Precision: everything in the accumulation dtype ACC (fp32, fp64 for fp64 inputs), the dtype of row_stats.
Float hyperparameters are ``tl.float64`` arguments rounded to ACC in the kernel (the bounds 1 - eps_low and
1 + eps_high are formed in Python's double first, as torch and the C++ kernel form them), so fp64 runs keep
full precision; SAPO's temperatures and VESPO's k / lambda are fp32 values at either precision, as in TRL.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .._codes import PolicyLossType, RowStat
from ._launch import launch, tile
from ._tl import finite_max
from .preference import launch_config, launch_rows

# ---- codes: alignops._codes as constexpr globals (a plain module global is a NameError for the compiler) ----

GRPO = tl.constexpr(int(PolicyLossType.GRPO))
BNPO = tl.constexpr(int(PolicyLossType.BNPO))
DR_GRPO = tl.constexpr(int(PolicyLossType.DR_GRPO))
DAPO = tl.constexpr(int(PolicyLossType.DAPO))
CISPO = tl.constexpr(int(PolicyLossType.CISPO))
SAPO = tl.constexpr(int(PolicyLossType.SAPO))
LUSPO = tl.constexpr(int(PolicyLossType.LUSPO))
VESPO = tl.constexpr(int(PolicyLossType.VESPO))

# The columns of row_stats (RowStat, csrc/policy/policy_codes.h)
_N_STATS = tl.constexpr(int(RowStat.NUM_ROW_STATS))
MASK_COUNT = tl.constexpr(int(RowStat.MASK_COUNT))
CLIP_LOW = tl.constexpr(int(RowStat.CLIP_LOW))
CLIP_HIGH = tl.constexpr(int(RowStat.CLIP_HIGH))
CLIP_REGION = tl.constexpr(int(RowStat.CLIP_REGION))
KL = tl.constexpr(int(RowStat.KL))
RATIO = tl.constexpr(int(RowStat.RATIO))
PHI = tl.constexpr(int(RowStat.PHI))
ROW_LOSS = tl.constexpr(int(RowStat.ROW_LOSS))
MAX_BLOCK_T = 1024  # tokens per tile on a GPU: 8 per thread at 4 warps (fp32: 56-96 registers, no spills)
_LOG_1E8 = math.log(1e-8)  # VESPO's lower clamp of log w (TRL's get_gamma_weights)


@triton.jit
def _min(x, y):
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _is_clip(LOSS: tl.constexpr):
    return (LOSS == GRPO) or (LOSS == BNPO) or (LOSS == DR_GRPO) or (LOSS == DAPO) or (LOSS == LUSPO)


@triton.jit
def _flags(c1, A, lo, hi, eps_high, delta, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """(coef_1 as TRL's metrics see it, clipped low, clipped high): the delta clamp applies to the clip losses."""
    if LOSS == CISPO:
        low = c1 < c1  # False, in the shape of c1
        high = (c1 > eps_high) & (A > 0)
        c1p = c1
    elif _is_clip(LOSS):
        if HAS_DELTA:
            c1p = _min(c1, delta)
        else:
            c1p = c1
        low = (c1p < lo) & (A < 0)
        high = (c1p > hi) & (A > 0)
    else:
        low = c1 < c1
        high = c1 < c1
        c1p = c1
    return c1p, low, high


@triton.jit
def _phi(log_w, A, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's phi(w) = exp(lambda + k log w - lambda w), k and lambda by the sign of A (the lambdas arrive
    clamped at 1e-4 as TRL clamps them); NaN and inf -> 0."""
    nonneg = A >= 0
    k = tl.where(nonneg, k_pos, k_neg)
    lam = tl.where(nonneg, lam_pos, lam_neg)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)


@triton.jit
def _tile(
    lp_ptr,
    adv_ptr,
    m_ptr,
    old_ptr,
    ref_ptr,
    isr_ptr,
    em_ptr,
    base,
    offs,
    T,
    c1_seq,
    adv_row,
    isr_row,
    keep_kl,
    phi_row,
    log_w_vespo,
    lo,
    hi,
    eps_high,
    delta,
    beta,
    sapo_pos,
    sapo_neg,
    k_pos,
    lam_pos,
    k_neg,
    lam_neg,
    LOSS: tl.constexpr,
    SEQ: tl.constexpr,
    ADV_TOKENS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_BIAS: tl.constexpr,
    HAS_ISR: tl.constexpr,
    ISR_TOKENS: tl.constexpr,
    OPM: tl.constexpr,
    HAS_EM: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    ACC: tl.constexpr,
):
    """One tile's (m, coef_1, A, phi, ptl, direct, dc1, kl): TRL's per-token loss and its partial derivatives
    w.r.t. lp (through lp alone) and coef_1, and the k3 KL term."""
    inb = offs < T
    lp = tl.load(lp_ptr + base + offs, mask=inb, other=0.0).to(ACC)
    m = tl.load(m_ptr + base + offs, mask=inb, other=0).to(ACC)
    zero = tl.zeros_like(lp)
    if ADV_TOKENS:
        A = tl.load(adv_ptr + base + offs, mask=inb, other=0.0).to(ACC)
    else:
        A = adv_row + zero
    if SEQ:
        c1 = c1_seq + zero
    elif HAS_OLD:
        c1 = tl.exp(lp - tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(ACC))
    else:
        c1 = tl.exp(lp - lp)  # old = lp.detach(): 1 (NaN where lp is not finite, as in TRL)

    phi = zero
    if LOSS == CISPO:
        direct = -_min(c1, eps_high) * A  # the clamped ratio is detached in TRL: nothing through coef_1
        ptl = direct * lp
        dc1 = zero
    elif LOSS == SAPO:
        tau = tl.where(A > 0, sapo_pos, sapo_neg)
        s = 1 / (1 + tl.exp(-tau * (c1 - 1)))
        ptl = -s * 4 / tau * A
        direct = zero
        dc1 = -4 * A * s * (1 - s)
    elif LOSS == VESPO:
        if ADV_TOKENS:
            phi = _phi(log_w_vespo, A, k_pos, lam_pos, k_neg, lam_neg)
        else:
            phi = phi_row + zero
        direct = -phi * A  # phi is detached in TRL
        ptl = direct * lp
        dc1 = zero
    else:
        if HAS_DELTA:
            c1d = _min(c1, delta)
            g1 = tl.where(c1 < delta, 1.0, 0.0)
        else:
            c1d = c1
            g1 = 1.0
        c2 = _clamp(c1, lo, hi)
        g2 = tl.where((c1 > lo) & (c1 < hi), 1.0, 0.0)
        p1 = c1d * A
        p2 = c2 * A
        # torch.min: the smaller argument takes the gradient, a tie splits it half/half; NaN stays NaN
        w1 = tl.where(p1 < p2, 1.0, tl.where(p1 == p2, 0.5, 0.0))
        nan = (p1 != p1) | (p2 != p2)
        ptl = tl.where(nan, p1 + p2, -tl.minimum(p1, p2))
        direct = zero
        dc1 = tl.where(nan, p1 + p2, -(w1 * g1 + (1 - w1) * g2) * A)

    if OPM:
        keep = tl.where(A >= 0, 1.0, keep_kl)
        ptl = ptl * keep
        direct = direct * keep
        dc1 = dc1 * keep
    if HAS_EM:
        em = tl.load(em_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        ptl = ptl * em
        direct = direct * em
        dc1 = dc1 * em
    if HAS_ISR and LOSS != VESPO:  # VESPO folds the IS ratio into phi instead
        if ISR_TOKENS:
            isr = tl.load(isr_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        else:
            isr = isr_row
        ptl = ptl * isr
        direct = direct * isr
        dc1 = dc1 * isr
    kl = zero
    if HAS_KL:
        x = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(ACC) - lp
        ex = tl.exp(x)
        k3 = ex - x - 1
        if KL_BIAS:
            kl = k3 * c1
            direct = direct + beta * (1 - ex) * c1
            dc1 = dc1 + beta * k3
        else:
            kl = k3
            direct = direct + beta * (1 - ex)
        ptl = ptl + beta * kl
    return m, c1, A, phi, ptl, direct, dc1, kl


@triton.jit
def policy_loss_kernel(
    lp_ptr,  # [B, T] per_token_logps, any float dtype
    adv_ptr,  # [B] or [B, T] (ADV_TOKENS), ACC
    m_ptr,  # [B, T] completion mask: uint8 (a bool's bytes) or ACC
    old_ptr,  # [B, T] ACC (HAS_OLD)
    ref_ptr,  # [B, T] ACC (HAS_KL)
    isr_ptr,  # [B] or [B, T] (ISR_TOKENS), ACC (HAS_ISR)
    samp_ptr,  # [B, T] ACC: the off-policy mask's sampler log-probs (HAS_SAMP)
    em_ptr,  # [B, T] ACC entropy mask (HAS_EM)
    grad_ptr,  # [B, T] in lp's dtype (GRAD)
    stats_ptr,  # [B, NUM_ROW_STATS] ACC
    T,
    lo: tl.float64,
    hi: tl.float64,
    eps_high: tl.float64,
    delta: tl.float64,
    beta: tl.float64,
    threshold: tl.float64,
    sapo_pos: tl.float64,
    sapo_neg: tl.float64,
    k_pos: tl.float64,
    lam_pos: tl.float64,
    k_neg: tl.float64,
    lam_neg: tl.float64,
    log_lower: tl.float64,
    LOSS: tl.constexpr,
    SEQ: tl.constexpr,
    ADV_TOKENS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_BIAS: tl.constexpr,
    HAS_ISR: tl.constexpr,
    ISR_TOKENS: tl.constexpr,
    OPM: tl.constexpr,
    HAS_SAMP: tl.constexpr,
    HAS_EM: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    lo_, hi_ = tl.full([], lo, ACC), tl.full([], hi, ACC)
    eh_, dl_ = tl.full([], eps_high, ACC), tl.full([], delta, ACC)
    beta_, thr_ = tl.full([], beta, ACC), tl.full([], threshold, ACC)
    sp_, sn_ = tl.full([], sapo_pos, ACC), tl.full([], sapo_neg, ACC)
    kp_, lmp_ = tl.full([], k_pos, ACC), tl.full([], lam_pos, ACC)
    kn_, lmn_ = tl.full([], k_neg, ACC), tl.full([], lam_neg, ACC)
    lower = tl.full([], log_lower, ACC)
    IS_VESPO: tl.constexpr = LOSS == VESPO

    # ---- pass 1: the row's sums -------------------------------------------------------------------------
    n_acc = tl.zeros([BLOCK_T], ACC)
    lr_acc = tl.zeros([BLOCK_T], ACC)
    v_acc = tl.zeros([BLOCK_T], ACC)
    kl_acc = tl.zeros([BLOCK_T], ACC)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        inb = offs < T
        m = tl.load(m_ptr + base + offs, mask=inb, other=0).to(ACC)
        n_acc += m
        if SEQ or IS_VESPO or OPM:
            lp = tl.load(lp_ptr + base + offs, mask=inb, other=0.0).to(ACC)
            if SEQ or IS_VESPO:
                if HAS_OLD:
                    lr = lp - tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(ACC)
                else:
                    lr = lp - lp
                if SEQ:
                    lr_acc += lr * m
                if IS_VESPO:
                    v_acc += _clamp(lr, -20.0, 20.0) * m
                    if HAS_ISR and ISR_TOKENS:  # TRL sums the log IS ratio over the whole row, not the mask
                        log_isr = tl.log(tl.load(isr_ptr + base + offs, mask=inb, other=1.0).to(ACC))
                        v_acc += tl.where(inb, _clamp(log_isr, lower, 20.0), 0.0)
            if OPM:
                if HAS_SAMP:
                    d = tl.load(samp_ptr + base + offs, mask=inb, other=0.0).to(ACC) - lp
                else:
                    d = lp - lp
                # torch.nan_to_num(nan=0): NaN -> 0 and +-inf -> the dtype's extremes, so that inf * 0 is no NaN
                big = finite_max(ACC)
                d = tl.where(d == d, tl.minimum(tl.maximum(d, -big), big), 0.0)
                kl_acc += d * m
    M = tl.sum(n_acc, axis=0)
    n_c = tl.maximum(M, 1.0)
    if (LOSS == GRPO) or (LOSS == SAPO):
        rs = 1 / n_c
    else:
        rs = tl.full([], 1.0, ACC)
    c1_seq = tl.exp(tl.sum(lr_acc, axis=0) / n_c)
    if ADV_TOKENS:
        adv_row = tl.full([], 0.0, ACC)
    else:
        adv_row = tl.load(adv_ptr + row).to(ACC)
    if HAS_ISR and not ISR_TOKENS:
        isr_row = tl.load(isr_ptr + row).to(ACC)
    else:
        isr_row = tl.full([], 1.0, ACC)
    log_w_vespo = tl.sum(v_acc, axis=0)
    if IS_VESPO and HAS_ISR and not ISR_TOKENS:
        log_w_vespo += _clamp(tl.log(isr_row), lower, 20.0)
    log_w_vespo = _clamp(log_w_vespo, lower, 20.0)
    phi_row = _phi(log_w_vespo, adv_row, kp_, lmp_, kn_, lmn_)
    keep_kl = tl.where(tl.sum(kl_acc, axis=0) / n_c <= thr_, 1.0, 0.0)  # the low-KL rows' 1

    # ---- pass 2: loss, statistics, and the gradient at token level --------------------------------------
    loss_acc = tl.zeros([BLOCK_T], ACC)
    g_acc = tl.zeros([BLOCK_T], ACC)
    low_acc = tl.zeros([BLOCK_T], ACC)
    high_acc = tl.zeros([BLOCK_T], ACC)
    region_acc = tl.zeros([BLOCK_T], ACC)
    kl_sum_acc = tl.zeros([BLOCK_T], ACC)
    ratio_acc = tl.zeros([BLOCK_T], ACC)
    phi_acc = tl.zeros([BLOCK_T], ACC)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m, c1, A, phi, ptl, direct, dc1, kl = _tile(
            lp_ptr, adv_ptr, m_ptr, old_ptr, ref_ptr, isr_ptr, em_ptr, base, offs, T, c1_seq, adv_row, isr_row,
            keep_kl, phi_row, log_w_vespo, lo_, hi_, eh_, dl_, beta_, sp_, sn_, kp_, lmp_, kn_, lmn_,
            LOSS, SEQ, ADV_TOKENS, HAS_OLD, HAS_KL, KL_BIAS, HAS_ISR, ISR_TOKENS, OPM, HAS_EM, HAS_DELTA, ACC,
        )  # fmt: skip
        loss_acc += m * ptl
        kl_sum_acc += m * kl
        phi_acc += m * phi
        if SEQ:
            g_acc += m * dc1
        elif GRAD:
            g = rs * (m * (direct + dc1 * c1))
            tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < T)
        ratio, low, high = _flags(c1, A, lo_, hi_, eh_, dl_, LOSS, HAS_DELTA)
        ratio_acc += m * ratio
        low_acc += tl.where(low, m, 0.0)
        high_acc += tl.where(high, m, 0.0)
        region_acc += tl.where(low | high, m, 0.0)

    # ---- pass 3, sequence level: coef_1's share of the gradient needs pass 2's sum ------------------------
    if SEQ and GRAD:
        spread = c1_seq / n_c * tl.sum(g_acc, axis=0)
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            m, c1, A, phi, ptl, direct, dc1, kl = _tile(
                lp_ptr, adv_ptr, m_ptr, old_ptr, ref_ptr, isr_ptr, em_ptr, base, offs, T, c1_seq, adv_row, isr_row,
                keep_kl, phi_row, log_w_vespo, lo_, hi_, eh_, dl_, beta_, sp_, sn_, kp_, lmp_, kn_, lmn_,
                LOSS, SEQ, ADV_TOKENS, HAS_OLD, HAS_KL, KL_BIAS, HAS_ISR, ISR_TOKENS, OPM, HAS_EM, HAS_DELTA, ACC,
            )  # fmt: skip
            g = rs * (m * (direct + spread))
            tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < T)

    # ---- statistics: masked token sums where TRL's tensor is [B, T], the row's value where it is [B, 1] -----
    low_s = tl.sum(low_acc, axis=0)
    high_s = tl.sum(high_acc, axis=0)
    region_s = tl.sum(region_acc, axis=0)
    ratio_s = tl.sum(ratio_acc, axis=0)
    # phi is [B, 1] whenever the advantages are (TRL's gamma weights are a row value at either level)
    if not IS_VESPO:
        phi_s = tl.full([], 0.0, ACC)
    elif ADV_TOKENS:
        phi_s = tl.sum(phi_acc, axis=0)
    else:
        phi_s = phi_row
    if SEQ:
        # coef_1 is [B, 1] whatever the advantages' shape; the clip flags are [B, 1] when the advantages are
        ratio_row, low_row, high_row = _flags(c1_seq, adv_row, lo_, hi_, eh_, dl_, LOSS, HAS_DELTA)
        ratio_s = ratio_row
        if not ADV_TOKENS:
            low_s = tl.where(low_row, 1.0, 0.0).to(ACC)
            high_s = tl.where(high_row, 1.0, 0.0).to(ACC)
            region_s = tl.where(low_row | high_row, 1.0, 0.0).to(ACC)
    out = stats_ptr + row * _N_STATS
    tl.store(out + MASK_COUNT, M)
    tl.store(out + CLIP_LOW, low_s)
    tl.store(out + CLIP_HIGH, high_s)
    tl.store(out + CLIP_REGION, region_s)
    tl.store(out + KL, tl.sum(kl_sum_acc, axis=0))
    tl.store(out + RATIO, ratio_s)
    tl.store(out + PHI, phi_s)
    tl.store(out + ROW_LOSS, rs * tl.sum(loss_acc, axis=0))


def launch_policy_loss(
    lp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    isr: torch.Tensor | None,
    sampling: torch.Tensor | None,
    entropy_mask: torch.Tensor | None,
    grad: torch.Tensor | None,
    stats: torch.Tensor,
    *,
    loss_type: int,
    sequence: bool,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    use_bias_correction_kl: bool,
    off_policy_mask_threshold: float | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    vespo_k_pos: float,
    vespo_lambda_pos: float,
    vespo_k_neg: float,
    vespo_lambda_neg: float,
) -> None:
    """Fills stats [B, NUM_ROW_STATS] (and grad [B, T] when given). lp, mask and the [B, T] inputs contiguous; adv and
    isr contiguous, [B] (a value per row) or [B, T]; mask uint8 or of stats' dtype; sampling None: old's."""
    B, T = lp.shape
    # fp64 tiles of half the width: the same registers per thread (~240 at 1024 fp64 tokens, near the cap)
    block, num_warps = launch_config(T, MAX_BLOCK_T // 2 if lp.dtype == torch.float64 else MAX_BLOCK_T)
    block = tile(lp, "policy.block_t", block)
    has_kl = beta != 0.0
    opm = off_policy_mask_threshold is not None
    sampling = sampling if sampling is not None else old  # TRL: sampling_per_token_logps defaults to old's
    launch(
        policy_loss_kernel,
        (B,),
        lp,
        adv,
        mask,
        old if old is not None else lp,  # the stand-ins of absent tensors are never read
        ref if has_kl else lp,
        isr if isr is not None else lp,
        sampling if opm and sampling is not None else lp,
        entropy_mask if entropy_mask is not None else lp,
        grad if grad is not None else lp,
        stats,
        T,
        1.0 - epsilon_low,
        1.0 + epsilon_high,
        float(epsilon_high),
        float(delta) if delta is not None else 0.0,
        float(beta),
        float(off_policy_mask_threshold) if opm else 0.0,
        _fp32(sapo_temperature_pos),
        _fp32(sapo_temperature_neg),
        _fp32(vespo_k_pos),
        max(_fp32(vespo_lambda_pos), _fp32(1e-4)),  # TRL's clamp(min=1e-4), in fp32
        _fp32(vespo_k_neg),
        max(_fp32(vespo_lambda_neg), _fp32(1e-4)),
        _LOG_1E8,
        LOSS=int(loss_type),
        SEQ=bool(sequence),
        ADV_TOKENS=adv.dim() == 2,
        HAS_OLD=old is not None,
        HAS_KL=has_kl,
        KL_BIAS=has_kl and bool(use_bias_correction_kl),
        HAS_ISR=isr is not None,
        ISR_TOKENS=isr is not None and isr.dim() == 2,
        OPM=opm,
        HAS_SAMP=opm and sampling is not None,
        HAS_EM=entropy_mask is not None,
        HAS_DELTA=delta is not None,
        GRAD=grad is not None,
        BLOCK_T=block,
        num_warps=num_warps,
    )


def _fp32(x: float) -> float:
    """x rounded to fp32: TRL's ``torch.where(A > 0, pos, neg)`` on Python floats makes an fp32 tensor, so SAPO's
    temperatures and VESPO's k / lambda are fp32 values even in an fp64 run (the C++ op rounds them the same way)."""
    try:
        return struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:  # beyond fp32's range: the cast gives inf
        return math.copysign(math.inf, x)


# ---- token_entropy: the entropy of softmax(logits / T) per row (the math of csrc/policy/token_entropy_cpu.cpp) ----


@triton.jit
def token_entropy_fwd_kernel(
    logits_ptr,  # [N, V] contiguous, any float dtype
    entropy_ptr,  # [N] accumulation dtype
    stats_ptr,  # [N, 2] accumulation dtype: the row's max logit m and log s
    V,
    temperature: tl.float64,
    BLOCK_V: tl.constexpr,
):
    """One program per row, one pass: per lane a running max m (in the logits' units), s = sum exp(u) and
    w = sum exp(u) u with u = (z - m) / T. A new max m' scales s by r = exp((m - m') / T) and w to r (w + d s),
    d = (m - m') / T; the lanes are combined the same way. H = log s - w / s; (m, log s) are kept for the backward.

    Where r or exp(u) is 0 (a -inf logit, an underflow, a lane that has seen only padding) the term is 0, never
    0 * -inf. The running max starts at the lowest finite value so that -inf logits never form -inf - -inf."""
    ACC = entropy_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1 / tl.full([], temperature, ACC)
    row_ptr = logits_ptr + row * V
    m = tl.full([BLOCK_V], -finite_max(ACC), ACC)
    s = tl.zeros([BLOCK_V], ACC)
    w = tl.zeros([BLOCK_V], ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, z)
        d = (m - m_new) * inv_t
        r = tl.exp(d)
        u = (z - m_new) * inv_t
        e = tl.exp(u)
        w = tl.where(r > 0, r * (w + d * s), 0) + tl.where(e > 0, e * u, 0)
        s = s * r + e
        m = m_new
    m_row = tl.max(m, axis=0)
    d = (m - m_row) * inv_t
    r = tl.exp(d)
    s_row = tl.sum(s * r, axis=0)
    w_row = tl.sum(tl.where(r > 0, r * (w + d * s), 0), axis=0)
    log_s = tl.log(s_row)
    tl.store(entropy_ptr + row, log_s - w_row / s_row)
    tl.store(stats_ptr + 2 * row, m_row)
    tl.store(stats_ptr + 2 * row + 1, log_s)


@triton.jit
def token_entropy_bwd_kernel(
    grad_ptr,
    entropy_ptr,  # [N] accumulation dtype
    stats_ptr,  # [N, 2]: the forward's m and log s
    logits_ptr,  # [N, V] contiguous
    grad_logits_ptr,  # [N, V] logits dtype, written once
    V,
    temperature: tl.float64,
    BLOCK_V: tl.constexpr,
):
    """Grid (rows, vocabulary blocks): d logits = -g / T p (log p + H), log p = (z - m) / T - log s (the forward's
    difference, never z / T - logsumexp, which cancels on confident rows), in the accumulation dtype, rounded once
    to the logits' dtype; 0 where p = 0, NaN on the forward's NaN rows. Other rows with g = 0 write zeros unread."""
    ACC = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    out_ptrs = grad_logits_ptr + row * V + offs
    g = tl.load(grad_ptr + row)
    h = tl.load(entropy_ptr + row)
    if (g == 0) & (h == h):
        tl.store(out_ptrs, tl.zeros([BLOCK_V], grad_logits_ptr.dtype.element_ty), mask=mask)
    else:
        inv_t = 1 / tl.full([], temperature, ACC)
        z = tl.load(logits_ptr + row * V + offs, mask=mask, other=0).to(ACC)
        log_p = (z - tl.load(stats_ptr + 2 * row)) * inv_t - tl.load(stats_ptr + 2 * row + 1)
        p = tl.exp(log_p)
        dz = tl.where(p > 0, -g * inv_t * p * (log_p + h), 0)
        dz = tl.where(h != h, float("nan"), dz)
        tl.store(out_ptrs, dz.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def launch_token_entropy_forward(logits, entropy, stats, temperature):
    """One program per row of the contiguous [N, V] ``logits``."""
    launch_rows(token_entropy_fwd_kernel, logits, logits, entropy, stats, logits.shape[1], float(temperature))


def launch_token_entropy_backward(grad, entropy, stats, logits, grad_logits, temperature):
    """A (rows, vocabulary blocks) grid over the contiguous [N, V] ``logits``."""
    args = (grad, entropy, stats, logits, grad_logits, logits.shape[1], float(temperature))
    launch_rows(token_entropy_bwd_kernel, logits, *args, vocab_blocks=True)
