"""alignops::fused_linear_adpa: ADPA's loss from three LM heads' inputs (student, aligned teacher, teacher
reference), vocab-tiled, with its fake kernel and autograd.

The op is written with torch GEMMs on tiles (rows x vocabulary), so it serves every device torch does; no model's
[N, V] logits exist at once, only a few [R, V_tile] tiles. Per block of R rows:

1. one pass over the vocabulary tiles: the three heads' running log-sum-exps and, without a clip, the running
   ``p_s``-weighted mean of ``z_d - z_r`` (``sum_v p_s (log p_d - log p_r) = sum_v p_s (z_d - z_r) - (lse_d -
   lse_r)`` because ``sum_v p_s = 1``), merged across tiles as a running softmax-weighted mean;
2. with a clip, a second pass for ``E = sum_v p_s clip(A)`` (the clip needs ``A`` itself, known once the
   log-sum-exps are);
3. when the student needs gradients, a last pass: ``dL/dz_s = -w p_s (A - E)`` per tile, contracted at once
   into the student's hidden, weight and bias gradients (fp32, fp64 for fp64 students).

It returns the gradient of its summed loss with the loss (the tiles are not recomputed in backward); backward
scales it by the incoming gradient. The teachers get no gradient. On the CPU the masked rows are dropped before
any GEMM (one host sync, harmless there); on a GPU every row is computed and weighted, to keep the call free of
host syncs.
"""

from __future__ import annotations

import os

import torch

from ._registration import register_fake
from .preference import acc_dtype

_SCHEMA = (
    "(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
    "Tensor ref_hidden, Tensor ref_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor? ref_bias, "
    "Tensor weights, float clip_low, float clip_high, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _sizes() -> tuple[int, int]:
    # Read per call so that tests can force several ragged blocks and tiles on small shapes.
    rows = int(os.environ.get("ALIGNOPS_ADPA_ROWS", "1024"))
    tile = int(os.environ.get("ALIGNOPS_ADPA_VOCAB_TILE", "4096"))
    return max(rows, 1), max(tile, 1)


def _head(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    z = h @ w[v0:v1].to(h.dtype).T
    if b is not None:
        z = z + b[v0:v1].to(h.dtype)
    return z


@torch.library.custom_op("alignops::fused_linear_adpa", mutates_args=(), schema=_SCHEMA)
def fused_linear_adpa(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    weights: torch.Tensor,
    clip_low: float,
    clip_high: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss ``-sum_n w_n E_n``, ``E`` [N], grad of the summed loss w.r.t. student_hidden [N, Hs],
    student_weight [V, Hs], student_bias [V] (empty [0] tensors without compute_grad / bias))."""
    acc = acc_dtype(student_hidden.dtype)
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    clip = clip_low > float("-inf") or clip_high < float("inf")
    rows_per_block, tile = _sizes()
    w_all = weights.to(acc)
    if student_hidden.device.type == "cpu":
        kept = torch.nonzero(w_all).flatten()
    else:
        kept = None
    hs_all = student_hidden if kept is None else student_hidden.index_select(0, kept)
    ht_all = teacher_hidden if kept is None else teacher_hidden.index_select(0, kept)
    hr_all = ref_hidden if kept is None else ref_hidden.index_select(0, kept)
    wk = w_all if kept is None else w_all.index_select(0, kept)
    m = hs_all.shape[0]

    e_kept = torch.zeros(m, dtype=acc, device=student_hidden.device)
    if compute_grad:
        g_hidden_kept = torch.zeros(m, student_hidden.shape[1], dtype=acc, device=student_hidden.device)
        g_weight = torch.zeros(vocab, student_weight.shape[1], dtype=acc, device=student_weight.device)
        g_bias = torch.zeros(vocab if student_bias is not None else 0, dtype=acc, device=student_weight.device)
    tiles = [(v0, min(v0 + tile, vocab)) for v0 in range(0, vocab, tile)]
    for r0 in range(0, m, rows_per_block):
        r1 = min(r0 + rows_per_block, m)
        hs = hs_all[r0:r1].to(acc)
        ht = ht_all[r0:r1].to(acc)
        hr = hr_all[r0:r1].to(acc)
        neg_inf = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=hs.device)
        lse_s, lse_d, lse_r = neg_inf, neg_inf.clone(), neg_inf.clone()
        mean_gap = torch.zeros(r1 - r0, dtype=acc, device=hs.device)
        for v0, v1 in tiles:
            zs = _head(hs, student_weight, student_bias, v0, v1)
            zd = _head(ht, teacher_weight, teacher_bias, v0, v1)
            zr = _head(hr, ref_weight, ref_bias, v0, v1)
            ls = torch.logsumexp(zs, -1)
            new = torch.logaddexp(lse_s, ls)
            if not clip:
                gap = (torch.exp(zs - ls[:, None]) * (zd - zr)).sum(-1)
                mean_gap = mean_gap * torch.exp(lse_s - new) + gap * torch.exp(ls - new)
            lse_s = new
            lse_d = torch.logaddexp(lse_d, torch.logsumexp(zd, -1))
            lse_r = torch.logaddexp(lse_r, torch.logsumexp(zr, -1))
        shift = lse_d - lse_r
        if not clip:
            e = mean_gap - shift
        else:
            e = torch.zeros(r1 - r0, dtype=acc, device=hs.device)
            for v0, v1 in tiles:
                zs = _head(hs, student_weight, student_bias, v0, v1)
                adv = (
                    _head(ht, teacher_weight, teacher_bias, v0, v1)
                    - _head(hr, ref_weight, ref_bias, v0, v1)
                    - shift[:, None]
                ).clamp(clip_low, clip_high)
                e = e + (torch.exp(zs - lse_s[:, None]) * adv).sum(-1)
        e_kept[r0:r1] = e
        if not compute_grad:
            continue
        w = wk[r0:r1, None]
        for v0, v1 in tiles:
            zs = _head(hs, student_weight, student_bias, v0, v1)
            adv = _head(ht, teacher_weight, teacher_bias, v0, v1) - _head(hr, ref_weight, ref_bias, v0, v1)
            adv = adv - shift[:, None]
            if clip:
                adv = adv.clamp(clip_low, clip_high)
            dz = -w * torch.exp(zs - lse_s[:, None]) * (adv - e[:, None])
            g_hidden_kept[r0:r1] += dz @ student_weight[v0:v1].to(acc)
            g_weight[v0:v1] += dz.T @ hs
            if student_bias is not None:
                g_bias[v0:v1] += dz.sum(0)

    total = -(e_kept * wk).sum()
    if kept is None:
        per_token = e_kept
    else:
        per_token = torch.zeros(n, dtype=acc, device=student_hidden.device).index_copy_(0, kept, e_kept)
    if not compute_grad:
        empty = student_hidden.new_empty(0, dtype=acc)
        return total, per_token, empty, empty.clone(), empty.clone()
    if kept is None:
        g_hidden = g_hidden_kept
    else:
        g_hidden = torch.zeros(n, student_hidden.shape[1], dtype=acc, device=student_hidden.device)
        g_hidden.index_copy_(0, kept, g_hidden_kept)
    return (
        total,
        per_token,
        g_hidden.to(student_hidden.dtype),
        g_weight.to(student_weight.dtype),
        g_bias.to(student_bias.dtype) if student_bias is not None else g_bias,
    )


@register_fake("alignops::fused_linear_adpa")
def _fused_linear_adpa_fake(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    ref_hidden,
    ref_weight,
    student_bias,
    teacher_bias,
    ref_bias,
    weights,
    clip_low,
    clip_high,
    compute_grad,
):
    acc = acc_dtype(student_hidden.dtype)
    new = student_hidden.new_empty
    n = student_hidden.shape[0]
    if not compute_grad:
        return new((), dtype=acc), new(n, dtype=acc), new(0, dtype=acc), new(0, dtype=acc), new(0, dtype=acc)
    grad_bias = new(
        student_weight.shape[0] if student_bias is not None else 0,
        dtype=student_bias.dtype if student_bias is not None else acc,
    )
    return (
        new((), dtype=acc),
        new(n, dtype=acc),
        torch.empty_like(student_hidden, memory_format=torch.contiguous_format),
        torch.empty_like(student_weight, memory_format=torch.contiguous_format),
        grad_bias,
    )


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(*output[2:])


def _backward(ctx, grad_loss, *_unused):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 13
    if not ctx.compute_grad:
        raise RuntimeError(
            "alignops::fused_linear_adpa was called with compute_grad=False; call it through alignops.adpa_loss "
            "(which sets it) to differentiate"
        )
    needs = ctx.needs_input_grad
    return (
        grad_hidden * grad_loss.to(grad_hidden.dtype) if needs[0] else None,
        grad_weight * grad_loss.to(grad_weight.dtype) if needs[1] else None,
        None,
        None,
        None,
        None,
        grad_bias * grad_loss.to(grad_bias.dtype) if needs[6] and grad_bias.numel() else None,
        *(None,) * 6,
    )


torch.library.register_autograd("alignops::fused_linear_adpa", _backward, setup_context=_setup)
