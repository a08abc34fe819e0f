"""ADPA and DCKD (Gao et al., "Advantage-Guided Distillation for Preference Alignment in Small Language Models",
ICLR 2025) written the obvious way: every model's [N, V] logits are materialised. The spec of
:func:`alignops.adpa_loss` / :func:`alignops.dckd_loss` and their test oracle.

Three heads read the same token positions: the student ``s`` (trained), the preference-aligned (DPO) teacher
``d`` and the teacher's reference (its SFT model) ``r``, both frozen. Logits ``z = hidden @ weight^T + bias``
in fp32 (fp64 for fp64 inputs), ``p = softmax(z)``, ``log p = log_softmax(z)``.

- ADPA, per token: the distribution-level advantage ``A(v) = log p_d(v) - log p_r(v)`` over the whole
  vocabulary (optionally clipped to ``[lo, hi]``) and the student's expected advantage
  ``E = sum_v p_s(v) A(v)``; the loss is ``-sum_masked E / denominator``. The gradient w.r.t. the student's
  logits is ``-p_s(v) (A(v) - E)`` per token (a policy gradient with the teacher's advantage as reward).
- DCKD: forward KL ``KL(p_d || p_s) = sum_v p_d (log p_d - log p_s)`` per token, averaged over the chosen
  response's tokens and over the rejected response's tokens separately, and
  ``loss = chosen_weight * mean_chosen + rejected_weight * mean_rejected``.
"""

from __future__ import annotations

import torch

from .distillation import logits


def expected_advantage(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    advantage_clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """[N] ``E = sum_v softmax(z_s)(v) * A(v)`` with ``A = log_softmax(z_d) - log_softmax(z_r)`` (clipped)."""
    adv = torch.log_softmax(teacher_logits, -1) - torch.log_softmax(ref_logits, -1)
    if advantage_clip is not None:
        adv = adv.clamp(advantage_clip[0], advantage_clip[1])
    return (torch.softmax(student_logits, -1) * adv).sum(-1)


def adpa_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    advantage_clip: tuple[float, float] | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-token expected advantage [N], number of masked-in tokens). Denominator: the token count (at
    least 1), ``num_items_in_batch`` when given, 1 for ``reduction="sum"``."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    zs = logits(hs, student_weight, student_bias)
    with torch.no_grad():
        zd = logits(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias).to(zs.dtype)
        zr = logits(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias).to(zs.dtype)
    e = expected_advantage(zs, zd, zr, advantage_clip=advantage_clip)
    w = (completion_mask.reshape(-1) != 0).to(e.dtype)
    count = w.sum().to(torch.int64)
    total = -(e * w).sum()
    if reduction == "sum":
        loss = total
    elif num_items_in_batch is not None:
        loss = total / num_items_in_batch
    else:
        loss = total / count.clamp(min=1)
    return loss, e, count


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[N] ``KL(p_t || p_s)`` per row."""
    log_ps = torch.log_softmax(student_logits, -1)
    log_pt = torch.log_softmax(teacher_logits, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def dckd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    chosen_weight: float = 1.0,
    rejected_weight: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen mean KL, rejected mean KL, chosen count, rejected count); a mean over no token is 0."""
    zs = logits(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    with torch.no_grad():
        zt = logits(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias)
    kl = forward_kl(zs, zt.to(zs.dtype))
    means, counts = [], []
    for mask in (chosen_mask, rejected_mask):
        w = (mask.reshape(-1) != 0).to(kl.dtype)
        c = w.sum().to(torch.int64)
        means.append((kl * w).sum() / c.clamp(min=1))
        counts.append(c)
    loss = chosen_weight * means[0] + rejected_weight * means[1]
    return loss, means[0], means[1], counts[0], counts[1]


__all__ = ["adpa_loss", "dckd_loss", "expected_advantage", "forward_kl"]
