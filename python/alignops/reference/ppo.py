"""PPO's advantage estimation and clipped value loss, written the obvious way: the spec and the test oracle.

GAE [Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"] as
TRL's PPOTrainer computes it (trl/trainer/ppo_trainer.py up to v1.12, removed in v1.13; its loop over
``reversed(range(gen_length))`` with ``lastgaelam``):

    delta_t = r_t + gamma * V_{t+1} - V_t,        A_t = delta_t + gamma * lam * A_{t+1},        R_t = A_t + V_t

A position outside ``completion_mask`` holds A_t = R_t = 0 and ends the episode: the position before it takes
V_{t+1} = 0 and A_{t+1} = 0, exactly what TRL's loop gives on padding that TRL has zero-filled (rewards and
values 0 after the last token). After position T-1, V_T = ``last_values`` (0 when None, as TRL) and A_T = 0.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    last_values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] in the dtype of ``rewards``; the scan runs in fp32 (fp64 for fp64)."""
    acc = _acc(rewards)
    r, v = rewards.to(acc), values.to(acc)
    mask = completion_mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=acc, device=r.device)
    next_value = last_values.to(acc) if last_values is not None else torch.zeros(B, dtype=acc, device=r.device)
    gae = torch.zeros(B, dtype=acc, device=r.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        gae = torch.where(m, delta + gamma * lam * gae, 0.0)
        next_value = torch.where(m, v[:, t], 0.0)
        adv[:, t] = gae
    ret = torch.where(mask, adv + v, 0.0)
    return adv.to(rewards.dtype), ret.to(rewards.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``masked_whiten(values, mask)`` (shift_mean=True): (x - mean) * rsqrt(var + 1e-8) with the mean and
    the unbiased (Bessel-corrected) variance over the masked entries of the whole batch; then 0 outside the
    mask, as TRL's ``masked_fill`` after it. In fp32 (fp64 for fp64)."""
    x = values.to(_acc(values))
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n * (n / (n - 1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask.bool(), out, 0.0).to(values.dtype)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    completion_mask: torch.Tensor,
    cliprange_value: float = 0.2,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL PPOTrainer's value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), its masked mean,
    and vf_clipfrac = masked mean of [clipped term > unclipped term]. In fp32 (fp64 for fp64)."""
    acc = _acc(values)
    v, vo, R = values.to(acc), old_values.to(acc), returns.to(acc)
    mask = completion_mask.bool()
    vclipped = torch.clamp(v, vo - cliprange_value, vo + cliprange_value)
    l1 = (v - R) ** 2
    l2 = (vclipped - R) ** 2
    per_token = torch.where(mask, 0.5 * torch.maximum(l1, l2), 0.0)
    count = mask.sum().clamp(min=1).to(acc)
    clipfrac = ((l2 > l1) & mask).sum().to(acc) / count
    if reduction == "none":
        return per_token, clipfrac
    total = per_token.sum()
    return (total / count if reduction == "mean" else total), clipfrac
