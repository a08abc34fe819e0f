"""Preference objectives beyond the DPO family: ORPO, KTO, BCO, CPO / AlphaPO, TPO, RRHF, PRO, Curry-DPO
pairs, the LD-DPO and WPO helpers, Diffusion-DPO and DSO's DRO.

Each objective is a closed form over per-sequence log-probs [B] (summed over completion tokens) or, for
the ranking objectives, [B, K] candidates per prompt. They are cheap epilogues next to the LM head, so
they are plain PyTorch differentiated by autograd (no custom op). Inputs may be fp32, fp64, bf16 or fp16
(mixed dtypes allowed); everything is computed in fp32 (fp64 when any input is fp64) and the outputs
have that dtype. Formulas follow TRL (1.x; BCO from 0.19, where its trainer last lived) and the
authors' code; :mod:`alignops.reference.objectives` writes each one the obvious way and is the test
oracle.

``reduction`` is ``"mean" | "sum" | "none"`` as in torch (``"none"`` gives one loss per pair / sample /
prompt). Metric fields of the returned NamedTuples are detached.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._checks import check_finite
from .._errors import AlignopsError
from ..preference import preference_loss

_REDUCTIONS = ("none", "mean", "sum")
_LN2 = math.log(2.0)

__all__ = [
    "log1mexp", "orpo_loss", "kto_loss", "RunningMoments", "bco_loss", "cpo_loss", "tpo_loss", "rrhf_loss",
    "pro_loss", "curry_pairs", "ld_logps", "wpo_weights", "diffusion_dpo_loss", "dro_loss",
    "ORPOLossOutput", "KTOLossOutput", "BCOLossOutput", "RefFreeLossOutput", "RRHFLossOutput", "PROLossOutput",
    "CurryPairs", "PairLogps", "DiffusionDPOLossOutput", "DROLossOutput",
]


# ---- argument checks and shared pieces --------------------------------------------------------------


def _check_float(name: str, t, ndim: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise AlignopsError(f"{name} must be a {ndim}-D tensor of shape {shape}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise AlignopsError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_like(name: str, t, like: torch.Tensor, like_name: str, *, floating: bool = True) -> None:
    """``t`` has the shape and device of ``like`` (dtypes may differ: everything is accumulated in fp32/fp64)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise AlignopsError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise AlignopsError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.device != like.device:
        raise AlignopsError(f"{name} must be on the device of {like_name} ({like.device}), got {t.device}")


def _check_lengths(name: str, t, like: torch.Tensor, like_name: str) -> None:
    if t is None:
        return
    _check_like(name, t, like, like_name, floating=False)
    if t.dtype == torch.bool or t.is_complex():
        raise AlignopsError(f"{name} must be an integer or float tensor of token counts, got {t.dtype}")


def _check_labels(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    _check_like(name, t, like, like_name, floating=False)
    if t.dtype != torch.bool and (t.is_floating_point() or t.is_complex()):
        raise AlignopsError(f"{name} must be a bool (or integer 0/1) tensor, got {t.dtype}")
    if t.dtype != torch.bool and t.numel() and _values_checkable(t):
        bad = (t != 0) & (t != 1)
        if bool(bad.any()):
            raise AlignopsError(f"{name} must hold 0 / 1 labels, got {t[bad][0].item()}")
    return t.bool()


def _check_positive(name: str, value) -> None:
    if isinstance(value, torch.Tensor) or not (value > 0 and math.isfinite(value)):
        raise AlignopsError(f"{name} must be a finite float > 0, got {value!r}")


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, torch.Tensor) or not (value >= 0 and math.isfinite(value)):
        raise AlignopsError(f"{name} must be a finite float >= 0, got {value!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _values_checkable(t: torch.Tensor) -> bool:
    """Value checks cost a host sync: done on CPU tensors only, and never while compiling."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _all_reduce_sum(t: torch.Tensor, process_group) -> torch.Tensor:
    """SUM over ``process_group`` (the default group when None) once torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    elif process_group is not None:
        raise AlignopsError("process_group was given but torch.distributed is not initialised")
    return t


def _per_token_nll(logps: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Per-pair NLL terms whose batch mean is the token-mean cross-entropy over all the sequences' tokens.

    ``-logps_i / mean_j(n_j)``: the mean over i is ``-sum(logps) / sum(n)``, the ``CrossEntropyLoss`` that
    TRL and Liger add; without lengths the log-probs are taken to be per-token means already.
    """
    if lengths is None:
        return -logps
    return -logps / lengths.to(logps.dtype).clamp(min=1.0).mean()


def _nll_term(nll, logps: torch.Tensor, lengths: torch.Tensor | None, name: str) -> torch.Tensor:
    if nll is None:
        return _per_token_nll(logps, lengths)
    if not isinstance(nll, torch.Tensor) or not nll.is_floating_point():
        raise AlignopsError(f"{name} must be a float tensor: [B] per pair, or a 0-d batch-level NLL")
    if nll.dim() == 0:
        return nll.to(logps.dtype).expand(logps.shape)
    if nll.shape != logps.shape:
        raise AlignopsError(f"{name} must be [B] = {tuple(logps.shape)} or 0-d, got shape {tuple(nll.shape)}")
    if nll.device != logps.device:
        raise AlignopsError(f"{name} must be on the device of the log-probs ({logps.device}), got {nll.device}")
    return nll.to(logps.dtype)


def _margins(self) -> torch.Tensor:
    """chosen_rewards - rejected_rewards, per pair."""
    return self.chosen_rewards - self.rejected_rewards


def _accuracy(self) -> torch.Tensor:
    """Reward accuracy, per pair: 1.0 where chosen_rewards > rejected_rewards."""
    return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)


def _unpaired_margins(self) -> torch.Tensor:
    """Mean reward of the desirable samples minus that of the undesirable ones (this batch; 0 when empty)."""
    return (self.chosen_rewards_sum / self.num_chosen.clamp(min=1)
            - self.rejected_rewards_sum / self.num_rejected.clamp(min=1))


# ---- ORPO --------------------------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""``log(1 - exp(x))`` for ``x <= 0``, accurate to the last bits and finite, with a finite gradient.

    Mächler's split: ``log(-expm1(x))`` for ``x > -ln 2`` (where ``1 - exp(x)`` cancels) and
    ``log1p(-exp(x))`` below. Each branch is evaluated only on inputs of its own range (the other lanes
    see ``-ln 2``), so the branch ``torch.where`` discards cannot leak ``0 * inf = NaN`` into the gradient
    as it does when both branches run on every element. ``x`` is clamped to ``<= -tiny``: ``x = 0``
    (probability 1 in the working precision) gives ``log(tiny)`` (-87.3 in fp32) instead of ``-inf``.
    ``x > 0`` (1 - exp(x) < 0, no real log) and NaN give NaN, with a zero gradient.
    """
    tiny = torch.finfo(x.dtype).tiny
    undefined = x > 0
    x = x.clamp(max=-tiny)
    near = x > -_LN2
    split = torch.full_like(x, -_LN2)
    out = torch.where(near, torch.log(-torch.expm1(torch.where(near, x, split))),
                      torch.log1p(-torch.exp(torch.where(near, split, x))))
    return torch.where(undefined, torch.nan, out)


class ORPOLossOutput(NamedTuple):
    """``loss`` (reduced as asked) and per pair: rewards ``beta * mean logp``, ``log_odds_ratio`` =
    ``logsigmoid(log_odds)``, ``log_odds_chosen`` = ``log_odds`` and the ``nll_loss`` term (TRL's metrics)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor
    nll_loss: torch.Tensor

    margins = property(_margins)
    accuracy = property(_accuracy)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    compute_nll: bool = True,
    reduction: str = "mean",
) -> ORPOLossOutput:
    r"""ORPO (Hong et al. 2024): NLL on the chosen response plus ``beta`` times the odds-ratio loss.

    With per-token mean log-probs ``a = pc / nc``, ``b = pr / nr`` (lengths clamped to >= 1; without
    lengths the inputs are taken to be means already, as Liger expects)::

        log_odds = (a - b) - (log1mexp(a) - log1mexp(b))       # log odds(y_w) / odds(y_l)
        loss_i   = nll_i - beta * logsigmoid(log_odds_i)

    TRL's ``ORPOTrainer.odds_ratio_loss`` and Liger's ``LigerFusedLinearORPOFunction``: ``loss.mean()`` is
    their total ``nll - mean(beta * logsigmoid(log_odds))``. :func:`log1mexp` is the stable form: for
    ``a > -3e-8`` (fp32) ``exp(a)`` rounds to 1, so Liger's ``log1p(-exp(a))`` is ``-inf`` and its loss
    inf or NaN (and a little further out it is off by tenths of a nat), and TRL's two-branch
    ``torch.where`` has a NaN gradient there.

    ``chosen_nll``: ``None`` derives the NLL from ``policy_chosen_logps``: with ``chosen_lengths``,
    ``nll_i = -pc_i / mean(nc)``, so that its batch mean is the token-mean cross-entropy over all chosen
    tokens (TRL's and Liger's ``CrossEntropyLoss``); without lengths ``nll_i = -a_i``. A [B] tensor is
    a per-pair NLL, a 0-d tensor a batch-level one (added to every pair). ``compute_nll=False`` drops it.

    Gradients flow to the log-probs (and a given ``chosen_nll``). Raises ValueError for bad shapes,
    dtypes, devices, ``beta <= 0`` and (CPU) mean log-probs > 0.
    """
    _check_float("policy_chosen_logps", policy_chosen_logps, 1, "[B]")
    pc = policy_chosen_logps
    _check_like("policy_rejected_logps", policy_rejected_logps, pc, "policy_chosen_logps")
    _check_lengths("chosen_lengths", chosen_lengths, pc, "policy_chosen_logps")
    _check_lengths("rejected_lengths", rejected_lengths, pc, "policy_chosen_logps")
    _check_positive("beta", beta)
    _check_reduction(reduction)
    acc = _acc_dtype(pc, policy_rejected_logps, chosen_nll)
    pc, pr = pc.to(acc), policy_rejected_logps.to(acc)
    a = pc if chosen_lengths is None else pc / chosen_lengths.to(acc).clamp(min=1.0)
    b = pr if rejected_lengths is None else pr / rejected_lengths.to(acc).clamp(min=1.0)
    if _values_checkable(a) and bool(((a > 0) | (b > 0)).any()):
        raise AlignopsError("orpo_loss: the mean log-probs must be <= 0 (log of a probability); got a positive value")

    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    ratio = F.logsigmoid(log_odds)
    per_pair = -beta * ratio
    if compute_nll:
        nll = _nll_term(chosen_nll, pc, chosen_lengths, "chosen_nll")
    else:
        nll = torch.zeros_like(per_pair)
    loss = _reduce(per_pair + nll, reduction)
    return ORPOLossOutput(loss, (beta * a).detach(), (beta * b).detach(), ratio.detach(), log_odds.detach(),
                          nll.detach())


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
    return (torch.where(desirable, rewards, zero).sum(), torch.where(desirable, zero, rewards).sum(),
            desirable.sum(), (~desirable).sum())


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
        raise AlignopsError("loss_type='apo_zero_unpaired' uses no KL estimate: drop kl / policy_kl_logps / ref_kl_logps")
    if has_kl_logps:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise AlignopsError("policy_kl_logps and ref_kl_logps go together: pass both or neither")
        _check_float("policy_kl_logps", policy_kl_logps, 1, "[M] (one per KL completion)")
        _check_like("ref_kl_logps", ref_kl_logps, policy_kl_logps, "policy_kl_logps")
        if policy_kl_logps.device != policy_logps.device:
            raise AlignopsError(f"policy_kl_logps must be on the device of policy_logps ({policy_logps.device}), "
                                f"got {policy_kl_logps.device}")

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
        merged = var * count + delta ** 2 * count * n / total + batch_var * n
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
        return (f"RunningMoments(mean={float(self.mean):.6g}, var={float(self.var):.6g}, "
                f"count={float(self.count):.6g})")


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


# ---- CPO / AlphaPO and TPO: reference-free pair losses plus an NLL term ------------------------------


class RefFreeLossOutput(NamedTuple):
    """``loss``; per pair the rewards ``beta * score`` (TRL's) and the ``nll_loss`` term (before ``alpha``)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll_loss: torch.Tensor

    margins = property(_margins)
    accuracy = property(_accuracy)


_CPO_TYPES = {"sigmoid": "cpo", "hinge": "hinge", "ipo": "ipo", "simpo": "simpo"}
_TPO_TYPES = {"sigmoid": "cpo", "hinge": "hinge", "ipo": "ipo", "tpo-l": "simpo"}


def _ref_free_pair(pc, pr, chosen_lengths, rejected_lengths, average, code, beta, label_smoothing, gamma,
                   alphapo_alpha):
    """Per-pair loss of ``preference_loss`` on the (averaged, AlphaPO-transformed) scores; and the scores."""
    if average:
        pc = pc if chosen_lengths is None else pc / chosen_lengths.to(pc.dtype).clamp(min=1.0)
        pr = pr if rejected_lengths is None else pr / rejected_lengths.to(pr.dtype).clamp(min=1.0)
    if alphapo_alpha != 0.0:
        # AlphaPO's r = (1 - p^-alpha) / alpha with p = exp(logp), as -expm1(-alpha logp) / alpha: no exp underflow.
        pc = -torch.expm1(-alphapo_alpha * pc) / alphapo_alpha
        pr = -torch.expm1(-alphapo_alpha * pr) / alphapo_alpha
    out = preference_loss(pc, pr, loss_type=code, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                          reduction="none")
    return out.loss, pc, pr


def _check_pair_args(fn, pc, pr, chosen_lengths, rejected_lengths, loss_type, types, beta, alpha, label_smoothing,
                     reduction):
    _check_float("policy_chosen_logps", pc, 1, "[B]")
    _check_like("policy_rejected_logps", pr, pc, "policy_chosen_logps")
    _check_lengths("chosen_lengths", chosen_lengths, pc, "policy_chosen_logps")
    _check_lengths("rejected_lengths", rejected_lengths, pc, "policy_chosen_logps")
    if loss_type not in types:
        raise AlignopsError(f"{fn}: loss_type must be one of {', '.join(types)}, got {loss_type!r}")
    _check_positive("beta", beta)
    _check_nonnegative("alpha", alpha)
    if not 0.0 <= label_smoothing < 1.0:
        raise AlignopsError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    _check_reduction(reduction)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alphapo_alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    average_log_prob: bool | None = None,
    reduction: str = "mean",
) -> RefFreeLossOutput:
    r"""CPO (Xu et al. 2024): a reference-free preference loss plus ``alpha`` times the NLL on the chosen.

    Scores ``s = logp`` (divided by the lengths when ``average_log_prob``; ``None`` is TRL's choice:
    averaged for ``"ipo"`` and ``"simpo"`` only), AlphaPO-transformed to ``(1 - exp(-a s)) / a`` when
    ``alphapo_alpha = a != 0``; ``d = s_c - s_r``, ``e = label_smoothing``, ``b = beta``:

    ======== =============================================================================
    sigmoid  ``-(1-e) logsig(b d) - e logsig(-b d)`` (:func:`preference_loss` ``"cpo"``)
    hinge    ``relu(1 - b d)``
    ipo      ``(d - 1/(2b))^2``
    simpo    ``-(1-e) logsig(b d - simpo_gamma) - e logsig(-(b d - simpo_gamma))`` (SimPO;
             AlphaPO with ``alphapo_alpha``, ``alpha=0``: TRL's ``loss_type="alphapo"``)
    ======== =============================================================================

    ``loss = reduce(pair_loss + alpha * nll)``; ``chosen_nll`` as in :func:`orpo_loss`: ``None``
    derives the token-mean NLL from ``policy_chosen_logps`` (summed) and ``chosen_lengths`` (TRL's
    ``cpo_alpha * CrossEntropyLoss``), [B] per pair, 0-d batch-level. ``reduction="mean"`` is TRL's
    ``losses.mean() + cpo_alpha * nll`` and Liger's ``LigerFusedLinearCPOFunction``. Rewards are
    ``beta * s`` as TRL logs them. The pair loss runs in :func:`preference_loss` (closed-form kernel).
    """
    _check_pair_args("cpo_loss", policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                     loss_type, tuple(_CPO_TYPES), beta, alpha, label_smoothing, reduction)
    check_finite(simpo_gamma, "simpo_gamma")
    check_finite(alphapo_alpha, "alphapo_alpha")
    acc = _acc_dtype(policy_chosen_logps, policy_rejected_logps, chosen_nll)
    pc, pr = policy_chosen_logps.to(acc), policy_rejected_logps.to(acc)
    average = loss_type in ("ipo", "simpo") if average_log_prob is None else average_log_prob
    pair, sc, sr = _ref_free_pair(pc, pr, chosen_lengths, rejected_lengths, average, _CPO_TYPES[loss_type], beta,
                                  label_smoothing, simpo_gamma, alphapo_alpha)
    nll = _nll_term(chosen_nll, pc, chosen_lengths, "chosen_nll") if alpha != 0.0 else torch.zeros_like(pair)
    loss = _reduce(pair + alpha * nll, reduction)
    return RefFreeLossOutput(loss, (beta * sc).detach(), (beta * sr).detach(), nll.detach())


def tpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    gold_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.01,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gold_lengths: torch.Tensor | None = None,
    average_log_prob: bool | None = None,
    reduction: str = "mean",
) -> RefFreeLossOutput:
    r"""TPO (Triple Preference Optimisation): reference-free DPO on (chosen, rejected) plus ``alpha`` times
    the cross-entropy on a gold (reference) response, as TRL's ``experimental.tpo.TPOTrainer``.

    Scores ``s = logp`` (averaged by the lengths for ``"ipo"`` and ``"tpo-l"`` when ``average_log_prob``
    is None, as TRL), ``d = s_c - s_r``: ``"sigmoid"`` / ``"hinge"`` / ``"ipo"`` as :func:`cpo_loss`,
    ``"tpo-l"`` ``-(1-e) logsig(b d - gamma) - e logsig(-(b d - gamma))`` (TPO-L, target margin gamma).
    The NLL is on ``gold_logps`` (summed log-probs of the gold response): with ``gold_lengths``,
    ``-gold_i / mean(n_gold)`` per pair, whose mean is TRL's ``F.cross_entropy`` over the gold
    completion tokens; without lengths ``-gold_i``. ``alpha=0`` needs no gold response.
    ``loss = reduce(pair_loss + alpha * nll)``; rewards ``beta * s`` as TRL logs them.
    """
    _check_pair_args("tpo_loss", policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                     loss_type, tuple(_TPO_TYPES), beta, alpha, label_smoothing, reduction)
    check_finite(gamma, "gamma")
    if alpha != 0.0:
        if gold_logps is None:
            raise AlignopsError("tpo_loss needs gold_logps for its NLL term (or alpha=0 to drop it)")
        _check_like("gold_logps", gold_logps, policy_chosen_logps, "policy_chosen_logps")
        _check_lengths("gold_lengths", gold_lengths, policy_chosen_logps, "policy_chosen_logps")
    acc = _acc_dtype(policy_chosen_logps, policy_rejected_logps, gold_logps)
    pc, pr = policy_chosen_logps.to(acc), policy_rejected_logps.to(acc)
    average = loss_type in ("ipo", "tpo-l") if average_log_prob is None else average_log_prob
    pair, sc, sr = _ref_free_pair(pc, pr, chosen_lengths, rejected_lengths, average, _TPO_TYPES[loss_type], beta,
                                  label_smoothing, gamma, 0.0)
    nll = _per_token_nll(gold_logps.to(acc), gold_lengths) if alpha != 0.0 else torch.zeros_like(pair)
    loss = _reduce(pair + alpha * nll, reduction)
    return RefFreeLossOutput(loss, (beta * sc).detach(), (beta * sr).detach(), nll.detach())


# ---- RRHF and PRO: K ranked candidates per prompt ----------------------------------------------------


class RRHFLossOutput(NamedTuple):
    """``loss``; per prompt the ``rank_loss`` and ``nll_loss`` terms; the [B, K] length-normalised ``scores``
    and the index ``best`` [B] of the highest-reward candidate."""

    loss: torch.Tensor
    rank_loss: torch.Tensor
    nll_loss: torch.Tensor
    scores: torch.Tensor
    best: torch.Tensor


def _check_candidates(name: str, t, like=None) -> None:
    if like is None:
        _check_float(name, t, 2, "[B, K]")
    else:
        _check_like(name, t, like, "logps", floating=False)


def rrhf_loss(
    logps: torch.Tensor,
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    *,
    rank_weight: float = 1.0,
    length_penalty: float = 1.0,
    reduction: str = "mean",
) -> RRHFLossOutput:
    r"""RRHF (Yuan et al. 2023): ranking hinge over the K candidates of each prompt plus NLL on the best.

    ``logps`` [B, K] summed log-probs, ``rewards`` [B, K], ``lengths`` [B, K] token counts. Scores
    ``p_k = logps_k / max(n_k, 1)^length_penalty``; per prompt::

        rank = sum over (i, j) with r_i < r_j of max(0, p_i - p_j)
        nll  = -logps_best / max(n_best, 1)          best = argmax_k r_k (first on ties)
        loss = rank_weight * rank + nll

    The authors' ``RRHFTrainer`` (``rrhf_weight * rrhf_loss + sft_loss``; their default weight is 100,
    the paper's equation 1). Their SFT term averages the best response's token log-probs over the padded
    length; this is the mean over its own tokens. Gradients flow to ``logps``. A prompt with a NaN reward
    has no ranking: its loss, ``rank`` and ``nll`` are NaN (so a mean over the batch is NaN too).
    """
    _check_candidates("logps", logps)
    _check_candidates("rewards", rewards, logps)
    _check_candidates("lengths", lengths, logps)
    if lengths.dtype == torch.bool:
        raise AlignopsError(f"lengths must be an integer or float tensor of token counts, got {lengths.dtype}")
    _check_nonnegative("rank_weight", rank_weight)
    _check_nonnegative("length_penalty", length_penalty)
    _check_reduction(reduction)
    acc = _acc_dtype(logps)
    lp = logps.to(acc)
    n = lengths.to(acc).clamp(min=1.0)
    scores = lp / n.pow(length_penalty)
    r = rewards.to(acc)
    worse = r.unsqueeze(2) < r.unsqueeze(1)  # [b, i, j]: candidate i has a lower reward than j
    gap = scores.unsqueeze(2) - scores.unsqueeze(1)  # p_i - p_j
    rank = torch.where(worse, torch.relu(gap), torch.zeros_like(gap)).sum((1, 2))
    best = r.argmax(dim=1)
    idx = best.unsqueeze(1)
    nll = -(lp.gather(1, idx) / n.gather(1, idx)).squeeze(1)
    unranked = r.isnan().any(1)  # a NaN compares false with everything: it would silently drop out of the hinge
    rank = torch.where(unranked, torch.nan, rank)
    nll = torch.where(unranked, torch.nan, nll)
    loss = _reduce(rank_weight * rank + nll, reduction)
    return RRHFLossOutput(loss, rank.detach(), nll.detach(), scores.detach(), best)


class PROLossOutput(NamedTuple):
    """``loss`` and the per-step terms [B, K-1] (step k: ``logsumexp(s_k..s_K) - s_k``)."""

    loss: torch.Tensor
    step_losses: torch.Tensor


def pro_loss(scores: torch.Tensor, *, reduction: str = "mean") -> PROLossOutput:
    r"""PRO (Song et al. 2024, Preference Ranking Optimisation): the Plackett-Luce negative log-likelihood
    of the ranking.

    ``scores`` [B, K] ordered best first (e.g. length-normalised log-probs of K responses ranked by
    reward)::

        loss = -sum_{k=1}^{K-1} log softmax(s_k, ..., s_K)[0] = sum_k (LSE(s_k..s_K) - s_k)

    The suffix log-sum-exps come from one reverse ``logcumsumexp`` (stable, O(K)); the last term (one
    candidate) is 0 and dropped. The paper's reward-difference temperatures and its SFT term are not
    included (add the SFT term with the NLL of the best response). Gradients flow to ``scores``.
    """
    _check_float("scores", scores, 2, "[B, K] (best candidate first)")
    _check_reduction(reduction)
    s = scores.to(_acc_dtype(scores))
    suffix_lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    steps = (suffix_lse - s)[:, :-1]
    return PROLossOutput(_reduce(steps.sum(-1), reduction), steps.detach())


# ---- Curry-DPO pairs ---------------------------------------------------------------------------------


class CurryPairs(NamedTuple):
    """Index pairs into the K candidates, [B, P] each, every row sorted easy -> hard (reward gap descending);
    ``gap`` the reward gaps, ``valid`` False for tied ratings (no preference); ``order`` [B*P] the row-major
    flat pair indices sorted easy -> hard over the whole batch (stable)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    gap: torch.Tensor
    valid: torch.Tensor
    order: torch.Tensor


def curry_pairs(rewards: torch.Tensor, *, mode: str = "best_vs_rest") -> CurryPairs:
    r"""Preference pairs from K rated responses per prompt, ordered for Curry-DPO's curriculum.

    Curry-DPO (Pattnaik et al. 2024) builds several pairs per prompt from the ratings and trains on them
    easy -> hard, the rating gap measuring ease (largest gap first). ``mode="best_vs_rest"`` (the
    paper's main construction): the top-rated response is chosen against each of the other K-1 (P = K-1);
    ``"all_pairs"``: every pair with the higher-rated response chosen (P = K(K-1)/2). Column j of the
    result is the j-th easiest pair of each prompt (the paper's iteration j); ``order`` sorts all pairs of
    the batch. Ties: the first top-rated index is the best; equal ratings give ``valid=False``.
    ``rewards`` [B, K] float or integer; no gradient. A NaN rating (it has no order) raises ValueError on
    CPU tensors; on a GPU it is not read back, and the pairs of its prompt get a NaN gap, ``valid=False``.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise AlignopsError(f"rewards must be a 2-D tensor of shape [B, K], got "
                            f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise AlignopsError(f"rewards must be a float or integer tensor, got {rewards.dtype}")
    if mode not in ("best_vs_rest", "all_pairs"):
        raise AlignopsError(f"mode must be 'best_vs_rest' or 'all_pairs', got {mode!r}")
    B, K = rewards.shape
    if K < 2:
        raise AlignopsError(f"rewards needs K >= 2 candidates per prompt to form a pair, got K={K}")
    r = rewards.to(torch.float64)
    if r.numel() and _values_checkable(r) and bool(r.isnan().any()):
        b, k = r.isnan().nonzero()[0].tolist()
        raise AlignopsError(f"rewards must not contain NaN (a NaN rating has no order), got NaN at rewards[{b}, {k}]")
    dev = rewards.device
    if mode == "best_vs_rest":
        best = r.argmax(dim=1, keepdim=True)
        j = torch.arange(K - 1, device=dev).expand(B, K - 1)
        rejected = j + (j >= best).long()  # the K-1 indices other than best, in index order (no host sync)
        chosen = best.expand(B, K - 1)
    else:
        i, j = torch.triu_indices(K, K, offset=1, device=dev)
        ri, rj = r[:, i], r[:, j]
        first_wins = ri >= rj
        chosen = torch.where(first_wins, i.expand(B, -1), j.expand(B, -1))
        rejected = torch.where(first_wins, j.expand(B, -1), i.expand(B, -1))
    gap = r.gather(1, chosen) - r.gather(1, rejected)
    perm = torch.sort(gap, dim=1, descending=True, stable=True).indices
    chosen, rejected, gap = chosen.gather(1, perm), rejected.gather(1, perm), gap.gather(1, perm)
    order = torch.sort(gap.reshape(-1), descending=True, stable=True).indices
    gap = gap.to(rewards.dtype if rewards.is_floating_point() else torch.float64)
    return CurryPairs(chosen.contiguous(), rejected.contiguous(), gap, gap > 0, order)


# ---- LD-DPO and WPO: per-token helpers on the [chosen; rejected] layout ------------------------------


class PairLogps(NamedTuple):
    """Per-pair values [B] for the chosen and the rejected halves of a ``[chosen; rejected]`` batch."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    @property
    def pair(self) -> torch.Tensor:
        """``chosen * rejected``: the WPO weight of each pair."""
        return self.chosen * self.rejected


def _check_per_token(per_token_logps, completion_mask):
    _check_float("per_token_logps", per_token_logps, 2, "[2B, T] (chosen rows, then rejected rows)")
    if per_token_logps.shape[0] % 2:
        raise AlignopsError("per_token_logps must hold 2B rows (B chosen, then B rejected), "
                            f"got {per_token_logps.shape[0]}")
    _check_like("completion_mask", completion_mask, per_token_logps, "per_token_logps", floating=False)
    return completion_mask.bool()


def ld_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, ld_alpha: float) -> PairLogps:
    r"""LD-DPO's length-desensitised sequence log-probs (Liu et al. 2024), TRL's ``ld_alpha``.

    ``per_token_logps`` [2B, T] of a ``[chosen; rejected]`` batch and its ``completion_mask`` (aligned
    with the log-probs, i.e. already shifted). With ``l_c, l_r`` the completion lengths of a pair and
    ``l = min(l_c, l_r)``, counting completion tokens in order: the first ``l`` tokens of each response
    get weight 1, the rest ``ld_alpha``::

        logp = sum(shared tokens) + ld_alpha * sum(tail tokens)

    Same numbers as TRL's ``DPOTrainer`` (apply it to the policy and reference log-probs alike); masked
    positions are excluded even when their log-probs are not 0 (TRL relies on them being 0). Returns
    :class:`PairLogps` (chosen [B], rejected [B]) in fp32 (fp64 for fp64); differentiable.
    """
    mask = _check_per_token(per_token_logps, completion_mask)
    if not (0.0 <= ld_alpha <= 1.0):
        raise AlignopsError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    lp = per_token_logps.to(_acc_dtype(per_token_logps))
    position = mask.long().cumsum(dim=1)
    chosen_len, rejected_len = mask.sum(dim=1).chunk(2)
    shared_len = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    zero = torch.zeros_like(lp)
    shared = torch.where(mask & (position <= shared_len), lp, zero).sum(dim=1)
    tail = torch.where(mask & (position > shared_len), lp, zero).sum(dim=1)
    return PairLogps(*(shared + ld_alpha * tail).chunk(2))


@torch.no_grad()
def wpo_weights(per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor,
                completion_mask: torch.Tensor) -> PairLogps:
    r"""WPO's per-sequence weights (Zhou et al. 2024, Eq. 2), TRL's ``use_weighting``.

    ``w = exp(mean over completion tokens of (log p(y_t) - log sum_v p_v^2))``: the sequence's
    probability under the policy, per token and aligned by the distribution's own "self-probability".
    ``log_sum_sq_probs`` [2B, T] is ``logsumexp(2 * log_softmax(logits), -1)`` per token. Returns
    :class:`PairLogps` (chosen, rejected); multiply each pair's loss by ``.pair`` = ``w_c * w_r`` as TRL
    does. No gradient (a weight, as in TRL).
    """
    mask = _check_per_token(per_token_logps, completion_mask)
    _check_like("log_sum_sq_probs", log_sum_sq_probs, per_token_logps, "per_token_logps")
    acc = _acc_dtype(per_token_logps, log_sum_sq_probs)
    aligned = torch.where(mask, per_token_logps.to(acc) - log_sum_sq_probs.to(acc), torch.zeros((), dtype=acc,
                                                                                                  device=mask.device))
    mean = aligned.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(acc)
    return PairLogps(*torch.exp(mean).chunk(2))


# ---- Diffusion-DPO and DSO's DRO: per-sample denoising losses ----------------------------------------


class DiffusionDPOLossOutput(NamedTuple):
    """``loss``; per pair the logit ``inside = -beta/2 ((mse_w - mse_l) - (ref_w - ref_l))``, the
    ``implicit_accuracy`` (inside > 0) and the model's and reference's ``model_diff`` / ``ref_diff``."""

    loss: torch.Tensor
    inside: torch.Tensor
    implicit_accuracy: torch.Tensor
    model_diff: torch.Tensor
    ref_diff: torch.Tensor


def diffusion_dpo_loss(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    beta: float,
    *,
    reduction: str = "mean",
) -> DiffusionDPOLossOutput:
    r"""Diffusion-DPO (Wallace et al. 2024) from per-sample denoising MSEs (flow matching alike).

    ``model_mse_*`` [B]: ``||eps - eps_theta(x_t, t)||^2`` (or the flow-matching velocity error) of the
    winning (w) and losing (l) sample under the model, averaged over its elements, at the same ``t`` and
    noise; ``ref_mse_*`` the same under the frozen reference::

        inside = -beta / 2 * ((mse_w - mse_l) - (ref_w - ref_l))
        loss   = -logsigmoid(inside)

    As diffusers' ``train_diffusion_dpo.py`` (``beta_dpo``, e.g. 2500-5000 for SD 1.5; the paper's
    ``T * omega(lambda_t)`` is folded into it) and DSO's ``forward_dpo_loss`` for flow models (beta ~ 1).
    Gradients flow to all four inputs (pass detached reference MSEs).
    """
    _check_float("model_mse_w", model_mse_w, 1, "[B]")
    for name, t in (("model_mse_l", model_mse_l), ("ref_mse_w", ref_mse_w), ("ref_mse_l", ref_mse_l)):
        _check_like(name, t, model_mse_w, "model_mse_w")
    _check_positive("beta", beta)
    _check_reduction(reduction)
    acc = _acc_dtype(model_mse_w, model_mse_l, ref_mse_w, ref_mse_l)
    model_diff = model_mse_w.to(acc) - model_mse_l.to(acc)
    ref_diff = ref_mse_w.to(acc) - ref_mse_l.to(acc)
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = _reduce(-F.logsigmoid(inside), reduction)
    return DiffusionDPOLossOutput(loss, inside.detach(), (inside > 0).to(acc).detach(), model_diff.detach(),
                                  ref_diff.detach())


class DROLossOutput(NamedTuple):
    """``loss`` and per sample the ``advantage`` ``mse - ref_mse`` it weighs by the reward."""

    loss: torch.Tensor
    advantage: torch.Tensor


def dro_loss(
    model_mse: torch.Tensor,
    ref_mse: torch.Tensor | None,
    reward: torch.Tensor,
    beta: float = 1.0,
    *,
    reduction: str = "mean",
) -> DROLossOutput:
    r"""DSO's direct reward optimisation (DRO, Li et al. 2025) for diffusion / flow models, unpaired.

    ``model_mse`` [B] per-sample denoising (flow-matching) losses, ``reward`` [B] the feedback:
    ``+1`` for a desirable (e.g. simulator-stable) sample, ``-1`` for an undesirable one, or any real
    weight. Per sample::

        loss_i = beta * reward_i * (model_mse_i - ref_mse_i)      (ref_mse None: 0)

    i.e. lower the denoising loss (raise the likelihood) of desirable samples and raise it on undesirable
    ones, with no pairing. Source: the DSO abstract (seeds) names DRO but gives no formula; this is the
    objective of the authors' released code (``RuiningLi/dso``, ``finetune.py``, ``forward_dro_loss``:
    ``mean(mse_win - mse_loss)``, no reference, no beta), written per sample: on B desirable + B
    undesirable samples with ``beta=1``, their loss is ``2 * dro_loss(...).loss`` (mean) and equals it
    with ``reduction="sum"`` divided by B. ``ref_mse`` (detached) only shifts the value to 0 at the
    reference and ``beta`` only scales it: neither changes the direction of the gradient. The paper
    text's exact form (any sigmoid / reference) could not be checked here. Gradients flow to
    ``model_mse`` (and ``ref_mse`` if it requires grad).
    """
    _check_float("model_mse", model_mse, 1, "[B]")
    if ref_mse is not None:
        _check_like("ref_mse", ref_mse, model_mse, "model_mse")
    _check_like("reward", reward, model_mse, "model_mse", floating=False)
    if reward.dtype == torch.bool:
        raise AlignopsError("reward must be a float or integer tensor (+1 desirable, -1 undesirable), got torch.bool")
    _check_positive("beta", beta)
    _check_reduction(reduction)
    acc = _acc_dtype(model_mse, ref_mse)
    adv = model_mse.to(acc) if ref_mse is None else model_mse.to(acc) - ref_mse.to(acc)
    loss = _reduce(beta * reward.to(acc) * adv, reduction)
    return DROLossOutput(loss, adv.detach())
