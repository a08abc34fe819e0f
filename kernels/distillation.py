"""Triton epilogue of ``alignops::fused_linear_distillation_triton`` and its row-block loop.

The op (python/alignops/ops/distillation.py) walks the N rows in blocks of R. Per block, ``torch.mm``
gives both models' raw logits u = h @ W^T + b in the accumulation dtype ([R, V] each, R chosen so that a block
is about ``BLOCK_BYTES``), and ``distillation_rows_kernel`` (one program per row) applies the logit
transforms, folds each row into its two logsumexps and the student's entropy, computes the divergence d and,
with GRAD, overwrites the student's block with dz = w ps (G - sum_v ps G) dz/du (forward KL: ps - pt), the
closed form of csrc/distillation/fused_linear_distillation_cpu.cpp. Then grad_hidden[block] = dz @ W_s and
grad_weight += dz^T @ h_s.

Rows with weight 0 are not dropped before the GEMMs (that would need a host sync to size the gathered rows);
the kernel reads nothing of them and writes d = 0 and a zero row of dz, so they add nothing to the gradients
as long as their hidden states are finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._codes import DistillationMode
from ._launch import launch, tile
from ._tl import finite_max
from .fused_linear import _logits
from .preference import launch_config

BLOCK_BYTES = 64 << 20  # per [R, V] block of one model
MAX_BLOCK_V = 4096
BLOCK_ROWS: int | None = None  # forces R (the tests set it small to cover several blocks)

FORWARD_KL = tl.constexpr(int(DistillationMode.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(DistillationMode.REVERSE_KL))
JSD = tl.constexpr(int(DistillationMode.JSD))
TV = tl.constexpr(int(DistillationMode.TV))
SKEW_KL = tl.constexpr(int(DistillationMode.SKEW_KL))


@triton.jit
def _logaddexp(x, y):
    top = tl.maximum(x, y)
    return top + tl.log(tl.exp(x - top) + tl.exp(y - top))


@triton.jit
def _lse(u_ptr, V, scale, cap, inv_t, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """logsumexp over the row of the transformed logits (a running max and sum per lane)."""
    ACC = u_ptr.dtype.element_ty
    m = tl.full([BLOCK_V], -finite_max(ACC), ACC)
    s = tl.zeros([BLOCK_V], ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z, _ = _logits(tl.load(u_ptr + offs, mask=offs < V, other=0), scale, cap, inv_t, SOFTCAP)
        z = tl.where(offs < V, z, float("-inf"))
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    return m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))


@triton.jit
def _terms(log_ps, log_pt, coef, MODE: tl.constexpr):
    """(d_v, G_v) of one column: d = sum_v d_v, dz = ps (G - sum_v ps G) (G unused for the forward KL)."""
    ps = tl.exp(log_ps)
    pt = tl.exp(log_pt)
    if MODE == FORWARD_KL:
        d = pt * (log_pt - log_ps)
        G = tl.zeros_like(ps)
    elif MODE == REVERSE_KL:
        G = log_ps - log_pt
        d = ps * G
    elif MODE == JSD:
        log_m = _logaddexp(log_ps + tl.log(1 - coef), log_pt + tl.log(coef))
        d = coef * pt * (log_pt - log_m) + (1 - coef) * ps * (log_ps - log_m)
        G = (1 - coef) * (log_ps - log_m)
    elif MODE == TV:
        diff = ps - pt
        d = 0.5 * tl.abs(diff)
        G = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
    elif MODE == SKEW_KL:
        log_ratio = log_pt - _logaddexp(log_pt + tl.log(coef), log_ps + tl.log(1 - coef))
        d = pt * log_ratio
        G = -(1 - coef) * tl.exp(log_ratio)
    else:
        log_ratio = log_ps - _logaddexp(log_ps + tl.log(coef), log_pt + tl.log(1 - coef))
        d = ps * log_ratio
        G = log_ratio - coef * tl.exp(log_ratio)
    return d, G


@triton.jit
def distillation_rows_kernel(
    us_ptr,  # [R, V] student raw logits (bias added), accumulation dtype; becomes dz with GRAD
    ut_ptr,  # [R, V] teacher raw logits
    w_ptr,  # [R] row weights (0: skipped)
    d_ptr,
    ent_ptr,  # [R] outputs: divergence, student entropy
    V,
    coef: tl.float64,
    temperature: tl.float64,
    s_scale: tl.float64,
    s_cap: tl.float64,
    t_scale: tl.float64,
    t_cap: tl.float64,
    MODE: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    ACC = d_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    us_row = us_ptr + row * V
    ut_row = ut_ptr + row * V
    w = tl.load(w_ptr + row)
    if w == 0:
        tl.store(d_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        if GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(us_row + offs, tl.zeros([BLOCK_V], ACC), mask=offs < V)
    else:
        inv_t = 1 / tl.full([], temperature, ACC)
        c = tl.full([], coef, ACC)
        ss, sc = tl.full([], s_scale, ACC), tl.full([], s_cap, ACC)
        ts, tc = tl.full([], t_scale, ACC), tl.full([], t_cap, ACC)
        lse_s = _lse(us_row, V, ss, sc, inv_t, S_SOFTCAP, BLOCK_V)
        lse_t = _lse(ut_row, V, ts, tc, inv_t, T_SOFTCAP, BLOCK_V)
        d_acc = tl.zeros([BLOCK_V], ACC)
        aux_acc = tl.zeros([BLOCK_V], ACC)
        pz_acc = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            zs, _ = _logits(tl.load(us_row + offs, mask=mask, other=0), ss, sc, inv_t, S_SOFTCAP)
            zt, _ = _logits(tl.load(ut_row + offs, mask=mask, other=0), ts, tc, inv_t, T_SOFTCAP)
            d, G = _terms(zs - lse_s, zt - lse_t, c, MODE)
            ps = tl.exp(zs - lse_s)
            d_acc += tl.where(mask, d, 0)
            aux_acc += tl.where(mask, ps * G, 0)
            pz_acc += tl.where(mask, ps * zs, 0)
        tl.store(d_ptr + row, tl.sum(d_acc, axis=0))
        tl.store(ent_ptr + row, lse_s - tl.sum(pz_acc, axis=0))
        if GRAD:
            aux = tl.sum(aux_acc, axis=0)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                zs, dzdu = _logits(tl.load(us_row + offs, mask=mask, other=0), ss, sc, inv_t, S_SOFTCAP)
                zt, _ = _logits(tl.load(ut_row + offs, mask=mask, other=0), ts, tc, inv_t, T_SOFTCAP)
                log_ps = zs - lse_s
                log_pt = zt - lse_t
                ps = tl.exp(log_ps)
                if MODE == FORWARD_KL:
                    dz = ps - tl.exp(log_pt)
                else:
                    _, G = _terms(log_ps, log_pt, c, MODE)
                    dz = ps * (G - aux)
                tl.store(us_row + offs, w * dz * dzdu, mask=mask)


def _mm(h, w, b, acc):
    h, w = h.to(acc), w.to(acc)
    return torch.mm(h, w.t()) if b is None else torch.addmm(b.to(acc), h, w.t())


def block_rows(V: int, acc: torch.dtype) -> int:
    if BLOCK_ROWS is not None:
        return BLOCK_ROWS
    return max(16, BLOCK_BYTES // (acc.itemsize * max(V, 1)))


def launch_distillation(
    hs,
    ws,
    ht,
    wt,
    bs,
    bt,
    weights,
    mode,
    coef,
    temperature,
    s_scale,
    t_scale,
    s_cap,
    t_cap,
    per_token,
    entropy,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    """Fills per_token / entropy [N] and, when grad_hidden is non-empty, the accumulation-dtype gradients."""
    N = hs.shape[0]
    V = ws.shape[0]
    acc = per_token.dtype
    grad = grad_hidden.numel() > 0
    block_v, num_warps = launch_config(V, tile(hs, "distillation.block_v", MAX_BLOCK_V))
    R = block_rows(V, acc)
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        us = _mm(hs[r0:r1], ws, bs, acc)
        ut = _mm(ht[r0:r1], wt, bt, acc)
        launch(
            distillation_rows_kernel,
            (r1 - r0,),
            us,
            ut,
            weights[r0:r1],
            per_token[r0:r1],
            entropy[r0:r1],
            V,
            float(coef),
            float(temperature),
            float(s_scale),
            float(s_cap),
            float(t_scale),
            float(t_cap),
            MODE=int(DistillationMode[mode.upper()]),
            S_SOFTCAP=s_cap > 0,
            T_SOFTCAP=t_cap > 0,
            GRAD=grad,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        if grad:
            grad_hidden[r0:r1] = us @ ws.to(acc)
            grad_weight.addmm_(us.t(), hs[r0:r1].to(acc))
            if grad_bias.numel() > 0:
                grad_bias += us.sum(0)
