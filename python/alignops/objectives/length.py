"""Per-token helpers on the [chosen; rejected] layout: LD-DPO's sequence log-probs and WPO's weights."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._api import keyword_only
from .._errors import AlignopsError
from ._common import _acc_dtype, _check_float, _check_like


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
        raise AlignopsError(
            f"per_token_logps must hold 2B rows (B chosen, then B rejected), got {per_token_logps.shape[0]}"
        )
    _check_like("completion_mask", completion_mask, per_token_logps, "per_token_logps", floating=False)
    return completion_mask.bool()


@keyword_only("ld_alpha")
def ld_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, *, ld_alpha: float) -> PairLogps:
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
def wpo_weights(
    per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, completion_mask: torch.Tensor
) -> PairLogps:
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
    aligned = torch.where(
        mask, per_token_logps.to(acc) - log_sum_sq_probs.to(acc), torch.zeros((), dtype=acc, device=mask.device)
    )
    mean = aligned.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(acc)
    return PairLogps(*torch.exp(mean).chunk(2))
