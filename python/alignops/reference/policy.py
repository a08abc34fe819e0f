"""Pure-PyTorch policy-gradient losses of the GRPO family: the spec and the test oracle of ``alignops.policy_loss``.

Written as TRL 1.16 ``GRPOTrainer._compute_loss`` writes them for one process without gradient accumulation
(its ``get_off_policy_mask`` and ``get_gamma_weights`` included), one torch expression per step, differentiated by
autograd; the kernels' closed-form gradients are tested against this file. Departures, all where TRL has no
answer: ``num_items_in_batch=None`` means the batch's own token count and ``max_completion_length=None`` the padded
length T (TRL reads both from its config and inputs); an empty batch gives a loss of 0 (TRL's mean is NaN).
"""

from __future__ import annotations

import math

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def gamma_weights(
    advantages, log_ratio_per_token, mask, importance_sampling_ratio, k_pos, lambda_pos, k_neg, lambda_neg
):
    """VESPO's phi(w) = exp(lambda + k log w - lambda w) of the sequence importance weight w (TRL's
    get_gamma_weights), detached."""
    lower = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio_per_token, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.sum(
            torch.clamp(torch.log(importance_sampling_ratio), lower, 20.0), dim=-1, keepdim=True
        )
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()


def off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, threshold):
    """DeepSeek-V3.2's off-policy sequence mask: keep a sequence when its advantage is >= 0 or its mean KL to the
    sampler is <= threshold (TRL's get_off_policy_mask)."""
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    avg = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(mask.dtype)


def policy_loss(
    per_token_logps,
    advantages,
    completion_mask,
    *,
    old_per_token_logps=None,
    ref_per_token_logps=None,
    loss_type="dapo",
    epsilon_low=0.2,
    epsilon_high=None,
    delta=None,
    importance_sampling_level="token",
    beta=0.0,
    use_bias_correction_kl=True,
    importance_sampling_ratio=None,
    num_items_in_batch=None,
    max_completion_length=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    off_policy_mask_threshold=None,
    sampling_per_token_logps=None,
    entropy_mask=None,
    reduction="mean",
):
    """(loss, metrics dict) of TRL's GRPO loss (``reduction="mean"``; ``"sum"`` drops the loss type's global
    normaliser, ``"none"`` gives the per-sequence terms [B], 1/max(M_b, 1)-scaled for grpo / sapo); ``metrics``
    holds the masked means TRL logs (clip_ratio_low,
    clip_ratio_high, clip_ratio_region — cispo's clip fraction as clip_ratio_high —, kl, mean_ratio, phi_mean)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    acc = torch.float64 if per_token_logps.dtype == torch.float64 else torch.float32
    lp = per_token_logps.to(acc)
    mask = completion_mask.to(acc)
    adv = advantages.to(acc)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    old = lp.detach() if old_per_token_logps is None else old_per_token_logps.to(acc)
    isr = None if importance_sampling_ratio is None else importance_sampling_ratio.to(acc)
    if isr is not None and isr.dim() == 1:
        isr = isr.unsqueeze(1)
    B, T = lp.shape

    if off_policy_mask_threshold is not None:
        sampling = old if sampling_per_token_logps is None else sampling_per_token_logps.to(acc)
        opm = off_policy_mask(adv, lp, sampling, mask, off_policy_mask_threshold)

    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)

    if beta != 0.0:
        ref = ref_per_token_logps.to(acc)
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    phi = None
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * lp
    elif loss_type in CLIP_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        temps = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * adv
    elif loss_type == "vespo":
        phi = gamma_weights(adv, log_ratio, mask, isr, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        per_token_loss = -phi * adv * lp
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * opm
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(acc)
    if isr is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * isr
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    per_token_loss = per_token_loss.expand(B, T)
    rows = (per_token_loss * mask).sum(-1)
    if loss_type in ("grpo", "sapo"):
        rows = rows / mask.sum(-1).clamp(min=1.0)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif B == 0:
        loss = lp.sum() * 0
    elif loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (B * (T if max_completion_length is None else max_completion_length))
    elif loss_type in ("cispo", "dapo", "vespo"):
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=acc)
        loss = (per_token_loss * mask).sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()

    def masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    nan = torch.tensor(float("nan"), dtype=acc)
    metrics = dict(clip_ratio_low=nan, clip_ratio_high=nan, clip_ratio_region=nan, kl=nan, phi_mean=nan)
    with torch.no_grad():
        if loss_type in CLIP_LOSS_TYPES:
            low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).to(acc)
            high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).to(acc)
            metrics.update(
                clip_ratio_low=masked_mean(low),
                clip_ratio_high=masked_mean(high),
                clip_ratio_region=masked_mean(torch.maximum(low, high)),
            )
        elif loss_type == "cispo":
            metrics.update(clip_ratio_high=masked_mean(((coef_1 > epsilon_high) & (adv > 0)).to(acc)))
        if beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl)
        if phi is not None:
            metrics["phi_mean"] = masked_mean(phi)
        metrics["mean_ratio"] = masked_mean(coef_1.detach())
    return loss, metrics


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits / temperature) over the last dimension: [..., V] -> [...], in
    fp32 (fp64 for fp64 logits). TRL's ``entropy_from_logits`` on logits already divided by the temperature, except
    that an entry with p = 0 (a -inf logit) adds 0, the limit of p log p, where TRL's product gives NaN."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0)).sum(-1)
