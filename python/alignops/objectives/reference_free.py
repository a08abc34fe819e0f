"""Reference-free pair losses plus an NLL term: CPO (with SimPO / AlphaPO scores) and TPO."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._api import renamed
from .._checks import check_finite
from .._errors import AlignopsError
from ..preference import preference_loss
from ._common import (
    _acc_dtype,
    _accuracy,
    _check_float,
    _check_lengths,
    _check_like,
    _check_nonnegative,
    _check_positive,
    _check_reduction,
    _margins,
    _nll_term,
    _per_token_nll,
    _reduce,
)


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


def _ref_free_pair(
    pc, pr, chosen_lengths, rejected_lengths, average, code, beta, label_smoothing, gamma, alphapo_alpha, backend
):
    """Per-pair loss of ``preference_loss`` on the (averaged, AlphaPO-transformed) scores; and the scores."""
    if average:
        pc = pc if chosen_lengths is None else pc / chosen_lengths.to(pc.dtype).clamp(min=1.0)
        pr = pr if rejected_lengths is None else pr / rejected_lengths.to(pr.dtype).clamp(min=1.0)
    if alphapo_alpha != 0.0:
        # AlphaPO's r = (1 - p^-alpha) / alpha with p = exp(logp), as -expm1(-alpha logp) / alpha: no exp underflow.
        pc = -torch.expm1(-alphapo_alpha * pc) / alphapo_alpha
        pr = -torch.expm1(-alphapo_alpha * pr) / alphapo_alpha
    out = preference_loss(
        pc,
        pr,
        loss_type=code,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=gamma,
        reduction="none",
        backend=backend,
    )
    return out.loss, pc, pr


def _check_pair_args(
    fn, pc, pr, chosen_lengths, rejected_lengths, loss_type, types, beta, alpha, label_smoothing, reduction
):
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


@renamed(simpo_gamma="gamma")  # TRL's CPOConfig field; gamma is the margin's name across the family
def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    alphapo_alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    average_log_prob: bool | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> RefFreeLossOutput:
    r"""CPO (Xu et al. 2024): a reference-free preference loss plus ``alpha`` times the NLL on the chosen.

    Scores ``s = logp`` (divided by the lengths when ``average_log_prob``; ``None`` is TRL's choice:
    averaged for ``"ipo"`` and ``"simpo"`` only), AlphaPO-transformed to ``(1 - exp(-a s)) / a`` when
    ``alphapo_alpha = a != 0``; ``d = s_c - s_r``, ``e = label_smoothing``, ``b = beta``:

    ======== =============================================================================
    sigmoid  ``-(1-e) logsig(b d) - e logsig(-b d)`` (:func:`preference_loss` ``"cpo"``)
    hinge    ``relu(1 - b d)``
    ipo      ``(d - 1/(2b))^2``
    simpo    ``-(1-e) logsig(b d - gamma) - e logsig(-(b d - gamma))`` (SimPO;
             AlphaPO with ``alphapo_alpha``, ``alpha=0``: TRL's ``loss_type="alphapo"``)
    ======== =============================================================================

    ``loss = reduce(pair_loss + alpha * nll)``; ``chosen_nll`` as in :func:`orpo_loss`: ``None``
    derives the token-mean NLL from ``policy_chosen_logps`` (summed) and ``chosen_lengths`` (TRL's
    ``cpo_alpha * CrossEntropyLoss``), [B] per pair, 0-d batch-level. ``reduction="mean"`` is TRL's
    ``losses.mean() + cpo_alpha * nll`` and Liger's ``LigerFusedLinearCPOFunction``. Rewards are
    ``beta * s`` as TRL logs them. The pair loss runs in :func:`preference_loss` (closed-form kernel) on
    ``backend`` (``"auto" | "native" | "triton" | "torch"``). ``gamma`` is TRL's ``simpo_gamma``: that keyword
    still works, with a DeprecationWarning, until the next release.
    """
    _check_pair_args(
        "cpo_loss",
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        loss_type,
        tuple(_CPO_TYPES),
        beta,
        alpha,
        label_smoothing,
        reduction,
    )
    check_finite(gamma, "gamma")
    check_finite(alphapo_alpha, "alphapo_alpha")
    acc = _acc_dtype(policy_chosen_logps, policy_rejected_logps, chosen_nll)
    pc, pr = policy_chosen_logps.to(acc), policy_rejected_logps.to(acc)
    average = loss_type in ("ipo", "simpo") if average_log_prob is None else average_log_prob
    pair, sc, sr = _ref_free_pair(
        pc,
        pr,
        chosen_lengths,
        rejected_lengths,
        average,
        _CPO_TYPES[loss_type],
        beta,
        label_smoothing,
        gamma,
        alphapo_alpha,
        backend,
    )
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
    backend: str = "auto",
) -> RefFreeLossOutput:
    r"""TPO (Triple Preference Optimisation): reference-free DPO on (chosen, rejected) plus ``alpha`` times
    the cross-entropy on a gold (reference) response, as TRL's ``experimental.tpo.TPOTrainer``.

    Scores ``s = logp`` (averaged by the lengths for ``"ipo"`` and ``"tpo-l"`` when ``average_log_prob``
    is None, as TRL), ``d = s_c - s_r``: ``"sigmoid"`` / ``"hinge"`` / ``"ipo"`` as :func:`cpo_loss`,
    ``"tpo-l"`` ``-(1-e) logsig(b d - gamma) - e logsig(-(b d - gamma))`` (TPO-L, target margin gamma).
    The NLL is on ``gold_logps`` (summed log-probs of the gold response): with ``gold_lengths``,
    ``-gold_i / mean(n_gold)`` per pair, whose mean is TRL's ``F.cross_entropy`` over the gold
    completion tokens; without lengths ``-gold_i``. ``alpha=0`` needs no gold response.
    ``loss = reduce(pair_loss + alpha * nll)``; rewards ``beta * s`` as TRL logs them. The pair loss runs in
    :func:`preference_loss` on ``backend`` (``"auto" | "native" | "triton" | "torch"``).
    """
    _check_pair_args(
        "tpo_loss",
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        loss_type,
        tuple(_TPO_TYPES),
        beta,
        alpha,
        label_smoothing,
        reduction,
    )
    check_finite(gamma, "gamma")
    if alpha != 0.0:
        if gold_logps is None:
            raise AlignopsError("tpo_loss needs gold_logps for its NLL term (or alpha=0 to drop it)")
        _check_like("gold_logps", gold_logps, policy_chosen_logps, "policy_chosen_logps")
        _check_lengths("gold_lengths", gold_lengths, policy_chosen_logps, "policy_chosen_logps")
    acc = _acc_dtype(policy_chosen_logps, policy_rejected_logps, gold_logps)
    pc, pr = policy_chosen_logps.to(acc), policy_rejected_logps.to(acc)
    average = loss_type in ("ipo", "tpo-l") if average_log_prob is None else average_log_prob
    pair, sc, sr = _ref_free_pair(
        pc,
        pr,
        chosen_lengths,
        rejected_lengths,
        average,
        _TPO_TYPES[loss_type],
        beta,
        label_smoothing,
        gamma,
        0.0,
        backend,
    )
    nll = _per_token_nll(gold_logps.to(acc), gold_lengths) if alpha != 0.0 else torch.zeros_like(pair)
    loss = _reduce(pair + alpha * nll, reduction)
    return RefFreeLossOutput(loss, (beta * sc).detach(), (beta * sr).detach(), nll.detach())
