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

The loss is ``sum_n w_n (soft_label_weight d_n + hard_label_weight ce_n) / denominator`` with ``w`` the completion
mask and ``ce_n = -log softmax(z_s * temperature)[target_n]`` the cross-entropy of the student's untempered logits on
the ground-truth token (Liger's ``weight_hard_loss`` / ``weight_soft_loss`` mix; tokens whose target is -100 add no
cross-entropy); the denominator is the number of valid tokens (at least 1) or ``num_items_in_batch`` (TRL's
reduction), or 1 for ``reduction="sum"``; ``reduction="none"`` keeps the per-token values (0 on masked tokens).

:func:`topk_distillation_loss` is the offline case: the teacher is given as its top-k log-probabilities and ids.
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
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    targets=None,
):
    """(loss, per_token [N] (0 on masked rows), entropy [N] of the student, num_tokens); hidden [N, H] or
    [B, T, H], completion_mask [N] or [B, T]; ``loss`` is [N] for ``reduction="none"``."""
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
    per_token_loss = soft_label_weight * d
    if hard_label_weight != 0.0:
        per_token_loss = per_token_loss + hard_label_weight * cross_entropy(zs * temperature, targets, mask)
    return _reduce(per_token_loss, d, entropy, mask, num_items_in_batch, reduction)


def cross_entropy(z: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] ``-log softmax(z)[target]`` on rows where ``mask`` holds and the target is not -100, else 0."""
    targets = targets.reshape(-1)
    keep = mask & (targets != -100)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    ce = -torch.log_softmax(z, -1).gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(keep, ce, torch.zeros_like(ce))


def _reduce(per_token_loss, d, entropy, mask, num_items_in_batch, reduction):
    total = per_token_loss.sum()
    count = mask.sum()
    if reduction == "none":
        return per_token_loss, d, entropy, count
    if reduction == "sum":
        loss = total
    elif num_items_in_batch is not None:
        loss = total / num_items_in_batch
    else:
        loss = total / count.clamp(min=1)
    return loss, d, entropy, count


SUPPORTS = ("teacher", "tail", "renormalize")


def topk_divergence(
    student_log_probs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    support: str = "teacher",
) -> torch.Tensor:
    """[N] forward KL of the teacher's top-k against the student's full [N, V] log-softmax.

    Entries with ``teacher_topk_logprobs == -inf`` are padding (no support). ``support``:

    - ``"teacher"``: the teacher renormalised over its top-k, ``q = softmax(t)``; ``KL(q || p_s) = sum_j q_j
      (log q_j - log p_s(id_j))`` with the student's full log-softmax (a sparse-soft-target cross-entropy minus the
      teacher's entropy).
    - ``"tail"`` (TRL's ServerDistillationTrainer, ``loss_add_tail=True``): K + 1 buckets, the top-k and the rest
      ``log(1 - sum_j exp(.))``, for both models; forward KL over the buckets.
    - ``"renormalize"`` (TRL's ``loss_add_tail=False``): both models renormalised over the top-k ids.
    """
    valid = teacher_topk_logprobs > float("-inf")
    s = student_log_probs.gather(1, teacher_topk_ids)
    t = teacher_topk_logprobs
    neg_inf = torch.full_like(s, float("-inf"))
    if support == "teacher":
        log_q = torch.log_softmax(t, -1)
    elif support == "renormalize":
        log_q = torch.log_softmax(t, -1)
        s = torch.log_softmax(torch.where(valid, s, neg_inf), -1)
    elif support == "tail":
        log_q = t

        def tail(x):
            mass = torch.where(valid, x.exp(), torch.zeros_like(x)).sum(-1, keepdim=True)
            return torch.log1p(-mass.clamp(max=1 - 1e-7))

        s = torch.cat([s, tail(s)], -1)
        log_q = torch.cat([log_q, tail(t)], -1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], -1)
    else:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    q = torch.where(valid, log_q.exp(), torch.zeros_like(log_q))
    terms = q * (torch.where(valid, log_q, torch.zeros_like(log_q)) - torch.where(valid, s, torch.zeros_like(s)))
    return terms.sum(-1)


def topk_distillation_loss(
    student_hidden,
    student_weight,
    teacher_topk_logprobs,
    teacher_topk_ids,
    completion_mask,
    *,
    temperature: float = 1.0,
    support: str = "teacher",
    student_bias=None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    num_items_in_batch=None,
    reduction: str = "mean",
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    targets=None,
):
    """The materialised spec of :func:`alignops.topk_distillation_loss`: (loss, per_token, entropy, num_tokens).

    The student's logits are divided by ``temperature``; the teacher's top-k log-probs are taken as given (already
    at the distillation temperature, as a vLLM server returns them)."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    k = teacher_topk_ids.shape[-1]
    mask = completion_mask.reshape(-1) != 0
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    zs = logits(
        hs,
        student_weight,
        student_bias,
        temperature=temperature,
        logit_scale=student_logit_scale,
        softcap=student_softcap,
    )
    log_ps = torch.log_softmax(zs, -1)
    t = teacher_topk_logprobs.detach().reshape(-1, k).to(acc)
    ids = teacher_topk_ids.reshape(-1, k)
    # Masked rows may hold anything (padding): give them a harmless support before the divergence.
    t = torch.where(mask.unsqueeze(1), t, torch.zeros_like(t))
    ids = torch.where(mask.unsqueeze(1), ids, torch.zeros_like(ids))
    d = topk_divergence(log_ps, t, ids, support=support)
    d = torch.where(mask, d, torch.zeros_like(d))
    lp = log_ps.detach()
    entropy = torch.where(mask, -(lp.exp() * lp).sum(-1), torch.zeros_like(d))
    per_token_loss = soft_label_weight * d
    if hard_label_weight != 0.0:
        per_token_loss = per_token_loss + hard_label_weight * cross_entropy(zs * temperature, targets, mask)
    return _reduce(per_token_loss, d, entropy, mask, num_items_in_batch, reduction)


__all__ = [
    "DIVERGENCES",
    "SUPPORTS",
    "cross_entropy",
    "fused_linear_distillation_loss",
    "logits",
    "per_token_divergence",
    "topk_distillation_loss",
    "topk_divergence",
]
