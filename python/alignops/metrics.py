"""Alignment metrics, batched over judges / models and with seeded bootstrap confidence intervals.

Cohen's kappa and percent agreement (LLM-as-judge alignment, "Judging the Judges"), win rate with ties,
Spearman / Pearson, expected calibration error, reward accuracy, ranking accuracy, idealized ranking accuracy
and the alignment gap ("Preference Learning Algorithms Do Not Learn Preference Rankings"), online Elo and
Bradley-Terry fits, conformal p-values with Benjamini-Hochberg selection ("Optimized Conformal Selection").

Every item-level metric takes ``n_bootstrap`` (R) and ``seed``: the R resamples are drawn by a counter-based
hash of (seed, r, j) (``alignops._counter_hash.bootstrap_indices``), the same on every device and
backend, and shared by all rows of a batch (a paired bootstrap: the CIs of two judges use the same
resamples). The metric is computed on all resamples in one vectorised pass and the result holds the
percentile interval.

Implementations. Cohen's kappa / percent agreement reduce to confusion matrices, computed by the op
``alignops::bootstrap_confusion`` (C++ CPU kernel; Triton on the GPU) without materialising an [R, N] index
tensor. The other metrics are small tensor compositions (sorts, searchsorted, scatter-adds, dot products)
whose cost is one gather of the inputs per resample; they are PyTorch composite code vectorised over batch
and resamples, on any device -- a C++ kernel would only re-call the same ATen reductions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend, _counter_hash
from ._api import keyword_only
from ._checks import check_finite, check_has_values, check_int64, check_not_nan, check_same_device, values_checkable
from ._errors import AlignopsError
from .ops._registration import run_value_checks
from .reference import metrics as _ref

_WEIGHTS = (None, "linear", "quadratic")


class MetricResult(NamedTuple):
    """``value`` on the full sample; ``low`` / ``high`` the percentile bootstrap interval (None without
    bootstrap); ``resamples`` the metric on each resample, [..., R] (None without bootstrap)."""

    value: torch.Tensor
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    resamples: torch.Tensor | None = None


class ConformalSelection(NamedTuple):
    """``selected`` bool [..., m]: the test items selected at FDR level q; ``pvalues`` [..., m]: their conformal
    p-values."""

    selected: torch.Tensor
    pvalues: torch.Tensor


def _check_bootstrap(n_bootstrap: int, seed: int, confidence: float | None = None) -> None:
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise AlignopsError(f"n_bootstrap must be an int >= 0, got {n_bootstrap!r}")
    check_int64(seed, "seed")
    if confidence is not None and not 0 < confidence < 1:
        raise AlignopsError(f"confidence must be in (0, 1), got {confidence}")


def _result(values: torch.Tensor, n_bootstrap: int, confidence: float) -> MetricResult:
    """values [..., R + 1] (column 0 the sample) -> MetricResult. Resamples where the metric is undefined
    (NaN) are left out of the interval (torch.nanquantile)."""
    value = values[..., 0]
    if n_bootstrap == 0:
        return MetricResult(value)
    boot = values[..., 1:]
    alpha = (1 - confidence) / 2
    q = torch.linspace(alpha, 1 - alpha, 2, dtype=boot.dtype, device=boot.device)  # made on the device: no copy
    lo_hi = torch.nanquantile(boot, q, dim=-1)
    return MetricResult(value, lo_hi[0], lo_hi[1], boot)


def _float(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AlignopsError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
        t = t.to(torch.float32)
    return t.double() if t.dtype in (torch.float64, torch.int64, torch.int32) else t.float()


def _paired(tensors: dict[str, torch.Tensor], min_items: int = 1) -> list[torch.Tensor]:
    """Broadcasts the [..., N] inputs together, checking N and the device; returns them in fp32 / fp64."""
    items = list(tensors.items())
    first_name, first = items[0]
    out = []
    for name, t in items:
        t = _float(t, name)
        if t.dim() == 0:
            raise AlignopsError(f"{name} must have shape [..., N] (items last), got a scalar")
        check_same_device([(first_name, first), (name, t)])
        out.append(t)
    n = out[0].shape[-1]
    for (name, _), t in zip(items, out):
        if t.shape[-1] != n:
            raise AlignopsError(
                f"{name} must have N = {n} items in its last dimension (as {first_name}), got shape {tuple(t.shape)}"
            )
    if n < min_items:
        raise AlignopsError(f"{first_name} needs at least {min_items} items (N), got {n}")
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in out))
    except RuntimeError as e:
        raise AlignopsError(f"the leading (batch) dimensions of {', '.join(tensors)} must broadcast: {e}") from None
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in out) else torch.float32
    return [t.to(dtype).expand(shape) for t in out]


def _resampled(tensors: list[torch.Tensor], n_bootstrap: int, seed: int) -> list[torch.Tensor]:
    """[..., N] -> [..., R + 1, N]: the sample, then the R seeded resamples (one gather per input)."""
    n = tensors[0].shape[-1]
    idx = _counter_hash.bootstrap_indices(seed, n_bootstrap, n, tensors[0].device)
    return [t[..., idx] for t in tensors]


# ---- agreement between raters ----------------------------------------------------------------------


def confusion_matrices(
    a: torch.Tensor,
    b: torch.Tensor,
    num_classes: int | None = None,
    *,
    n_bootstrap: int = 0,
    seed: int = 0,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """int32 [..., R + 1, C, C] confusion matrices of label tensors a [..., N] and b [..., N] (b's leading
    dimensions broadcast to a's): entry [.., r, i, j] counts items labelled i by a and j by b in resample r
    (r = 0: the sample). Labels are ints in [0, num_classes); ``num_classes`` defaults to max label + 1
    (one host sync). C <= 255 (native), C <= 16 (triton).

    Backends: ``native`` C++ CPU kernel (multiplicity vectors from the counter-based hash, threaded over
    pair blocks x resamples), ``triton`` (GPU; interpreter on CPU), ``torch`` (the [P, R + 1, N] gather of
    :mod:`alignops.reference.metrics`). All three give identical counts. Raises ValueError for non-integer
    labels, labels out of range, mismatched shapes or devices. Checking the labels' range reads them (one
    host sync on a GPU); ``check_values=False`` skips the checks that read tensor values on the device, so
    the call (with ``num_classes`` given) neither syncs nor breaks CUDA-graph capture. The native CPU
    kernel checks the labels whatever the flag; the Triton kernel miscounts labels out of range (it never
    reads or writes out of bounds), the torch backend fails on them.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.uint8,
            torch.int8,
            torch.bool,
        ):
            raise AlignopsError(
                f"{name} must be an integer (or bool) tensor of class labels, got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
        if t.dim() == 0:
            raise AlignopsError(f"{name} must have shape [..., N] (items last), got a scalar")
    check_same_device([("a", a), ("b", b)])
    if a.shape[-1] != b.shape[-1]:
        raise AlignopsError(f"a and b must label the same N items: got N = {a.shape[-1]} and {b.shape[-1]}")
    _check_bootstrap(n_bootstrap, seed)
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    N = a.shape[-1]
    P = math.prod(lead)
    a2 = a.long().expand(*lead, N).reshape(P, N)
    # One reference row for all pairs stays one row: the kernels read it with a zero stride.
    shared_b = math.prod(b.shape[:-1]) == 1
    b2 = b.long().reshape(1, N) if shared_b else b.long().expand(*lead, N).reshape(P, N)
    if num_classes is None:
        check_has_values("confusion_matrices", "a", a2, "pass num_classes")
        num_classes = int(max(int(a2.max()) if a2.numel() else 0, int(b2.max()) if b2.numel() else 0)) + 1
    impl = _backend.resolve(backend, a.device, "confusion_matrices", native_cuda=False)
    if impl != "native" and check_values:
        run_value_checks("alignops::bootstrap_confusion", a2, b2, int(num_classes))
    if impl == "torch":
        out = _ref.bootstrap_confusion(a2, b2, num_classes, n_bootstrap, seed)
    else:
        ops = torch.ops.alignops
        op = ops.bootstrap_confusion if impl == "native" else ops.bootstrap_confusion_triton
        out = op(a2, b2, num_classes, n_bootstrap, seed)
    return out.view(*lead, n_bootstrap + 1, num_classes, num_classes)


@keyword_only("weights", "undefined")
def kappa_from_confusion(
    confusion: torch.Tensor, *, weights: str | None = None, undefined: float = float("nan")
) -> torch.Tensor:
    r"""Cohen's kappa of confusion matrices [..., C, C] (fp64): :math:`1 - \sum w_{ij} O_{ij} / \sum w_{ij}
    E_{ij}` with :math:`E = \text{rowsum} \otimes \text{colsum} / n` and :math:`w_{ij}` = 1[i != j]
    (unweighted), |i - j| (linear) or (i - j)^2 (quadratic), as scikit-learn's ``cohen_kappa_score`` with
    ``labels=range(C)``. Undefined (0 / 0: both raters used one and the same class only, or no items) ->
    ``undefined`` (NaN by default, scikit-learn's ``replace_undefined_by``)."""
    if weights not in _WEIGHTS:
        raise AlignopsError(f"weights must be one of {_WEIGHTS}, got {weights!r}")
    O = confusion.double()
    C = O.shape[-1]
    i = torch.arange(C, device=O.device, dtype=torch.float64)
    d = i[:, None] - i[None, :]
    w = (d != 0).double() if weights is None else (d.abs() if weights == "linear" else d * d)
    n = O.sum((-1, -2))
    E = O.sum(-1)[..., :, None] * O.sum(-2)[..., None, :] / n.clamp_min(1)[..., None, None]
    num = (w * O).sum((-1, -2))
    den = (w * E).sum((-1, -2))
    kappa = 1 - num / torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.full_like(kappa, undefined), kappa)


def cohen_kappa(
    a: torch.Tensor,
    b: torch.Tensor,
    num_classes: int | None = None,
    *,
    weights: str | None = None,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    undefined: float = float("nan"),
    backend: str = "auto",
    check_values: bool = True,
) -> MetricResult:
    """Cohen's kappa between label tensors a [..., N] and b [..., N] (e.g. 1000 judges [1000, N] against
    one human reference [N]), unweighted / ``"linear"`` / ``"quadratic"``, with an optional seeded paired
    bootstrap CI. Returns fp64 values of the broadcast leading shape. The labels are the integers
    0..C-1 (weights use these positions, as scikit-learn with ``labels=range(C)``). Undefined kappa (both
    raters used the same single class) -> ``undefined`` (NaN by default, as scikit-learn), and such
    resamples are left out of the interval. See :func:`confusion_matrices` for backends, errors and
    ``check_values``."""
    if weights not in _WEIGHTS:
        raise AlignopsError(f"weights must be one of {_WEIGHTS}, got {weights!r}")
    _check_bootstrap(n_bootstrap, seed, confidence)
    conf = confusion_matrices(
        a, b, num_classes, n_bootstrap=n_bootstrap, seed=seed, backend=backend, check_values=check_values
    )
    return _result(kappa_from_confusion(conf, weights=weights, undefined=undefined), n_bootstrap, confidence)


def percent_agreement(
    a: torch.Tensor,
    b: torch.Tensor,
    num_classes: int | None = None,
    *,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    backend: str = "auto",
    check_values: bool = True,
) -> MetricResult:
    """Fraction of items on which a and b give the same label (trace / N of the confusion matrix), fp64,
    with the bootstrap and the arguments of :func:`cohen_kappa`. N = 0 gives NaN."""
    _check_bootstrap(n_bootstrap, seed, confidence)
    conf = confusion_matrices(
        a, b, num_classes, n_bootstrap=n_bootstrap, seed=seed, backend=backend, check_values=check_values
    ).double()
    agree = conf.diagonal(dim1=-2, dim2=-1).sum(-1) / conf.sum((-1, -2))
    return _result(agree, n_bootstrap, confidence)


# ---- pairwise outcomes --------------------------------------------------------------------------------


def win_rate(
    scores_a: torch.Tensor,
    scores_b: torch.Tensor,
    *,
    tie_value: float = 0.5,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Win rate of a over b on paired scores [..., N]: mean(1[a > b] + tie_value * 1[a == b]) (ties count
    half by default). A NaN score is neither a win, a tie nor a loss: its row's win rate is NaN. Torch
    composite. Raises ValueError for N = 0, shapes that do not broadcast, a non-finite tie_value or a seed
    outside the int64 range."""
    _check_bootstrap(n_bootstrap, seed, confidence)
    check_finite(tie_value, "tie_value")
    a, b = _resampled(_paired({"scores_a": scores_a, "scores_b": scores_b}), n_bootstrap, seed)
    wins = (a > b).to(a.dtype) + tie_value * (a == b).to(a.dtype)
    wins = torch.where(a.isnan() | b.isnan(), torch.nan, wins)
    return _result(wins.mean(-1), n_bootstrap, confidence)


def reward_accuracy(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """mean(1[chosen > rejected]) over the last dimension (TRL's rewards/accuracies: a tie counts as wrong).
    Torch composite."""
    return win_rate(
        chosen_rewards, rejected_rewards, tie_value=0.0, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed
    )


def ranking_accuracy(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Ranking accuracy (Chen et al. 2024): mean(1[log pi(y_w | x) > log pi(y_l | x)]) on per-sequence
    log-probs [..., N]; a tie counts as wrong. Torch composite."""
    return win_rate(
        policy_chosen_logps,
        policy_rejected_logps,
        tie_value=0.0,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
    )


def _idealized_correct(ref_c, ref_r, alpha, beta):
    # pi*(y_w) / pi*(y_l) = pi_ref(y_w) / pi_ref(y_l) * (alpha / (1 - alpha))^(1 / beta) at the DPO / RLHF optimum.
    return (ref_c - ref_r + torch.logit(alpha) / beta > 0).to(ref_c.dtype)


def _check_pref(preference_prob: torch.Tensor, beta: float, check_values: bool) -> None:
    check_finite(beta, "beta")
    if not beta > 0:
        raise AlignopsError(f"beta must be > 0, got {beta}")
    if check_values and preference_prob.numel() and not torch.compiler.is_compiling():
        if bool(((preference_prob < 0) | (preference_prob > 1) | preference_prob.isnan()).any()):
            raise AlignopsError("preference_prob must hold probabilities in [0, 1]")


@keyword_only("beta")
def idealized_ranking_accuracy(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    preference_prob: torch.Tensor,
    *,
    beta: float,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    check_values: bool = True,
) -> MetricResult:
    r"""Idealized ranking accuracy (Chen et al. 2024, Thm. 3.1): the ranking accuracy of the exact optimum of
    the DPO / RLHF objective, whose likelihood ratio is
    :math:`\pi^*(y_w)/\pi^*(y_l) = \pi_{ref}(y_w)/\pi_{ref}(y_l) \cdot (\alpha/(1-\alpha))^{1/\beta}`,
    i.e. mean(1[ref_w - ref_l + logit(alpha) / beta > 0]) with alpha = P(y_w > y_l) (``preference_prob``,
    e.g. the fraction of raters preferring y_w; alpha = 1 is always ranked correctly). Torch composite.
    Raises ValueError for a beta that is not finite and > 0 or alpha outside [0, 1]. ``check_values=False``
    skips the checks that read tensor values on the device (alpha's range), so the call neither syncs nor
    breaks CUDA-graph capture."""
    _check_bootstrap(n_bootstrap, seed, confidence)
    c, r, p = _paired(
        {
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "preference_prob": preference_prob,
        }
    )
    _check_pref(p, beta, check_values)
    c, r, p = _resampled([c, r, p], n_bootstrap, seed)
    return _result(_idealized_correct(c, r, p, beta).mean(-1), n_bootstrap, confidence)


@keyword_only("beta")
def alignment_gap(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    preference_prob: torch.Tensor,
    *,
    beta: float,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    check_values: bool = True,
) -> MetricResult:
    """Idealized minus observed ranking accuracy (Chen et al. 2024), both on the same (paired) resamples.
    Errors and ``check_values`` as :func:`idealized_ranking_accuracy`."""
    _check_bootstrap(n_bootstrap, seed, confidence)
    pc, pr, c, r, p = _paired(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "preference_prob": preference_prob,
        }
    )
    _check_pref(p, beta, check_values)
    pc, pr, c, r, p = _resampled([pc, pr, c, r, p], n_bootstrap, seed)
    gap = _idealized_correct(c, r, p, beta).mean(-1) - (pc > pr).to(pc.dtype).mean(-1)
    return _result(gap, n_bootstrap, confidence)


# ---- correlation and calibration -------------------------------------------------------------------------


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    """x / max|x| along the last dim (0 rows kept): r is scale-free, and the squares of values near 1e30
    (or 1e-30) would overflow (underflow) fp32."""
    m = x.abs().amax(-1, keepdim=True)
    return x / torch.where(m > 0, m, torch.ones_like(m))


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _unit_scale(x), _unit_scale(y)
    xc = _unit_scale(x - x.mean(-1, keepdim=True))
    yc = _unit_scale(y - y.mean(-1, keepdim=True))
    den = (xc.square().sum(-1) * yc.square().sum(-1)).sqrt()
    r = (xc * yc).sum(-1) / den
    return torch.where(den == 0, torch.full_like(r, float("nan")), r.clamp(-1, 1))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim, ties sharing their average rank (scipy.stats.rankdata)."""
    s = x.sort(-1).values.contiguous()
    xc = x.contiguous()
    lower = torch.searchsorted(s, xc, right=False)
    upper = torch.searchsorted(s, xc, right=True)
    return (lower + upper + 1).to(x.dtype) / 2


def pearson(
    x: torch.Tensor, y: torch.Tensor, *, n_bootstrap: int = 0, confidence: float = 0.95, seed: int = 0
) -> MetricResult:
    """Pearson correlation along the last dimension of x, y [..., N] (fp32, fp64 for fp64 / integer
    inputs), as scipy.stats.pearsonr; a constant input gives NaN (scipy's value, without a warning).
    Torch composite. Raises ValueError for N < 2."""
    _check_bootstrap(n_bootstrap, seed, confidence)
    x, y = _resampled(_paired({"x": x, "y": y}, min_items=2), n_bootstrap, seed)
    return _result(_pearson(x, y), n_bootstrap, confidence)


def spearman(
    x: torch.Tensor, y: torch.Tensor, *, n_bootstrap: int = 0, confidence: float = 0.95, seed: int = 0
) -> MetricResult:
    """Spearman rank correlation (Pearson of average ranks, ties averaged) along the last dimension, as
    scipy.stats.spearmanr; a constant input gives NaN. Torch composite (sort + searchsorted)."""
    _check_bootstrap(n_bootstrap, seed, confidence)
    x, y = _resampled(_paired({"x": x, "y": y}, min_items=2), n_bootstrap, seed)
    return _result(_pearson(_average_ranks(x), _average_ranks(y)), n_bootstrap, confidence)


def expected_calibration_error(
    confidences: torch.Tensor,
    correct: torch.Tensor,
    *,
    n_bins: int = 10,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    check_values: bool = True,
) -> MetricResult:
    r"""ECE = :math:`\sum_b (n_b / N) |acc_b - conf_b|` over ``n_bins`` uniform bins of [0, 1]; a
    confidence on an inner edge goes to the lower bin (scikit-learn's ``calibration_curve(strategy="uniform")``
    binning, whose per-bin means it reproduces). confidences [..., N] in [0, 1], correct [..., N] bool or
    0/1. Torch composite (one scatter-add per bin statistic). Raises ValueError for confidences outside
    [0, 1] or n_bins < 1. ``check_values=False`` skips the checks that read tensor values on the device, so the
    call neither syncs nor breaks CUDA-graph capture (a confidence outside [0, 1] then counts in the first or
    last bin)."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise AlignopsError(f"n_bins must be an int >= 1, got {n_bins!r}")
    _check_bootstrap(n_bootstrap, seed, confidence)
    p, y = _paired({"confidences": confidences, "correct": correct})
    if check_values and p.numel() and values_checkable(p) and bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise AlignopsError("confidences must lie in [0, 1]")
    p, y = _resampled([p, y], n_bootstrap, seed)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=p.dtype, device=p.device)[1:-1].contiguous()
    bins = torch.searchsorted(edges, p.contiguous())
    gap = torch.zeros(*p.shape[:-1], n_bins, dtype=p.dtype, device=p.device).scatter_add_(-1, bins, y - p)
    return _result(gap.abs().sum(-1) / p.shape[-1], n_bootstrap, confidence)


# ---- ratings --------------------------------------------------------------------------------------------


def _check_games(winners, losers, num_players, draws, check_values):
    for name, t in (("winners", winners), ("losers", losers)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            raise AlignopsError(
                f"{name} must be a 1-D int64/int32 tensor of player ids [G], got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
    if winners.shape != losers.shape:
        raise AlignopsError(f"losers must have the shape of winners {tuple(winners.shape)}, got {tuple(losers.shape)}")
    check_same_device([("winners", winners), ("losers", losers), ("draws", draws)])
    if draws is not None and (draws.shape != winners.shape or draws.dtype != torch.bool):
        raise AlignopsError(f"draws must be a bool tensor of shape [G] = {tuple(winners.shape)}")
    if (
        check_values
        and winners.numel()
        and (
            int(torch.minimum(winners.min(), losers.min())) < 0
            or int(torch.maximum(winners.max(), losers.max())) >= num_players
        )
    ):
        raise AlignopsError(f"winners and losers must be player ids in [0, num_players) = [0, {num_players})")


def elo_ratings(
    winners: torch.Tensor,
    losers: torch.Tensor,
    num_players: int,
    *,
    draws: torch.Tensor | None = None,
    k: float = 32.0,
    scale: float = 400.0,
    initial: float = 1000.0,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    check_values: bool = True,
) -> MetricResult:
    r"""Online Elo over games in order: :math:`E = 1/(1 + 10^{(R_l - R_w)/scale})`, winner += k (S - E),
    loser -= k (S - E), S = 1 (0.5 for a draw). Returns fp64 ratings [num_players]. With n_bootstrap, each
    resample replays the resampled games in resampled order (Chatbot Arena's bootstrap); the replays run in
    one loop over games vectorised over resamples. Sequential by nature: torch composite. Raises ValueError
    for ids out of range, mismatched shapes or devices, non-finite k / scale / initial and scale <= 0.
    ``check_values=False`` skips the checks that read tensor values on the device, so the call neither syncs
    nor breaks CUDA-graph capture (an id out of range then fails inside the indexing: a device-side assert on
    a GPU)."""
    _check_games(winners, losers, num_players, draws, check_values)
    _check_bootstrap(n_bootstrap, seed, confidence)
    for name, value in (("k", k), ("scale", scale), ("initial", initial)):
        check_finite(value, name)
    if not scale > 0:
        raise AlignopsError(f"scale must be > 0, got {scale}")
    G = winners.shape[0]
    idx = _counter_hash.bootstrap_indices(seed, n_bootstrap, G, winners.device)  # [R + 1, G]
    w, l = winners.long()[idx], losers.long()[idx]
    s = torch.ones_like(w, dtype=torch.float64) if draws is None else torch.where(draws[idx], 0.5, 1.0).double()
    ratings = torch.full((n_bootstrap + 1, num_players), float(initial), dtype=torch.float64, device=winners.device)
    rows = torch.arange(n_bootstrap + 1, device=winners.device)
    for g in range(G):
        rw, rl = ratings[rows, w[:, g]], ratings[rows, l[:, g]]
        step = k * (s[:, g] - 1 / (1 + 10 ** ((rl - rw) / scale)))
        ratings[rows, w[:, g]] = rw + step
        ratings[rows, l[:, g]] = ratings[rows, l[:, g]] - step
    return _result(ratings.t(), n_bootstrap, confidence)


def bradley_terry(
    winners: torch.Tensor,
    losers: torch.Tensor,
    num_players: int,
    *,
    draws: torch.Tensor | None = None,
    pseudo_count: float = 0.0,
    max_iters: int = 10000,
    tol: float = 1e-10,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    check_values: bool = True,
) -> MetricResult:
    r"""Maximum-likelihood Bradley-Terry strengths :math:`P(i \succ j) = \sigma(\theta_i - \theta_j)` by
    Hunter's MM iteration :math:`p_i \leftarrow W_i / \sum_j n_{ij} / (p_i + p_j)`, returned as
    :math:`\theta = \log p` centred to mean 0 (fp64 [num_players]; multiply by 400 / ln 10 for an Elo
    scale). A draw counts half a win for each side; ``pseudo_count`` adds that many virtual draws between
    every pair of players (a prior that makes the MLE exist when some player never wins or loses; without
    it such a player gets -inf / +inf). Iterates until the largest change of theta is below ``tol``.
    With n_bootstrap the games are resampled and all fits run in one batched iteration. Torch composite.
    The stopping test reads the device once per iteration; ``check_values=False`` skips only the id check
    of :func:`elo_ratings`."""
    _check_games(winners, losers, num_players, draws, check_values)
    _check_bootstrap(n_bootstrap, seed, confidence)
    check_finite(pseudo_count, "pseudo_count")
    if pseudo_count < 0:
        raise AlignopsError(f"pseudo_count must be >= 0, got {pseudo_count}")
    check_not_nan(tol, "tol")
    G, M = winners.shape[0], num_players
    idx = _counter_hash.bootstrap_indices(seed, n_bootstrap, G, winners.device)
    w, l = winners.long()[idx], losers.long()[idx]
    s = torch.ones_like(w, dtype=torch.float64) if draws is None else torch.where(draws[idx], 0.5, 1.0).double()
    wins = torch.zeros(n_bootstrap + 1, M * M, dtype=torch.float64, device=winners.device)
    wins.scatter_add_(1, w * M + l, s)
    wins.scatter_add_(1, l * M + w, 1 - s)
    wins = wins.view(-1, M, M)
    if pseudo_count > 0:
        wins = wins + 0.5 * pseudo_count * (1 - torch.eye(M, dtype=torch.float64, device=wins.device))
    games = wins + wins.transpose(1, 2)
    total_wins = wins.sum(-1)
    p = torch.ones(n_bootstrap + 1, M, dtype=torch.float64, device=winners.device)
    for _ in range(max_iters):
        den = (games / (p[:, :, None] + p[:, None, :])).sum(-1)
        new = torch.where(den > 0, total_wins / torch.where(den > 0, den, 1), p)
        new = new / torch.exp(torch.log(new.clamp_min(1e-300)).mean(-1, keepdim=True))
        done = bool(((new.log() - p.log()).abs().nan_to_num(0, 0, 0) <= tol).all())
        p = new
        if done:
            break
    theta = p.log()
    theta = theta - theta.masked_fill(~theta.isfinite(), 0).sum(-1, keepdim=True) / theta.isfinite().sum(
        -1, keepdim=True
    ).clamp_min(1)
    return _result(theta.t(), n_bootstrap, confidence)


# ---- conformal selection -----------------------------------------------------------------------------------


@keyword_only("threshold")
def conformal_pvalues(
    calib_scores: torch.Tensor, calib_labels: torch.Tensor, test_scores: torch.Tensor, *, threshold: float
) -> torch.Tensor:
    r"""Conformal p-values for selecting test items whose unseen label exceeds ``threshold`` c (Jin &
    Candès's conformal selection, the null H_j: Y_j <= c, with the clipped score that OptCS builds on).
    With predicted scores s (higher = more likely interesting), calibration items (s_i, y_i):
    :math:`p_j = (1 + \#\{i : y_i \le c,\ s_i \ge s_j\}) / (n + 1)` -- the deterministic (conservative, ties
    counted) p-value of the clipped score :math:`V = M 1\{y > c\} + c 1\{y \le c\} - s`.
    calib_scores / calib_labels [..., n], test_scores [..., m]; returns fp64 [..., m]. Torch composite
    (sort + searchsorted). Raises ValueError for mismatched shapes or devices and a NaN threshold (inf is
    allowed: every calibration item is then null)."""
    check_same_device([("calib_scores", calib_scores), ("calib_labels", calib_labels), ("test_scores", test_scores)])
    check_not_nan(threshold, "threshold")
    if calib_scores.shape != calib_labels.shape:
        raise AlignopsError(
            f"calib_labels must have the shape of calib_scores {tuple(calib_scores.shape)}, "
            f"got {tuple(calib_labels.shape)}"
        )
    if calib_scores.dim() == 0 or test_scores.dim() == 0:
        raise AlignopsError("calib_scores and test_scores must have shape [..., n] and [..., m]")
    if calib_scores.shape[:-1] != test_scores.shape[:-1]:
        raise AlignopsError(
            "test_scores must have the leading shape of calib_scores "
            f"{tuple(calib_scores.shape[:-1])}, got {tuple(test_scores.shape[:-1])}"
        )
    s = calib_scores.double()
    null = calib_labels.double() <= threshold
    # Non-null calibration items never count: push them below every test score.
    keyed = torch.where(null, s, torch.full_like(s, -math.inf)).sort(-1).values.contiguous()
    below = torch.searchsorted(keyed, test_scores.double().contiguous(), right=False)  # s_i < s_j (or non-null)
    count = s.shape[-1] - below
    return (1 + count).double() / (s.shape[-1] + 1)


@keyword_only("q")
def benjamini_hochberg(pvalues: torch.Tensor, *, q: float) -> torch.Tensor:
    """Benjamini-Hochberg selection at FDR level q along the last dimension: with k* the largest k such that
    the k-th smallest p-value is <= q k / m, select every p <= q k* / m (bool [..., m]; none when no k
    qualifies). Equivalent to scipy.stats.false_discovery_control(p) <= q. Raises ValueError for q outside
    (0, 1] and for p-values outside [0, 1] or NaN (a NaN has no rank; that check reads one value back)."""
    if not 0 < q <= 1:
        raise AlignopsError(f"q (the FDR level) must be in (0, 1], got {q}")
    if pvalues.dim() == 0:
        raise AlignopsError("pvalues must have shape [..., m]")
    if pvalues.numel() and not torch.compiler.is_compiling():
        bad = ~((pvalues >= 0) & (pvalues <= 1))
        if bool(bad.any()):
            raise AlignopsError(f"pvalues must lie in [0, 1], got {pvalues[bad][0].item()}")
    m = pvalues.shape[-1]
    p = pvalues.double()
    sorted_p = p.sort(-1).values
    k = torch.arange(1, m + 1, dtype=torch.float64, device=p.device)
    ok = sorted_p <= q * k / m
    kstar = torch.where(ok, k, torch.zeros_like(k)).amax(-1, keepdim=True) if m else torch.zeros_like(p[..., :1])
    return p <= q * kstar / m


@keyword_only("threshold", "q")
def conformal_selection(
    calib_scores: torch.Tensor, calib_labels: torch.Tensor, test_scores: torch.Tensor, *, threshold: float, q: float
) -> ConformalSelection:
    """(selected bool [..., m], p-values [..., m]): :func:`conformal_pvalues` then :func:`benjamini_hochberg`
    at level q, which controls the FDR of selecting items with label > threshold in finite samples."""
    pv = conformal_pvalues(calib_scores, calib_labels, test_scores, threshold=threshold)
    return ConformalSelection(benjamini_hochberg(pv, q=q), pv)
