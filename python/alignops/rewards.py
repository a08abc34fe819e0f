r"""Reward transforms and inference-time selection.

- :func:`bt_transform`: the Bradley-Terry transform :math:`u = \log\sigma(r - r_{ref}(x))` of "Transforming
  and Combining Rewards" (Wang et al.), with :math:`r_{ref}(x)` a per-prompt reference reward (e.g. the
  reward of a reference-policy sample or a quantile of them); :func:`combine_rewards` sums the transformed
  rewards over properties: log P(good in every property) for independent properties.
- :func:`calibrate` / :func:`ctrl_transform`: InfAlign's CTRL (Balashankar et al.) -- calibrate a reward
  against rewards of reference-policy samples for the same prompt (its empirical CDF), then transform it
  for the inference-time procedure (exponential transforms for best-of-n and worst-of-n).
- :func:`best_of_n`, :func:`worst_of_n`, :func:`weighted_majority_vote`.

All are small tensor compositions (elementwise maps, one sort / searchsorted, one scatter-add) batched over
leading dimensions on any device: torch composite code, no custom kernel (it would only re-call the same
ATen reductions). Differentiable where the formula is (the transforms; not the empirical CDF or the
selections).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._api import keyword_only
from ._checks import check_finite, check_same_device
from ._errors import AlignopsError


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AlignopsError(f"{name} must be a tensor, got {type(t).__name__}")
    return t


def bt_transform(rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\sigma(r - r_{ref})`, elementwise with broadcasting (e.g. rewards [B, K] against
    reference_rewards [B, 1]); stable for large |r - r_ref| (F.logsigmoid). Raises ValueError when the
    shapes do not broadcast."""
    r, ref = _tensor(rewards, "rewards"), _tensor(reference_rewards, "reference_rewards")
    try:
        torch.broadcast_shapes(r.shape, ref.shape)
    except RuntimeError:
        raise AlignopsError(
            f"reference_rewards {list(ref.shape)} must broadcast against rewards {list(r.shape)}"
        ) from None
    return F.logsigmoid(r - ref)


def combine_rewards(
    rewards: torch.Tensor, reference_rewards: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`\sum_k w_k \log\sigma(r_k - r_{ref,k})` over the last dimension (the properties, e.g. helpful and
    harmless); weights [K] default to 1 (the log-probability that the output is good in every property)."""
    u = bt_transform(rewards, reference_rewards)
    if weights is not None:
        if weights.shape != (u.shape[-1],):
            raise AlignopsError(
                f"weights must have shape [K] = [{u.shape[-1]}] (one per property), got {list(weights.shape)}"
            )
        u = u * weights
    return u.sum(-1)


def calibrate(rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
    r"""InfAlign calibration: :math:`C(y) = P_{y' \sim \pi_{ref}}(r(y') < r(y)) + \tfrac12 P(r(y') = r(y))`,
    the mid-rank empirical CDF of the reward against M reference samples of the same prompt, in [0, 1].
    rewards [..., K], reference_rewards [..., M] (same leading shape); fp64 for fp64 inputs, else fp32.
    A NaN reward calibrates to NaN, and so does every reward of a prompt with a NaN among its reference
    rewards (a NaN has no rank). Raises ValueError for mismatched leading shapes or M = 0."""
    r, ref = _tensor(rewards, "rewards"), _tensor(reference_rewards, "reference_rewards")
    if r.dim() == 0 or ref.dim() == 0 or r.shape[:-1] != ref.shape[:-1]:
        raise AlignopsError(
            f"rewards [..., K] and reference_rewards [..., M] must share their leading shape, got "
            f"{list(r.shape)} and {list(ref.shape)}"
        )
    if ref.shape[-1] == 0:
        raise AlignopsError("reference_rewards must hold M >= 1 reference samples per prompt")
    dtype = torch.float64 if torch.float64 in (r.dtype, ref.dtype) else torch.float32
    s = ref.to(dtype).sort(-1).values.contiguous()
    q = r.to(dtype).contiguous()
    below = torch.searchsorted(s, q, right=False)
    upto = torch.searchsorted(s, q, right=True)
    u = (below + upto).to(dtype) / (2 * ref.shape[-1])
    return torch.where(q.isnan() | s[..., -1:].isnan(), torch.nan, u)  # sort() puts a NaN last


@keyword_only("t")
def ctrl_transform(calibrated: torch.Tensor, *, t: float) -> torch.Tensor:
    r"""InfAlign's exponential transform of a calibrated reward u in [0, 1]: :math:`e^{t u}` for t > 0 (the
    best-of-n family: it rewards the upper tail) and :math:`-e^{t u}` for t < 0 (worst-of-n / jailbreaking:
    it punishes the lower tail); increasing in u either way. t = 0 gives u (the identity). The paper tunes t
    for the target n. Raises ValueError for a non-finite t."""
    u = _tensor(calibrated, "calibrated")
    check_finite(t, "t")
    if t == 0:
        return u
    return torch.exp(t * u) if t > 0 else -torch.exp(t * u)


class Selection(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def best_of_n(rewards: torch.Tensor) -> Selection:
    """(best reward, its index) over the last dimension [..., n]; ties go to the first. A NaN reward wins, as in
    ``torch.max``: the row's value is NaN and its index the first NaN's, so a diverged reward is never hidden
    behind a finite pick. Raises ValueError for n = 0."""
    r = _tensor(rewards, "rewards")
    if r.dim() == 0 or r.shape[-1] == 0:
        raise AlignopsError(f"rewards must have shape [..., n] with n >= 1, got {list(r.shape)}")
    idx = r.argmax(-1)
    return Selection(r.gather(-1, idx[..., None])[..., 0], idx)


def worst_of_n(rewards: torch.Tensor) -> Selection:
    """(lowest reward, its index) over the last dimension: the best-of-n jailbreaking adversary of InfAlign.
    A NaN reward is picked, as in ``torch.min`` (see :func:`best_of_n`)."""
    r = _tensor(rewards, "rewards")
    if r.dim() == 0 or r.shape[-1] == 0:
        raise AlignopsError(f"rewards must have shape [..., n] with n >= 1, got {list(r.shape)}")
    idx = r.argmin(-1)
    return Selection(r.gather(-1, idx[..., None])[..., 0], idx)


def weighted_majority_vote(
    answers: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_classes: int | None = None,
    *,
    check_values: bool = True,
) -> Selection:
    """Weighted majority vote over n answers per row: answers [..., n] int labels in [0, num_classes), weights
    [..., n] (e.g. reward-model scores or probabilities; default 1 = plain majority). Returns (total weight of
    the winner, winning label); ties go to the smallest label. ``num_classes`` defaults to max + 1 (one host
    sync). Raises ValueError for non-integer answers, labels out of range, or mismatched shapes or devices.
    ``check_values=False`` skips the checks that read tensor values on the device, so the call (with
    ``num_classes`` given) neither syncs nor breaks CUDA-graph capture (a label out of range then fails in
    the scatter: a device-side assert on a GPU)."""
    a = _tensor(answers, "answers")
    if a.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) or a.dim() == 0:
        raise AlignopsError(f"answers must be an integer tensor of shape [..., n], got {a.dtype} {list(a.shape)}")
    if a.shape[-1] == 0:
        raise AlignopsError("answers must hold n >= 1 answers per row")
    w = torch.ones(a.shape, dtype=torch.float32, device=a.device) if weights is None else weights
    if w.shape != a.shape:
        raise AlignopsError(f"weights must have the shape of answers {list(a.shape)}, got {list(w.shape)}")
    check_same_device([("answers", a), ("weights", w)])
    if num_classes is None:
        if a.numel() == 0:
            raise AlignopsError(
                f"answers is empty (shape {list(a.shape)}): pass num_classes to vote on an empty "
                "batch (the default, max + 1, needs at least one answer)"
            )
        num_classes = int(a.max()) + 1
    if check_values and a.numel() and (int(a.min()) < 0 or int(a.max()) >= num_classes):
        raise AlignopsError(f"answers must be labels in [0, num_classes) = [0, {num_classes})")
    dtype = w.dtype if w.is_floating_point() else torch.float32
    totals = torch.zeros(*a.shape[:-1], num_classes, dtype=dtype, device=a.device)
    totals.scatter_add_(-1, a.long(), w.to(dtype))
    return best_of_n(totals)
