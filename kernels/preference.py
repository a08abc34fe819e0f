"""Triton kernels of the preference family and their launch helpers.

The ops that call them (``alignops::preference_loss_triton``, ``alignops::selective_logprobs_triton``,
``alignops::selective_logprobs_backward_triton``) are defined in python/alignops/ops/preference.py;
the helpers here take contiguous inputs and preallocated outputs and launch through
``torch.library.wrap_triton`` so that torch.compile sees the kernels.

Precision. Every kernel computes in the dtype of its fp32 / fp64 outputs (the accumulation dtype). Float
hyperparameters are kernel arguments annotated ``tl.float64`` and are rounded to that dtype inside the
kernel, as the C++ kernels do with ``T(value)``; literals in the kernels take the dtype of the tensor they
meet, so fp64 runs keep full precision.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from .._codes import FDivergence, LossType
from ._launch import launch
from ._tl import finite_max

# ---- codes: alignops._codes as constexpr globals (a plain module global is a NameError for the compiler) ----

SIGMOID = tl.constexpr(int(LossType.SIGMOID))
HINGE = tl.constexpr(int(LossType.HINGE))
IPO = tl.constexpr(int(LossType.IPO))
EXO_PAIR = tl.constexpr(int(LossType.EXO_PAIR))
NCA_PAIR = tl.constexpr(int(LossType.NCA_PAIR))
ROBUST = tl.constexpr(int(LossType.ROBUST))
BCO_PAIR = tl.constexpr(int(LossType.BCO_PAIR))
SPPO_HARD = tl.constexpr(int(LossType.SPPO_HARD))
AOT = tl.constexpr(int(LossType.AOT))
APO_ZERO = tl.constexpr(int(LossType.APO_ZERO))
APO_DOWN = tl.constexpr(int(LossType.APO_DOWN))
DISCOPOP = tl.constexpr(int(LossType.DISCOPOP))
SIGMOID_NORM = tl.constexpr(int(LossType.SIGMOID_NORM))
SIMPO = tl.constexpr(int(LossType.SIMPO))
CPO = tl.constexpr(int(LossType.CPO))
FORWARD_KL = tl.constexpr(int(FDivergence.FORWARD_KL))
JS_DIVERGENCE = tl.constexpr(int(FDivergence.JS_DIVERGENCE))
ALPHA_DIVERGENCE = tl.constexpr(int(FDivergence.ALPHA_DIVERGENCE))

# ---- block sizes ------------------------------------------------------------------------------------

MAX_BLOCK_PAIRS = 256  # pairs per program: ~40 live values per pair, so few pairs per thread
MAX_BLOCK_V = 4096  # vocabulary entries per step of a row


def launch_config(n, max_block: int) -> tuple[int, int]:
    """(block, num_warps) for ``n`` elements: the next power of two >= n, clamped to [16, max_block].

    A symbolic ``n`` (a dynamic shape under torch.compile) gets ``max_block``: deriving the block from it
    would guard the compiled graph on the power of two."""
    block = max(16, min(max_block, triton.next_power_of_2(n))) if isinstance(n, int) else max_block
    return block, (4 if block <= 2048 else 8)


# ---- numerics shared by the kernels (the stable forms of csrc/preference/preference_loss_math.h) ------


@triton.jit
def _log1p(u):
    # log(1 + u) for u > -1 without libdevice (which the interpreter lacks): log(w) of the rounded
    # w = 1 + u, corrected to first order by the rounding error (u - (w - 1)) / w; a few ulp, and exactly u
    # where w rounds to 1.
    w = 1 + u
    return tl.log(w) - ((w - 1) - u) / w


@triton.jit
def _logistic(x):
    """sigmoid(x), sigmoid(-x), logsig(x), logsig(-x) from one exp and one log1p, never overflowing."""
    e = tl.exp(-tl.abs(x))
    inv = 1 / (1 + e)
    l = _log1p(e)
    pos = x > 0
    return tl.where(pos, inv, e * inv), tl.where(pos, e * inv, inv), tl.minimum(x, 0) - l, tl.minimum(-x, 0) - l


@triton.jit
def _sigmoid(x):
    sig, _, _, _ = _logistic(x)
    return sig


@triton.jit
def _smoothed_logistic(z, e):
    """-(1-e) logsig(z) - e logsig(-z) and its derivative in z."""
    sig, sig_neg, log_sig, log_sig_neg = _logistic(z)
    return -(1 - e) * log_sig - e * log_sig_neg, -(1 - e) * sig_neg + e * sig


@triton.jit
def _f_score(x, alpha, F_DIVERGENCE: tl.constexpr):
    """f-divergence score s(x) and s'(x) for the FDivergence code F_DIVERGENCE."""
    if F_DIVERGENCE == FORWARD_KL:  # forward KL: f'(t) = 1 - 1/t
        e = tl.exp(-x)
        s = 1 - e
        ds = e
    elif F_DIVERGENCE == JS_DIVERGENCE:  # Jensen-Shannon: f'(t) = log 2 + logsig(log t)
        _, sig_neg, log_sig, _ = _logistic(x)
        s = 0.69314718055994530942 + log_sig
        ds = sig_neg
    elif F_DIVERGENCE == ALPHA_DIVERGENCE:  # alpha divergence, exponent clamped at 80 (TRL); alpha ~ 1 is reverse KL
        t = (alpha - 1) * x
        e = tl.exp(tl.minimum(t, 80))
        on = (alpha - 1 > 1e-6) | (1 - alpha > 1e-6)
        s = tl.where(on, (e - 1) / (alpha - 1), x)
        ds = tl.where(on, tl.where(80 > t, e, 0), 1)
    else:  # reverse KL
        s = x
        ds = tl.zeros_like(x) + 1
    return s, ds


# ---- preference_loss ----------------------------------------------------------------------------------


@triton.jit
def _loss_term(CODE: tl.constexpr, W, pc, pr, xc, xr, sc, sr, dsc, dsr, delta, beta, nc, nr, e, gam, tau):
    """W times the loss of type CODE and its derivatives through xc, xr (log-ratios) and pc, pr (reference-free),
    one case of the switch in pair_loss() of csrc/preference/preference_loss_math.h."""
    zero = tl.zeros_like(xc)
    l = zero
    d_delta = zero
    d_xc = zero
    d_xr = zero
    d_pc = zero
    d_pr = zero
    if CODE == SIGMOID:
        l, dz = _smoothed_logistic(beta * delta, e)
        d_delta = beta * dz
    elif CODE == HINGE:
        m = 1 - beta * delta
        l = tl.where(m > 0, m, 0)
        d_delta = tl.where(m > 0, -beta, 0)
    elif CODE == IPO:
        r = sc / nc - sr / nr - 1 / (2 * beta)
        l = r * r
        d_xc = 2 * r * dsc / nc
        d_xr = -2 * r * dsr / nr
    elif CODE == EXO_PAIR:
        z = beta * delta
        sig, sig_neg, log_sig, log_sig_neg = _logistic(z)
        log_e = tl.log(e)
        log_1me = _log1p(-e)
        l = sig * (log_sig - log_1me) + sig_neg * (log_sig_neg - log_e)
        d_delta = beta * sig * sig_neg * (z + log_e - log_1me)
    elif CODE == NCA_PAIR:
        a_sig, a_sig_neg, a_log_sig, a_log_sig_neg = _logistic(beta * xc)
        b_sig, _, _, b_log_sig_neg = _logistic(beta * xr)
        l = -a_log_sig - 0.5 * a_log_sig_neg - 0.5 * b_log_sig_neg
        d_xc = beta * (-a_sig_neg + 0.5 * a_sig)
        d_xr = beta * 0.5 * b_sig
    elif CODE == ROBUST:
        sig, sig_neg, log_sig, log_sig_neg = _logistic(beta * delta)
        l = (-(1 - e) * log_sig + e * log_sig_neg) / (1 - 2 * e)
        d_delta = beta * (-(1 - e) * sig_neg - e * sig) / (1 - 2 * e)
    elif CODE == BCO_PAIR:
        _, a_sig_neg, a_log_sig, _ = _logistic(beta * xc)
        b_sig, _, _, b_log_sig_neg = _logistic(beta * xr)
        l = -a_log_sig - b_log_sig_neg
        d_xc = -beta * a_sig_neg
        d_xr = beta * b_sig
    elif CODE == SPPO_HARD:
        u = xc - 0.5 / beta
        v = xr + 0.5 / beta
        l = u * u + v * v
        d_xc = 2 * u
        d_xr = 2 * v
    elif CODE == AOT:  # aot / aot_unpaired, on inputs the caller has sorted
        l, dz = _smoothed_logistic(beta * (xc - xr), e)
        d_xc = beta * dz
        d_xr = -beta * dz
    elif CODE == APO_ZERO:
        a = _sigmoid(beta * xc)
        b = _sigmoid(beta * xr)
        l = 1 - a + b
        d_xc = -beta * a * (1 - a)
        d_xr = beta * b * (1 - b)
    elif CODE == APO_DOWN:
        a = _sigmoid(beta * xc)
        c = _sigmoid(beta * (xc - xr))
        l = a + 1 - c
        d_xc = beta * (a * (1 - a) - c * (1 - c))
        d_xr = beta * c * (1 - c)
    elif CODE == DISCOPOP:  # l = A (1 - m) + E m, E m formed as exp(-z + logsig(z / tau)), never 0 * inf
        z = beta * delta
        inv_tau = 1 / tau
        _, g_sig_neg, g_log_sig, _ = _logistic(z)
        m, m_sig_neg, m_log_sig, _ = _logistic(z * inv_tau)
        A = -g_log_sig
        Em = tl.exp(-z + m_log_sig)
        dm = m * m_sig_neg * inv_tau
        l = A * (1 - m) + Em
        d_delta = beta * (-g_sig_neg * (1 - m) - A * dm + Em * m_sig_neg * inv_tau - Em)
    elif CODE == SIGMOID_NORM:  # ln_dpo
        _, sig_neg, log_sig, _ = _logistic(beta * (sc / nc - sr / nr))
        l = -log_sig
        d_xc = -beta * sig_neg * dsc / nc
        d_xr = beta * sig_neg * dsr / nr
    elif CODE == SIMPO:  # reference-free
        l, dz = _smoothed_logistic(beta * (pc / nc - pr / nr) - gam, e)
        d_pc = beta * dz / nc
        d_pr = -beta * dz / nr
    elif CODE == CPO:  # reference-free
        l, dz = _smoothed_logistic(beta * (pc - pr), e)
        d_pc = beta * dz
        d_pr = -beta * dz
    else:
        tl.static_assert(False, "loss type code must be in [0, 15)")
    return W * l, W * (d_xc + d_delta * dsc), W * (d_xr - d_delta * dsr), W * d_pc, W * d_pr


@triton.jit
def preference_loss_kernel(
    pc_ptr,
    pr_ptr,
    rc_ptr,
    rr_ptr,  # [B] log-probs, input dtype
    beta_ptr,
    lc_ptr,
    lr_ptr,  # [B] in the accumulation dtype; read only when HAS_* is set
    loss_ptr,
    chosen_rewards_ptr,
    rejected_rewards_ptr,
    grad_ptr,  # [B], [B], [B], [4, B] (accumulation dtype)
    B,
    beta_value: tl.float64,
    label_smoothing: tl.float64,
    gamma: tl.float64,
    discopop_tau: tl.float64,
    f_alpha: tl.float64,
    weights_hi,  # (w, ...) of the loss types, each split in two fp32 parts (w = hi + lo, 48 bits): run-time
    weights_lo,  # values, so that new weights never compile again (a float tuple argument is fp32 in Triton)
    LOSS_CODES: tl.constexpr,  # (code, ...): the loss types, summed with their weights
    F_DIVERGENCE: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_CHOSEN_LENGTHS: tl.constexpr,
    HAS_REJECTED_LENGTHS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pair per lane: the weighted loss terms and d loss / d (pc, pr, rc, rr) of pair_loss() in
    csrc/preference/preference_loss_math.h, term by term in the same order and the same forms."""
    ACC = loss_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    pc = tl.load(pc_ptr + offs, mask=mask, other=0).to(ACC)
    pr = tl.load(pr_ptr + offs, mask=mask, other=0).to(ACC)
    rc = tl.load(rc_ptr + offs, mask=mask, other=0).to(ACC)
    rr = tl.load(rr_ptr + offs, mask=mask, other=0).to(ACC)
    zero = tl.zeros([BLOCK], ACC)
    if HAS_BETA:
        beta = tl.load(beta_ptr + offs, mask=mask, other=1).to(ACC)
    else:
        beta = zero + tl.full([], beta_value, ACC)
    nc = zero + 1
    nr = zero + 1
    if HAS_CHOSEN_LENGTHS:
        nc = tl.load(lc_ptr + offs, mask=mask, other=1).to(ACC)
    if HAS_REJECTED_LENGTHS:
        nr = tl.load(lr_ptr + offs, mask=mask, other=1).to(ACC)
    nc = tl.where(nc > 1, nc, 1)
    nr = tl.where(nr > 1, nr, 1)
    e = tl.full([], label_smoothing, ACC)
    gam = tl.full([], gamma, ACC)
    tau = tl.full([], discopop_tau, ACC)
    alpha = tl.full([], f_alpha, ACC)

    xc = pc - rc
    xr = pr - rr
    sc, dsc = _f_score(xc, alpha, F_DIVERGENCE)
    sr, dsr = _f_score(xr, alpha, F_DIVERGENCE)
    delta = sc - sr

    loss = zero
    g_xc = zero  # through the log-ratios: pc and rc (with opposite signs), pr and rr
    g_xr = zero
    g_pc = zero  # reference-free terms: pc and pr only
    g_pr = zero
    for k in tl.static_range(len(LOSS_CODES)):
        w = (tl.zeros([], ACC) + weights_hi[k]) + weights_lo[k]  # fp32 parts (Python floats in the interpreter)
        l, t_xc, t_xr, t_pc, t_pr = _loss_term(
            LOSS_CODES[k], w, pc, pr, xc, xr, sc, sr, dsc, dsr, delta, beta, nc, nr, e, gam, tau
        )
        loss += l
        g_xc += t_xc
        g_xr += t_xr
        g_pc += t_pc
        g_pr += t_pr

    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(chosen_rewards_ptr + offs, beta * xc, mask=mask)
    tl.store(rejected_rewards_ptr + offs, beta * xr, mask=mask)
    if COMPUTE_GRAD:  # rows of grad [4, B], stepped by B so that no offset is formed in int32
        g_ptrs = grad_ptr + offs
        tl.store(g_ptrs, g_xc + g_pc, mask=mask)
        g_ptrs += B
        tl.store(g_ptrs, g_xr + g_pr, mask=mask)
        g_ptrs += B
        tl.store(g_ptrs, -g_xc, mask=mask)
        g_ptrs += B
        tl.store(g_ptrs, -g_xr, mask=mask)


def _split_fp32(w: float) -> tuple[float, float]:
    """(hi, lo), both exact in fp32, with hi + lo = w to 48 bits."""
    hi = struct.unpack("f", struct.pack("f", float(w)))[0]
    return hi, float(w) - hi


def launch_preference_loss(
    pc,
    pr,
    rc,
    rr,
    beta,
    chosen_lengths,
    rejected_lengths,
    loss,
    chosen_rewards,
    rejected_rewards,
    grad,
    loss_terms,
    beta_value,
    label_smoothing,
    gamma,
    discopop_tau,
    f_divergence,
    f_alpha,
):
    """Launch over B pairs. ``loss_terms`` is a tuple of (code, weight) pairs; the codes are compile-time
    constants of the kernel (one specialisation per combination of types, only its branches compiled), the
    weights run-time arguments. Optional
    inputs are None; ``grad`` is [4, B], or empty to skip the gradient."""
    B = pc.shape[0]
    if B == 0:
        return
    block, num_warps = launch_config(B, MAX_BLOCK_PAIRS)
    launch(
        preference_loss_kernel,
        (triton.cdiv(B, block),),
        pc,
        pr,
        rc,
        rr,
        pc if beta is None else beta,
        pc if chosen_lengths is None else chosen_lengths,
        pc if rejected_lengths is None else rejected_lengths,
        loss,
        chosen_rewards,
        rejected_rewards,
        grad,
        B,
        float(beta_value),
        float(label_smoothing),
        float(gamma),
        float(discopop_tau),
        float(f_alpha),
        weights_hi=tuple(_split_fp32(w)[0] for _, w in loss_terms),
        weights_lo=tuple(_split_fp32(w)[1] for _, w in loss_terms),
        LOSS_CODES=tuple(int(c) for c, _ in loss_terms),
        F_DIVERGENCE=int(f_divergence),
        HAS_BETA=beta is not None,
        HAS_CHOSEN_LENGTHS=chosen_lengths is not None,
        HAS_REJECTED_LENGTHS=rejected_lengths is not None,
        COMPUTE_GRAD=grad.numel() > 0,
        BLOCK=block,
        num_warps=num_warps,
    )


# ---- selective_logprobs -------------------------------------------------------------------------------


@triton.jit
def selective_logprobs_fwd_kernel(
    logits_ptr,  # [N, V] contiguous, any float dtype
    targets_ptr,  # [N] int32 / int64
    logp_ptr,
    lse_ptr,  # [N] accumulation dtype
    V,
    ignore_index,
    temperature: tl.float64,
    BLOCK_V: tl.constexpr,
):
    """One program per row: lse = logsumexp(z / T) by an online logsumexp over BLOCK_V chunks (a running
    max and sum per lane, combined at the end), logp = z_y / T - lse. Ignored rows write 0 and read
    nothing; a target outside [0, V) is never read and gives logp = NaN.

    The max is kept in the logits' units and every exponent is (z - max) / T, a product after the
    difference: formed as z / T - max, FMA fusion subtracts the rounded max from the exact product, and at
    T = 1e-10 that rounding gap (hundreds) made exp overflow or underflow (logp -inf / +inf)."""
    ACC = logp_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    if y == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        inv_t = 1 / tl.full([], temperature, ACC)
        row_ptr = logits_ptr + row * V
        # The running max starts at the lowest finite value, not -inf, so that masked (-inf) logits never
        # form -inf - -inf.
        m = tl.full([BLOCK_V], -finite_max(ACC), ACC)
        s = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, z)
            s = s * tl.exp((m - m_new) * inv_t) + tl.exp((z - m_new) * inv_t)
            m = m_new
        m_row = tl.max(m, axis=0)
        log_sum = tl.log(tl.sum(s * tl.exp((m - m_row) * inv_t), axis=0))
        valid = (y >= 0) & (y < V)
        z_y = tl.load(row_ptr + y, mask=valid, other=float("nan")).to(ACC)
        tl.store(logp_ptr + row, (z_y - m_row) * inv_t - log_sum)
        tl.store(lse_ptr + row, m_row * inv_t + log_sum)


@triton.jit
def selective_logprobs_bwd_kernel(
    grad_logp_ptr,
    lse_ptr,  # [N] accumulation dtype
    logits_ptr,  # [N, V] contiguous
    targets_ptr,  # [N] int32 / int64
    grad_logits_ptr,  # [N, V] logits dtype, written once
    V,
    ignore_index,
    temperature: tl.float64,
    BLOCK_V: tl.constexpr,
):
    """Grid (rows, vocabulary blocks): dz = g / T (1[v = y] - exp(z / T - lse)) in the accumulation dtype,
    rounded once to the logits dtype. Ignored rows and rows with g = 0 write zeros without reading the
    logits; a target outside [0, V) writes NaN."""
    ACC = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    out_ptrs = grad_logits_ptr + row * V + offs
    y = tl.load(targets_ptr + row).to(tl.int64)
    g = tl.load(grad_logp_ptr + row)
    if (y == ignore_index) | (g == 0):
        tl.store(out_ptrs, tl.zeros([BLOCK_V], grad_logits_ptr.dtype.element_ty), mask=mask)
    else:
        inv_t = 1 / tl.full([], temperature, ACC)
        lse = tl.load(lse_ptr + row)
        z = tl.load(logits_ptr + row * V + offs, mask=mask, other=0).to(ACC)
        g_t = g * inv_t
        dz = -g_t * tl.exp(z * inv_t - lse) + tl.where(offs == y, g_t, 0)
        dz = tl.where((y >= 0) & (y < V), dz, float("nan"))
        tl.store(out_ptrs, dz.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def launch_rows(kernel, logits, *args, vocab_blocks: bool = False) -> None:
    """Launch ``kernel(*args, BLOCK_V=...)`` over the contiguous [N, V] ``logits``: one program per row, or per row
    and vocabulary block of BLOCK_V entries with ``vocab_blocks``; BLOCK_V and the warps from launch_config."""
    N, V = logits.shape
    if N == 0 or (vocab_blocks and V == 0):  # a row program runs at V = 0 too: it writes the row's outputs
        return
    block_v, num_warps = launch_config(V, MAX_BLOCK_V)
    grid = (N, triton.cdiv(V, block_v)) if vocab_blocks else (N,)
    launch(kernel, grid, *args, BLOCK_V=block_v, num_warps=num_warps)


def launch_selective_logprobs_forward(logits, targets, logp, lse, ignore_index, temperature):
    """One program per row of the contiguous [N, V] ``logits``."""
    V = logits.shape[1]
    launch_rows(
        selective_logprobs_fwd_kernel, logits, logits, targets, logp, lse, V, int(ignore_index), float(temperature)
    )


def launch_selective_logprobs_backward(grad_logp, lse, logits, targets, grad_logits, ignore_index, temperature):
    """A (rows, vocabulary blocks) grid over the contiguous [N, V] ``logits``."""
    V = logits.shape[1]
    args = (grad_logp, lse, logits, targets, grad_logits, V, int(ignore_index), float(temperature))
    launch_rows(selective_logprobs_bwd_kernel, logits, *args, vocab_blocks=True)
