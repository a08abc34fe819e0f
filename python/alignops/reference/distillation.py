"""Teacher-student divergences from LM-head inputs, written the obvious way: both models' [N, V] logits are
materialised. The spec of :func:`alignops.fused_linear_distillation_loss` and its test oracle.

Logits ``z = transform(hidden @ weight^T + bias) / temperature`` with ``transform(u) = softcap tanh(logit_scale
u / softcap)`` (``logit_scale u`` without softcap), as TRL 1.16's ``_chunked_divergence_loss``; ``p_s`` and
``p_t`` are the softmaxes of the student's and the teacher's logits. Per token:

- ``jsd`` (TRL's generalised JSD, ``beta``): ``beta = 0`` forward KL(p_t || p_s), ``beta = 1`` reverse
  KL(p_s || p_t), otherwise ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = (1 - beta) p_s + beta p_t``.
- ``tv``: total variation ``0.5 sum_v |p_s - p_t|``.
- ``skew_kl`` (DistiLLM, skew ``alpha``): ``KL(p_t || alpha p_t + (1 - alpha) p_s)``.
- ``skew_reverse_kl``: ``KL(p_s || alpha p_s + (1 - alpha) p_t)``.

The loss is ``sum_n w_n d_n / denominator`` with ``w`` the completion mask; the denominator is the number of
valid tokens (at least 1) or ``num_items_in_batch`` (TRL's reduction), or 1 for ``reduction="sum"``.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("jsd", "tv", "skew_kl", "skew_reverse_kl")


def logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """[N, V] logits in fp32 (fp64 for fp64 inputs), transformed and divided by the temperature."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    u = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        u = u + bias.to(acc)
    u = u * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u / temperature


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """[N] divergence of every row of two [N, V] logits matrices (already divided by the temperature)."""
    log_ps = torch.log_softmax(student_logits, -1)
    log_pt = torch.log_softmax(teacher_logits, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "jsd":
        if beta == 0.0:
            return (pt * (log_pt - log_ps)).sum(-1)
        if beta == 1.0:
            return (ps * (log_ps - log_pt)).sum(-1)
        log_m = torch.log((1 - beta) * ps + beta * pt)
        return (beta * pt * (log_pt - log_m) + (1 - beta) * ps * (log_ps - log_m)).sum(-1)
    if divergence == "tv":
        return 0.5 * (ps - pt).abs().sum(-1)
    if divergence == "skew_kl":
        return (pt * (log_pt - torch.log(skew * pt + (1 - skew) * ps))).sum(-1)
    if divergence == "skew_reverse_kl":
        return (ps * (log_ps - torch.log(skew * ps + (1 - skew) * pt))).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def fused_linear_distillation_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    completion_mask,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    divergence: str = "jsd",
    student_bias=None,
    teacher_bias=None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    num_items_in_batch=None,
    reduction: str = "mean",
):
    """(loss, per_token [N] (0 on masked rows), entropy [N] of the student, num_tokens); hidden [N, H] or
    [B, T, H], completion_mask [N] or [B, T]."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    mask = completion_mask.reshape(-1) != 0
    zs = logits(
        hs,
        student_weight,
        student_bias,
        temperature=temperature,
        logit_scale=student_logit_scale,
        softcap=student_softcap,
    )
    zt = logits(
        ht,
        teacher_weight,
        teacher_bias,
        temperature=temperature,
        logit_scale=teacher_logit_scale,
        softcap=teacher_softcap,
    ).detach()
    d = per_token_divergence(zs, zt, divergence=divergence, beta=beta, skew=skew)
    d = torch.where(mask, d, torch.zeros_like(d))
    log_ps = torch.log_softmax(zs.detach(), -1)
    entropy = torch.where(mask, -(log_ps.exp() * log_ps).sum(-1), torch.zeros_like(d))
    total = d.sum()
    count = mask.sum()
    if reduction == "sum":
        loss = total
    elif num_items_in_batch is not None:
        loss = total / num_items_in_batch
    else:
        loss = total / count.clamp(min=1)
    return loss, d, entropy, count


__all__ = ["DIVERGENCES", "fused_linear_distillation_loss", "logits", "per_token_divergence"]
