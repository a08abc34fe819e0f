"""Reward-model objectives: Bradley-Terry with a margin (Llama 2), reward centring, regression on attribute
ratings (HelpSteer2 / SteerLM) and HelpSteer2-Preference's scaled Bradley-Terry with its regression term.

Inputs are the reward head's outputs: one scalar per response ([B] chosen, [B] rejected) or one score per
attribute ([N, A]). fp32 / fp64 / bf16 / fp16 inputs; accumulated in fp32 (fp64 when any input is fp64),
outputs in that dtype; differentiable by autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._checks import check_same_device
from .._errors import AlignopsError
from ._common import (
    _acc_dtype,
    _accuracy,
    _check_float,
    _check_like,
    _check_nonnegative,
    _check_reduction,
    _margins,
    _reduce,
    _values_checkable,
)


class BradleyTerryLossOutput(NamedTuple):
    """``loss`` (reduced as asked); per pair the detached ``chosen_rewards`` / ``rejected_rewards`` and the
    ``centering_loss`` term ``coef * (r_c + r_r)^2`` (0 without centring). ``margins`` and ``accuracy`` per pair:
    their means are the ``margin`` and ``accuracy`` TRL's RewardTrainer logs."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    centering_loss: torch.Tensor

    margins = property(_margins)
    accuracy = property(_accuracy)


class RewardCenteringOutput(NamedTuple):
    """``loss`` and per pair the detached ``reward_sums`` ``r_c + r_r`` it pushes towards 0."""

    loss: torch.Tensor
    reward_sums: torch.Tensor


class RatingRegressionOutput(NamedTuple):
    """``loss``; the detached ``errors`` ``predicted - ratings`` [N, A] (0 where no rating) and ``num_rated`` (0-d)."""

    loss: torch.Tensor
    errors: torch.Tensor
    num_rated: torch.Tensor


class HelpSteer2PreferenceOutput(NamedTuple):
    """``loss`` = ``preference_loss + regression_weight * regression_loss``; the scaled Bradley-Terry term
    ``preference_loss`` and the ``regression_loss`` term (0 without ratings), both reduced as asked; the detached
    per-pair ``chosen_rewards`` / ``rejected_rewards`` (``margins`` and ``accuracy`` as in
    :class:`BradleyTerryLossOutput`)."""

    loss: torch.Tensor
    preference_loss: torch.Tensor
    regression_loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    margins = property(_margins)
    accuracy = property(_accuracy)


def _check_pair(chosen_rewards, rejected_rewards) -> None:
    _check_float("chosen_rewards", chosen_rewards, 1, "[B]")
    _check_like("rejected_rewards", rejected_rewards, chosen_rewards, "chosen_rewards")


def reward_centering_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    center_rewards_coefficient: float = 0.01,
    reduction: str = "mean",
) -> RewardCenteringOutput:
    r"""Reward centring (Eisenstein et al. 2023, Eq. 2), the auxiliary loss of TRL's ``center_rewards_coefficient``::

        loss_i = center_rewards_coefficient * (r_c,i + r_r,i)^2

    ``reduction="mean"`` is TRL's ``coef * torch.mean((rewards_chosen + rewards_rejected) ** 2)``; the default
    coefficient is the 0.01 TRL's documentation recommends. ``chosen_rewards``, ``rejected_rewards`` [B] float.
    Raises AlignopsError for bad shapes / dtypes / devices and a coefficient that is negative, NaN or inf.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    _check_nonnegative("center_rewards_coefficient", center_rewards_coefficient)
    _check_reduction(reduction)
    acc = _acc_dtype(chosen_rewards, rejected_rewards)
    sums = chosen_rewards.to(acc) + rejected_rewards.to(acc)
    return RewardCenteringOutput(_reduce(center_rewards_coefficient * sums.square(), reduction), sums.detach())


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    center_rewards_coefficient: float | None = None,
    reduction: str = "mean",
) -> BradleyTerryLossOutput:
    r"""Bradley-Terry reward-model loss with Llama 2's margin (Touvron et al. 2023, Eq. 2) and reward centring.

    ``chosen_rewards``, ``rejected_rewards`` [B]: the scalar rewards of the two responses of each pair;
    ``margin`` [B] (TRL's ``"margin"`` column, e.g. the preference rating mapped to a number; None: 0)::

        loss_i = -logsigmoid(r_c,i - r_r,i - margin_i) + c * (r_c,i + r_r,i)^2      (c = center_rewards_coefficient)

    ``reduction="mean"`` gives exactly TRL 1.16 ``RewardTrainer.compute_loss``:
    ``-logsigmoid(r_c - r_r - margin).mean() + c * mean((r_c + r_r)^2)`` (its centring term is a mean over the
    pairs too, so the per-pair sum above has the same mean). ``center_rewards_coefficient=None`` (TRL's default)
    adds no centring. Gradients flow to both rewards (and to ``margin`` if it requires grad). A NaN reward gives a
    NaN loss for its pair, as in TRL. Raises AlignopsError for bad shapes / dtypes / devices and a negative or
    non-finite coefficient.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    if margin is not None:
        _check_like("margin", margin, chosen_rewards, "chosen_rewards")
    if center_rewards_coefficient is not None:
        _check_nonnegative("center_rewards_coefficient", center_rewards_coefficient)
    _check_reduction(reduction)
    acc = _acc_dtype(chosen_rewards, rejected_rewards, margin)
    rc, rr = chosen_rewards.to(acc), rejected_rewards.to(acc)
    logits = rc - rr if margin is None else rc - rr - margin.to(acc)
    per_pair = -F.logsigmoid(logits)
    if center_rewards_coefficient is None:
        centering = torch.zeros_like(per_pair)
    else:
        centering = center_rewards_coefficient * (rc + rr).square()
        per_pair = per_pair + centering
    return BradleyTerryLossOutput(_reduce(per_pair, reduction), rc.detach(), rr.detach(), centering.detach())


def rating_regression_loss(
    predicted: torch.Tensor,
    ratings: torch.Tensor,
    rating_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> RatingRegressionOutput:
    r"""Regression of attribute scores on ratings (SteerLM / HelpSteer2's regression reward model): MSE over the
    rated entries.

    ``predicted`` [N, A] the reward head's score per attribute (helpfulness, correctness, ...), ``ratings``
    [N, A] the annotators' ratings (float or integer), ``rating_mask`` [N, A] bool, True where a rating exists
    (None: all rated; NeMo-Aligner marks missing labels instead)::

        "mean": sum over rated (p - y)^2 / max(#rated, 1)     (0 when nothing is rated)
        "sum":  sum over rated (p - y)^2
        "none": (p - y)^2 per entry [N, A], 0 where unrated

    An unrated entry contributes neither value nor gradient, whatever it holds (NaN included). A NaN rating at a
    rated entry raises AlignopsError on CPU tensors (on a GPU it is not read back and gives a NaN loss).
    """
    _check_float("predicted", predicted, 2, "[N, A] (one score per attribute)")
    _check_like("ratings", ratings, predicted, "predicted", floating=False)
    if ratings.dtype == torch.bool or ratings.is_complex():
        raise AlignopsError(f"ratings must be a float or integer tensor, got {ratings.dtype}")
    if rating_mask is not None:
        _check_like("rating_mask", rating_mask, predicted, "predicted", floating=False)
        if rating_mask.dtype != torch.bool:
            raise AlignopsError(f"rating_mask must be a bool tensor (True where rated), got {rating_mask.dtype}")
    _check_reduction(reduction)
    acc = _acc_dtype(predicted, ratings)
    y = ratings.to(acc)
    rated = torch.ones_like(y, dtype=torch.bool) if rating_mask is None else rating_mask
    if y.numel() and _values_checkable(y) and bool((rated & y.isnan()).any()):
        n, a = (rated & y.isnan()).nonzero()[0].tolist()
        raise AlignopsError(
            f"ratings must not be NaN where rated, got NaN at ratings[{n}, {a}] "
            "(mark a missing rating with rating_mask=False)"
        )
    err = torch.where(rated, predicted.to(acc) - y, torch.zeros_like(y))
    sq = err.square()
    count = rated.sum()
    if reduction == "mean":
        loss = sq.sum() / count.clamp(min=1).to(acc)
    else:
        loss = _reduce(sq, reduction)
    return RatingRegressionOutput(loss, err.detach(), count)


def helpsteer2_preference_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    preference_strength: torch.Tensor | None = None,
    predicted: torch.Tensor | None = None,
    ratings: torch.Tensor | None = None,
    rating_mask: torch.Tensor | None = None,
    *,
    regression_weight: float = 1.0,
    reduction: str = "mean",
) -> HelpSteer2PreferenceOutput:
    r"""HelpSteer2-Preference (Wang et al. 2024): scaled Bradley-Terry on the preference pairs plus regression on
    the attribute ratings.

    ``preference_strength`` [B] ``m >= 0`` is the magnitude of each annotated preference (1 slightly better,
    2 better, 3 much better on the paper's 7-point scale; None: 1). The paper's *Scaled BT* weighs each pair's
    log-likelihood by its strength, as if a pair rated "much better" were seen three times::

        pref_i = -m_i * logsigmoid(r_c,i - r_r,i)
        loss   = reduce(pref) + regression_weight * rating_regression_loss(predicted, ratings, rating_mask)

    What was followed and what was chosen: the paper defines Scaled BT as above (the strength scales the
    log-likelihood; Llama 2's *Margin BT*, where it shifts the logit, is :func:`bradley_terry_loss` with
    ``margin``). The paper combines the two paradigms *in sequence* — a helpfulness-only SteerLM regression
    model is trained first and the Scaled-BT model is initialised from it — and gives no joint loss; a weighted
    sum is offered here so that both signals can be used in one run: ``regression_weight=0`` (or no ratings) is
    exactly the paper's second stage, and the regression term alone (:func:`rating_regression_loss`) its first.
    The weight is this library's choice, not the paper's.

    ``predicted`` / ``ratings`` / ``rating_mask`` [N, A] as in :func:`rating_regression_loss` (the rated
    responses need not be the B pairs). ``reduction="none"`` returns the per-pair ``pref`` and is refused with
    ratings (pairs and rated responses have no common per-item axis). Raises AlignopsError for bad shapes /
    dtypes / devices, a negative strength (CPU) and a negative or non-finite ``regression_weight``.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    if preference_strength is not None:
        _check_like("preference_strength", preference_strength, chosen_rewards, "chosen_rewards", floating=False)
        if preference_strength.dtype == torch.bool or preference_strength.is_complex():
            raise AlignopsError(
                f"preference_strength must be a float or integer tensor, got {preference_strength.dtype}"
            )
        if (
            preference_strength.numel()
            and _values_checkable(preference_strength)
            and bool((preference_strength < 0).any())
        ):
            raise AlignopsError(
                "preference_strength must be >= 0 (the magnitude of the preference of chosen over "
                f"rejected), got {preference_strength.min().item()}"
            )
    _check_nonnegative("regression_weight", regression_weight)
    _check_reduction(reduction)
    if (predicted is None) != (ratings is None):
        raise AlignopsError("predicted and ratings go together: pass both or neither")
    if rating_mask is not None and ratings is None:
        raise AlignopsError("rating_mask was given without predicted / ratings")
    if ratings is not None and reduction == "none":
        raise AlignopsError(
            "reduction='none' has no per-pair form with ratings (pairs and rated responses differ): "
            "use 'mean' or 'sum', or call rating_regression_loss separately"
        )
    if predicted is not None:
        check_same_device([("chosen_rewards", chosen_rewards), ("predicted", predicted)])
    acc = _acc_dtype(chosen_rewards, rejected_rewards, preference_strength, predicted, ratings)
    rc, rr = chosen_rewards.to(acc), rejected_rewards.to(acc)
    pref = -F.logsigmoid(rc - rr)
    if preference_strength is not None:
        pref = preference_strength.to(acc) * pref
    pref_loss = _reduce(pref, reduction)
    if ratings is None:
        reg_loss = pref_loss.new_zeros(())
        loss = pref_loss
    else:
        reg_loss = rating_regression_loss(predicted, ratings, rating_mask, reduction=reduction).loss.to(acc)
        loss = pref_loss + regression_weight * reg_loss
    return HelpSteer2PreferenceOutput(loss, pref_loss, reg_loss, rc.detach(), rr.detach())
