"""K ranked candidates per prompt: RRHF, PRO and Curry-DPO's pairs."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._errors import AlignopsError
from ._common import (
    _acc_dtype,
    _check_float,
    _check_like,
    _check_nonnegative,
    _check_reduction,
    _reduce,
    _values_checkable,
)

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
        raise AlignopsError(
            f"rewards must be a 2-D tensor of shape [B, K], got "
            f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}"
        )
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
