"""ORPO (odds-ratio preference optimisation) and the stable ``log1mexp`` it needs."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._api import renamed
from .._errors import AlignopsError
from ._common import (
    _acc_dtype,
    _accuracy,
    _check_float,
    _check_lengths,
    _check_like,
    _check_positive,
    _check_reduction,
    _margins,
    _nll_term,
    _reduce,
    _values_checkable,
)

_LN2 = math.log(2.0)


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
    out = torch.where(
        near, torch.log(-torch.expm1(torch.where(near, x, split))), torch.log1p(-torch.exp(torch.where(near, split, x)))
    )
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


@renamed(compute_nll="compute_nll_loss")
def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    compute_nll_loss: bool = True,
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
    a per-pair NLL, a 0-d tensor a batch-level one (added to every pair).
    ``compute_nll_loss=False`` (Liger's name; ``compute_nll=`` is its deprecated alias) drops it.

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
    if compute_nll_loss:
        nll = _nll_term(chosen_nll, pc, chosen_lengths, "chosen_nll")
    else:
        nll = torch.zeros_like(per_pair)
    loss = _reduce(per_pair + nll, reduction)
    return ORPOLossOutput(
        loss, (beta * a).detach(), (beta * b).detach(), ratio.detach(), log_odds.detach(), nll.detach()
    )
