"""alignops::fused_linear_adpa: ADPA's loss from three LM heads' inputs (student, aligned teacher, teacher
reference), in blocks of rows, with its fake kernel and autograd.

The op is written with torch GEMMs, so it serves every device torch does; no model's [N, V] logits exist at once.
It walks the rows in blocks of R (R x V x 4 bytes ~ 16 MB on the CPU, as the distillation kernel's blocks; ~128 MB
on a GPU; ``ALIGNOPS_ADPA_ROWS`` forces R). Per block: one GEMM per head, ``A = log_softmax(z_d) -
log_softmax(z_r)`` (clipped when asked), ``p_s = softmax(z_s)``, ``E = sum_v p_s A`` and, when the student needs
gradients, ``dL/dz_s = -w p_s (A - E)`` contracted at once into the student's hidden, weight and bias gradients:
five GEMMs in all, as the materialised loss's forward and backward, and a few [R, V] fp32 matrices of memory.
Arithmetic in fp32 (fp64 for fp64 students); bf16 / fp16 heads are converted to fp32 once per call (a copy of
each head's weight).

It returns the gradient of its summed loss with the loss (nothing is recomputed in backward); backward scales
it by the incoming gradient. The teachers get no gradient. On the CPU the masked rows are dropped before any
GEMM (one host sync, harmless there); on a GPU every row is computed and weighted, to keep the call free of host
syncs.
"""

from __future__ import annotations

import os

import torch

from .._dtypes import acc_dtype
from ._closed_form_grad import fake_grad_outputs, register_closed_form_autograd
from ._registration import register_fake

_SCHEMA = (
    "(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
    "Tensor ref_hidden, Tensor ref_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor? ref_bias, "
    "Tensor weights, float clip_low, float clip_high, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


# Devices whose masked rows are dropped before any GEMM (the nonzero is a host sync: harmless on the CPU only).
DROP_MASKED_ROWS_ON = ("cpu",)


def _rows_per_block(vocab: int, device: torch.device) -> int:
    # A block holds a few [R, V] fp32 matrices: ~16 MB each on the CPU (the distillation kernel's size), ~128 MB
    # on a GPU, whose GEMMs want more rows. Read per call so that tests can force several ragged blocks.
    forced = os.environ.get("ALIGNOPS_ADPA_ROWS")
    if forced:
        return max(int(forced), 1)
    budget = (128 if device.type == "cuda" else 16) * 2**20
    return max(budget // (4 * max(vocab, 1)), 1)


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


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
    dev = student_hidden.device
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    clip = clip_low > float("-inf") or clip_high < float("inf")
    rows = _rows_per_block(vocab, dev)
    w_all = weights.to(acc)
    kept = torch.nonzero(w_all).flatten() if dev.type in DROP_MASKED_ROWS_ON else None

    def pick(t):
        return t if kept is None else t.index_select(0, kept)

    hs_all, ht_all, hr_all, wk = pick(student_hidden), pick(teacher_hidden), pick(ref_hidden), pick(w_all)
    # The heads in the accumulation dtype once per call (no copy for fp32 / fp64 models), not once per block.
    heads = [
        (w.to(acc), None if b is None else b.to(acc))
        for w, b in ((student_weight, student_bias), (teacher_weight, teacher_bias), (ref_weight, ref_bias))
    ]
    m = hs_all.shape[0]
    e_kept = torch.zeros(m, dtype=acc, device=dev)
    if compute_grad:
        g_hidden_kept = torch.empty(m, student_hidden.shape[1], dtype=acc, device=dev)
        g_weight = torch.zeros(vocab, student_weight.shape[1], dtype=acc, device=dev)
        g_bias = torch.zeros(vocab if student_bias is not None else 0, dtype=acc, device=dev)
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        hs = hs_all[r0:r1].to(acc)
        zs, zd, zr = (
            torch.addmm(b, h, w.T) if b is not None else h @ w.T
            for h, (w, b) in zip((hs, ht_all[r0:r1].to(acc), hr_all[r0:r1].to(acc)), heads)
        )
        adv = _log_softmax_(zd).sub_(_log_softmax_(zr))  # A = log p_d - log p_r, in zd's storage
        del zr
        if clip:
            adv.clamp_(clip_low, clip_high)
        ps = _log_softmax_(zs).exp_()
        e = (ps * adv).sum(-1)
        e_kept[r0:r1] = e
        if not compute_grad:
            continue
        # dL/dz_s = -w p_s (A - E), built in adv's storage.
        dz = adv.sub_(e[:, None]).mul_(ps).mul_(-wk[r0:r1, None])
        del ps
        g_hidden_kept[r0:r1] = dz @ heads[0][0]
        g_weight.addmm_(dz.T, hs)
        if student_bias is not None:
            g_bias += dz.sum(0)

    total = -(e_kept * wk).sum()
    if kept is None:
        per_token = e_kept
    else:
        per_token = torch.zeros(n, dtype=acc, device=dev).index_copy_(0, kept, e_kept)
    if not compute_grad:
        empty = student_hidden.new_empty(0, dtype=acc)
        return total, per_token, empty, empty.clone(), empty.clone()
    if kept is None:
        g_hidden = g_hidden_kept
    else:
        g_hidden = torch.zeros(n, student_hidden.shape[1], dtype=acc, device=dev).index_copy_(0, kept, g_hidden_kept)
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
    return (
        new((), dtype=acc),
        new(n, dtype=acc),
        *fake_grad_outputs(student_hidden, student_weight, student_bias, compute_grad),
    )


register_closed_form_autograd("alignops::fused_linear_adpa", 13, 2, 6, "alignops.adpa_loss")
