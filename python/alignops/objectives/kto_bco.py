"""Unpaired objectives: KTO (with TRL's KL reference point) and BCO (with its running reward shift)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._checks import check_same_device
from .._errors import AlignopsError
from ._common import (
    _acc_dtype,
    _all_reduce_sum,
    _check_float,
    _check_labels,
    _check_like,
    _check_nonnegative,
    _check_positive,
    _check_reduction,
    _reduce,
    _unpaired_margins,
)

# ---- KTO ---------------------------------------------------------------------------------------------


class KTOLossOutput(NamedTuple):
    """``loss``; per sample the ``rewards`` ``beta * (logp - ref_logp)``; the KL estimate ``kl`` (0-d) used;
    sums and counts of the desirable / undesirable rewards (all-reduce them for TRL's global means)."""

    loss: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    chosen_rewards_sum: torch.Tensor
    rejected_rewards_sum: torch.Tensor
    num_chosen: torch.Tensor
    num_rejected: torch.Tensor

    margins = property(_unpaired_margins)


def _global_mean(x: torch.Tensor, process_group) -> torch.Tensor:
    """Mean of ``x`` over every rank: one all-reduce of (sum, count) in fp64; 0 when there is nothing."""
    stats = torch.stack([x.double().sum(), x.new_tensor(float(x.numel()), dtype=torch.float64)])
    _all_reduce_sum(stats, process_group)
    return stats[0] / stats[1].clamp(min=1.0)


def _unpaired_stats(rewards: torch.Tensor, desirable: torch.Tensor):
    zero = torch.zeros_like(rewards)
    return (
        torch.where(desirable, rewards, zero).sum(),
        torch.where(desirable, zero, rewards).sum(),
        desirable.sum(),
        (~desirable).sum(),
    )


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    is_desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: float | torch.Tensor | None = None,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    loss_type: str = "kto",
    process_group=None,
    reduction: str = "mean",
) -> KTOLossOutput:
    r"""KTO (Ethayarajh et al. 2024, Eq. 7) on unpaired samples, with TRL's KL estimate.

    With ``x = policy_logps - ref_logps`` (``ref_logps=None``: 0) and the reference point ``z0``::

        desirable:    w_d * (1 - sigmoid(beta * (x - z0)))
        undesirable:  w_u * (1 - sigmoid(beta * (z0 - x)))

    ``z0``: ``kl`` when given (used as is, detached); else from the mismatched (KL) completions,
    ``z0 = max(0, mean(policy_kl_logps - ref_kl_logps))`` over the KL completions of *every* rank
    (one all-reduce SUM of (sum, count) over ``process_group`` once torch.distributed is initialised; the
    default group when ``process_group`` is None), detached; else 0. TRL averages the per-rank means
    instead: the same number whenever ranks hold equally many KL completions, as they do in TRL.
    ``loss_type="apo_zero_unpaired"`` (APO-zero, unpaired) is the same with ``z0 = 0`` and takes no KL.

    ``reduction="mean"`` is TRL's ``losses.nanmean()`` over the B samples (weights are not normalised).
    The loss is ``sigmoid(-t)`` rather than ``1 - sigmoid(t)``: equal, without the cancellation.
    Gradients flow to ``policy_logps`` and ``ref_logps`` only. Raises ValueError for bad shapes,
    dtypes, devices, labels, ``beta <= 0``, negative weights and inconsistent KL arguments.
    """
    _check_float("policy_logps", policy_logps, 1, "[B]")
    if ref_logps is not None:
        _check_like("ref_logps", ref_logps, policy_logps, "policy_logps")
    desirable = _check_labels("is_desirable", is_desirable, policy_logps, "policy_logps")
    _check_positive("beta", beta)
    _check_nonnegative("desirable_weight", desirable_weight)
    _check_nonnegative("undesirable_weight", undesirable_weight)
    _check_reduction(reduction)
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise AlignopsError(f"loss_type must be 'kto' or 'apo_zero_unpaired', got {loss_type!r}")
    has_kl_logps = policy_kl_logps is not None or ref_kl_logps is not None
    if kl is not None and has_kl_logps:
        raise AlignopsError("pass either kl or policy_kl_logps / ref_kl_logps, not both")
    if loss_type == "apo_zero_unpaired" and (kl is not None or has_kl_logps):
        raise AlignopsError(
            "loss_type='apo_zero_unpaired' uses no KL estimate: drop kl / policy_kl_logps / ref_kl_logps"
        )
    if has_kl_logps:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise AlignopsError("policy_kl_logps and ref_kl_logps go together: pass both or neither")
        _check_float("policy_kl_logps", policy_kl_logps, 1, "[M] (one per KL completion)")
        _check_like("ref_kl_logps", ref_kl_logps, policy_kl_logps, "policy_kl_logps")
        check_same_device([("policy_logps", policy_logps), ("policy_kl_logps", policy_kl_logps)])

    acc = _acc_dtype(policy_logps, ref_logps)
    x = policy_logps.to(acc) if ref_logps is None else policy_logps.to(acc) - ref_logps.to(acc)
    if kl is not None:
        z0 = torch.as_tensor(kl, dtype=acc, device=x.device).detach()
        if z0.numel() != 1:
            raise AlignopsError(f"kl must be a number or a one-element tensor, got shape {tuple(z0.shape)}")
        z0 = z0.reshape(())
    elif has_kl_logps:
        with torch.no_grad():
            diff = policy_kl_logps.detach().to(acc) - ref_kl_logps.detach().to(acc)
            z0 = _global_mean(diff, process_group).clamp(min=0.0).to(acc)
    else:
        z0 = x.new_zeros(())

    t = beta * (x - z0)
    per_sample = torch.where(desirable, torch.sigmoid(-t), torch.sigmoid(t))
    weights = torch.where(desirable, x.new_tensor(desirable_weight), x.new_tensor(undesirable_weight))
    loss = _reduce(weights * per_sample, reduction)
    rewards = (beta * x).detach()
    return KTOLossOutput(loss, rewards, z0, *_unpaired_stats(rewards, desirable))


# ---- BCO ---------------------------------------------------------------------------------------------


class RunningMoments:
    r"""Running mean and variance of a stream of batches, merged across ranks: BCO's reward shift ``delta``.

    TRL's ``RunningMoments`` (from MOSS-RLHF) without accelerate: each :meth:`update` takes the batch's
    global mean and (biased) variance over ``process_group`` (all-reduce SUM of (sum, count), then of
    the squared deviations: two passes, no catastrophic cancellation) and merges them into the running
    ``mean`` / ``var`` with Chan et al.'s parallel formula. Starts at mean 0, var 1, count 1e-24 as TRL.
    The state is fp64 0-d tensors on the device of the last batch (no host sync); :meth:`state_dict` /
    :meth:`load_state_dict` checkpoint it (TRL keeps it in ``running.json``).
    """

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 1e-24, std: float = 1.0):
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.var = torch.tensor(var, dtype=torch.float64)
        self.std = torch.tensor(std, dtype=torch.float64)
        self.count = torch.tensor(count, dtype=torch.float64)

    @torch.no_grad()
    def update(self, xs: torch.Tensor, process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge the batch ``xs`` (all ranks' values); returns its global mean and unbiased std."""
        xs = xs.detach().reshape(-1).to(torch.float64)
        stats = torch.stack([xs.sum(), xs.new_tensor(float(xs.numel()))])
        _all_reduce_sum(stats, process_group)
        n = stats[1]
        batch_mean = stats[0] / n.clamp(min=1.0)
        sq = ((xs - batch_mean) ** 2).sum()
        _all_reduce_sum(sq, process_group)
        batch_var = sq / n.clamp(min=1.0)

        mean, var, count = (s.to(xs.device) for s in (self.mean, self.var, self.count))
        delta = batch_mean - mean
        total = count + n
        merged = var * count + delta**2 * count * n / total + batch_var * n
        new_var = merged / total
        keep = n == 0  # an empty batch on every rank leaves the state as it was
        self.mean = torch.where(keep, mean, mean + delta * n / total)
        self.var = torch.where(keep, var, new_var)
        self.std = torch.where(keep, self.std.to(xs.device), (new_var * total / (total - 1)).sqrt())
        self.count = torch.where(keep, count, total)
        return batch_mean, (batch_var * n / (n - 1)).sqrt()

    def state_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ("mean", "var", "std", "count")}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k in ("mean", "var", "std", "count"):
            setattr(self, k, torch.tensor(float(state[k]), dtype=torch.float64))

    def __repr__(self) -> str:
        return f"RunningMoments(mean={float(self.mean):.6g}, var={float(self.var):.6g}, count={float(self.count):.6g})"


class BCOLossOutput(NamedTuple):
    """``loss``; per sample ``rewards`` ``beta * (logp - ref_logp)``; the shift ``delta`` (0-d) used; reward
    sums and counts of the desirable / undesirable samples."""

    loss: torch.Tensor
    rewards: torch.Tensor
    delta: torch.Tensor
    chosen_rewards_sum: torch.Tensor
    rejected_rewards_sum: torch.Tensor
    num_chosen: torch.Tensor
    num_rejected: torch.Tensor

    margins = property(_unpaired_margins)


def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    is_desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    running: RunningMoments | None = None,
    delta: float | torch.Tensor | None = None,
    update_running: bool = True,
    udm_weights: torch.Tensor | None = None,
    process_group=None,
    reduction: str = "mean",
) -> BCOLossOutput:
    r"""BCO (Jung et al. 2024, binary classifier optimisation) on unpaired samples, as TRL's ``BCOTrainer``.

    Rewards ``r = beta * (policy_logps - ref_logps)``; the shift ``delta`` is the running mean of all
    rewards seen so far: with ``running``, the batch's rewards of every rank are first merged into it
    (``update_running=False`` for evaluation, as TRL's ``do_train=False``), then ``delta =
    running.mean``. Or pass a fixed ``delta``. Then::

        desirable:    -logsigmoid(r - delta)
        undesirable:  -logsigmoid(-(r - delta)) * u      (u = udm_weights, default 1)

    ``udm_weights`` [B] are TRL's underlying-distribution-matching density ratios (used on the
    undesirable samples; compute them with your prompt classifier). ``delta`` is detached. Gradients
    flow to the log-probs. Raises ValueError for bad shapes / dtypes / devices, ``beta <= 0`` and
    missing or duplicated ``running`` / ``delta``.
    """
    _check_float("policy_logps", policy_logps, 1, "[B]")
    if ref_logps is not None:
        _check_like("ref_logps", ref_logps, policy_logps, "policy_logps")
    desirable = _check_labels("is_desirable", is_desirable, policy_logps, "policy_logps")
    if udm_weights is not None:
        _check_like("udm_weights", udm_weights, policy_logps, "policy_logps")
    _check_positive("beta", beta)
    _check_reduction(reduction)
    if (running is None) == (delta is None):
        raise AlignopsError("bco_loss needs exactly one of running (a RunningMoments kept across steps) or delta")
    if running is not None and not isinstance(running, RunningMoments):
        raise AlignopsError(f"running must be an alignops.objectives.RunningMoments, got {type(running).__name__}")

    acc = _acc_dtype(policy_logps, ref_logps)
    x = policy_logps.to(acc) if ref_logps is None else policy_logps.to(acc) - ref_logps.to(acc)
    rewards = beta * x
    if running is not None:
        if update_running:
            running.update(rewards, process_group)
        shift = running.mean.to(device=x.device, dtype=acc)
    else:
        shift = torch.as_tensor(delta, dtype=acc, device=x.device).detach().reshape(())
    d = rewards - shift
    per_sample = torch.where(desirable, -F.logsigmoid(d), -F.logsigmoid(-d))
    if udm_weights is not None:
        per_sample = torch.where(desirable, per_sample, udm_weights.to(acc) * per_sample)
    loss = _reduce(per_sample, reduction)
    r = rewards.detach()
    return BCOLossOutput(loss, r, shift, *_unpaired_stats(r, desirable))
