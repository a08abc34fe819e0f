"""Preference optimisation: DPO-family losses on per-sequence log-probs, and per-token log-probs.

Public functions of the ``preference`` family. Every function takes ``backend="auto" | "native" |
"triton" | "torch"``; ``"torch"`` is :mod:`alignops.reference.preference`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._api import keyword_only
from ._checks import check_finite, values_checkable
from ._codes import FDivergence, LossType, lower_name
from ._errors import AlignopsError
from .ops._registration import run_checks, run_op_checks
from .reference import preference as _ref

# "aot" and "aot_unpaired" run as LossType.AOT on inputs sorted here; "ln_dpo" (length-normalised DPO) is
# TRL's "sigmoid_norm".
_ALIASES = {"ln_dpo": LossType.SIGMOID_NORM}
_CODES = {
    name: code
    for code in LossType
    if code is not LossType.AOT
    for name in (lower_name(code), *(a for a, c in _ALIASES.items() if c is code))
}
_SORTED_TYPES = ("aot", "aot_unpaired")
LOSS_TYPES = tuple(_CODES) + _SORTED_TYPES
_F_DIVERGENCE_CODES = {lower_name(code): code for code in FDivergence}
# TRL applies an f-divergence only to the loss types built on delta = s(xc) - s(xr).
_F_DIVERGENCE_TYPES = {"sigmoid", "sigmoid_norm", "ln_dpo", "hinge", "ipo", "exo_pair", "robust", "discopop"}
_NEEDS_LENGTHS = {"sigmoid_norm", "ln_dpo"}
_REDUCTIONS = ("none", "mean", "sum")


class PreferenceLossOutput(NamedTuple):
    """``loss`` (reduced as asked), and per pair the detached rewards ``beta * (logp - ref_logp)``."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """chosen_rewards - rejected_rewards, per pair."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Reward accuracy, per pair: 1.0 where chosen_rewards > rejected_rewards."""
        return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")


def _check_loss_names(types) -> None:
    for t in types:
        if t not in LOSS_TYPES:
            raise AlignopsError(f"unknown loss_type {t!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    if len(types) == 0:
        raise AlignopsError("loss_type must name at least one loss type")


def _check_loss_args(
    types,
    weights,
    beta,
    label_smoothing,
    f_divergence_type,
    f_alpha_divergence_coef,
    discopop_tau,
    gamma,
    reduction,
    chosen_lengths,
    rejected_lengths,
    pc,
):
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise AlignopsError(f"loss_weights must be finite, got loss_weights[{i}] = {w}")
    if isinstance(beta, torch.Tensor):
        # Values are checked where that costs no device sync.
        if beta.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = ~((beta > 0) & beta.isfinite())
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise AlignopsError(f"beta must be > 0 and finite for every pair, got beta[{i}] = {beta[i].item()}")
        if any(t in _SORTED_TYPES for t in types):
            raise AlignopsError(
                "a per-pair beta tensor is not defined for aot / aot_unpaired (they pair sorted "
                "ratios across the batch); pass a float beta"
            )
    elif not (beta > 0 and math.isfinite(beta)):
        raise AlignopsError(f"beta must be > 0 and finite, got {beta}")
    if not 0.0 <= label_smoothing < 1.0:
        raise AlignopsError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if "robust" in types and not label_smoothing < 0.5:
        raise AlignopsError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0.0:
        raise AlignopsError("label_smoothing must be > 0 for loss_type='exo_pair' (the EXO paper uses 1e-3)")
    if f_divergence_type not in _F_DIVERGENCE_CODES:
        raise AlignopsError(
            f"f_divergence_type must be one of {', '.join(_F_DIVERGENCE_CODES)}, got {f_divergence_type!r}"
        )
    if f_divergence_type != "reverse_kl":
        unsupported = sorted(set(types) - _F_DIVERGENCE_TYPES)
        if unsupported:
            raise AlignopsError(
                f"f_divergence_type={f_divergence_type!r} applies only to loss types "
                f"{sorted(_F_DIVERGENCE_TYPES)}; got {unsupported}"
            )
    if not (discopop_tau > 0 and math.isfinite(discopop_tau)):
        raise AlignopsError(f"discopop_tau must be a finite value > 0, got {discopop_tau}")
    check_finite(f_alpha_divergence_coef, "f_alpha_divergence_coef")
    check_finite(gamma, "gamma")
    if reduction not in _REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if _NEEDS_LENGTHS & set(types) and (chosen_lengths is None or rejected_lengths is None):
        raise AlignopsError(
            f"loss_type {sorted(_NEEDS_LENGTHS & set(types))[0]!r} normalises by completion length: "
            "pass chosen_lengths and rejected_lengths"
        )


def _sort_pairs(t: str, pc, pr, rc, rr):
    """Permute the inputs so that code 8 on them is TRL's aot / aot_unpaired (sorted-ratio pairing)."""
    if t == "aot":
        i = torch.argsort(pc - pr, stable=True)
        j = torch.argsort(rc - rr, stable=True)
        return pc[i], pr[i], rc[j], rr[j]
    i = torch.argsort(pc - rc, stable=True)
    j = torch.argsort(pr - rr, stable=True)
    return pc[i], pr[j], rc[i], rr[j]


@keyword_only("loss_type", "beta", "label_smoothing")
def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | list[str] = "sigmoid",
    beta: float | torch.Tensor = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    gamma: float = 0.5,
    reduction: str = "mean",
    backend: str = "auto",
) -> PreferenceLossOutput:
    r"""DPO-family preference loss on per-sequence log-probs, with TRL's numbers.

    Inputs are [B] per-sequence log-probs (summed over completion tokens) of the policy and the
    reference; ``ref_*=None`` means 0 (reference-free). With ``xc = pc - rc``, ``xr = pr - rr``, the
    f-divergence score ``s`` (identity for ``"reverse_kl"``), ``d = s(xc) - s(xr)``, ``b = beta``,
    ``e = label_smoothing`` and lengths ``nc, nr`` (clamped to >= 1):

    ============== ====================================================================
    sigmoid        ``-(1-e) logsig(b d) - e logsig(-b d)`` (DPO; cDPO for e > 0)
    hinge          ``relu(1 - b d)``
    ipo            ``(s(xc)/nc - s(xr)/nr - 1/(2b))^2`` (TRL's per-token IPO when lengths
                   are given, the paper's sequence-level IPO without)
    exo_pair       ``q (log q - log(1-e)) + (1-q)(log(1-q) - log e)``, ``q = sig(b d)``
    nca_pair       ``-logsig(b xc) - logsig(-b xc)/2 - logsig(-b xr)/2``
    robust         ``(-(1-e) logsig(b d) + e logsig(-b d)) / (1 - 2e)``
    bco_pair       ``-logsig(b xc) - logsig(-b xr)``
    sppo_hard      ``(xc - 1/(2b))^2 + (xr + 1/(2b))^2``
    aot            smoothed logistic on ``sort(pc - pr) - sort(rc - rr)`` (batch-level)
    aot_unpaired   smoothed logistic on ``sort(xc) - sort(xr)``
    apo_zero       ``1 - sig(b xc) + sig(b xr)``
    apo_down       ``sig(b xc) + 1 - sig(b (xc - xr))``
    discopop       ``-logsig(z)(1 - m) + exp(-z) m``, ``z = b d``, ``m = sig(z / tau)``
    sigmoid_norm   ``-logsig(b (s(xc)/nc - s(xr)/nr))``; alias ``ln_dpo`` (LN-DPO)
    simpo          ``-(1-e) logsig(z) - e logsig(-z)``, ``z = b (pc/nc - pr/nr) - gamma``
                   (reference-free; lengths optional when the log-probs are already means)
    cpo            ``-(1-e) logsig(b (pc - pr)) - e logsig(-b (pc - pr))`` (reference-free;
                   CPO's NLL term is added on the per-token path)
    ============== ====================================================================

    A list ``loss_type=[...]`` with ``loss_weights`` sums the weighted per-pair losses (TRL's
    multi-loss). ``beta`` may be a [B] tensor (Dynamic Reward Scaling: per-sample beta; CPU values
    are checked > 0, CUDA values are not, to avoid a device sync).

    f-divergence scores are TRL 1.16's, additive constants included: ``forward_kl`` ``1 - e^{-x}``,
    ``js_divergence`` ``log 2 + logsig(x)``, ``alpha_divergence`` ``(e^{(a-1)x} - 1)/(a-1)`` (exponent
    clamped at 80). The constants cancel in ``s(xc) - s(xr)`` but not after the division by unequal lengths
    in ipo / sigmoid_norm / ln_dpo; TRL 1.0-1.9 dropped them and gives other numbers there.

    Label smoothing with ``"sigmoid"`` is cDPO (as Liger-Kernel and TRL < 1.0). TRL 1.16 ignores
    ``label_smoothing`` for ``"sigmoid"`` (it reads it only for robust, exo_pair and aot); we do not drop a
    value the caller set, so ``label_smoothing=0`` (the default) reproduces TRL. Everything else matches
    TRL 1.16's ``DPOTrainer`` for the same inputs.

    Returns :class:`PreferenceLossOutput` ``(loss, chosen_rewards, rejected_rewards)`` with
    ``.margins`` and ``.accuracy``; ``loss`` is [B] for ``reduction="none"``, else a scalar. All are
    fp32 (fp64 for fp64 inputs): bf16/fp16 inputs are accumulated in fp32. The kernels compute the
    loss and its gradient in one closed-form pass; backward is one multiply. Gradients flow to all four
    log-prob inputs, not to ``beta`` or the lengths.

    Raises ValueError on shape/dtype/device mismatches, unknown loss types (listing the valid ones),
    ``beta <= 0``, a non-finite ``gamma`` or ``f_alpha_divergence_coef``, ``label_smoothing`` outside its
    range for the chosen types, and missing lengths.
    """
    for name, x in (("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)):
        _check_tensor(name, x)
    for name, x in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if x is not None:
            _check_tensor(name, x)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    # Shapes, dtypes and devices are the op's own checks (csrc/preference/preference_loss_common.h), whichever
    # backend runs; absent reference log-probs are zeros, as the op takes them.
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
    rr = torch.zeros_like(pc) if ref_rejected_logps is None else ref_rejected_logps
    beta_t = beta if isinstance(beta, torch.Tensor) else None
    tensors = (pc, pr, rc, rr, beta_t, chosen_lengths, rejected_lengths)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    _check_loss_names(types)
    # the op's checks (csrc/preference/preference_loss_common.h) whichever backend runs: the tensors' shapes,
    # dtypes and devices, one weight per loss type
    run_checks(
        "alignops::preference_loss",
        *tensors,
        [int(_CODES.get(t, LossType.AOT)) for t in types],
        weights,
        0.0,
        0.0,
        0.0,
        1.0,
        0,
        0.5,
        False,
    )
    _check_loss_args(
        types,
        weights,
        beta,
        label_smoothing,
        f_divergence_type,
        f_alpha_divergence_coef,
        discopop_tau,
        gamma,
        reduction,
        chosen_lengths,
        rejected_lengths,
        pc,
    )
    impl = _backend.resolve(backend, pc.device, "preference_loss")

    if impl == "torch":
        loss, cr, rj = _ref.preference_loss(
            pc,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            types,
            beta,
            label_smoothing,
            loss_weights=weights,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            gamma=gamma,
            reduction=reduction,
        )
        return PreferenceLossOutput(loss, cr, rj)

    op = torch.ops.alignops.preference_loss if impl == "native" else torch.ops.alignops.preference_loss_triton
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (pc, pr, rc, rr))
    beta_v = 0.0 if beta_t is not None else float(beta)
    fdiv = int(_F_DIVERGENCE_CODES[f_divergence_type])
    common = (label_smoothing, gamma, discopop_tau, fdiv, f_alpha_divergence_coef, compute_grad)

    direct = [(int(_CODES[t]), w) for t, w in zip(types, weights) if t not in _SORTED_TYPES]
    loss, cr, rj, _ = op(
        *tensors,
        [c for c, _ in direct],
        [w for _, w in direct],
        beta_v,
        *common,
    )
    for t, w in zip(types, weights):
        if t in _SORTED_TYPES:
            sorted_loss = op(
                *_sort_pairs(t, pc, pr, rc, rr), None, None, None, [int(LossType.AOT)], [w], beta_v, *common
            )[0]
            loss = loss + sorted_loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return PreferenceLossOutput(loss, cr.detach(), rj.detach())


# ---- per-token log-probs ----------------------------------------------------------------------------


def check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target ``ignore_index`` or in [0, vocab): the C++ check the CPU kernels make
    (``alignops::check_target_values``, one reduction and one host sync), for the other backends."""
    if values_checkable(targets):
        run_op_checks(torch.ops.alignops.check_target_values.default, targets, int(vocab), int(ignore_index))


@keyword_only("ignore_index", "temperature")
def selective_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    r"""Per-row ``log softmax(logits / T)[target]`` without materialising ``log_softmax``.

    ``logits`` [N, V] (fp32, fp64, bf16 or fp16), ``targets`` [N] int64/int32 -> [N] log-probs in fp32
    (fp64 for fp64 logits); rows whose target is ``ignore_index`` give 0 and cost nothing.
    ``logp_n = z_{n,y}/T - logsumexp_v(z_{n,v}/T)``, one pass per row with an online logsumexp
    accumulated in fp32. Backward writes ``dz = g/T (1[v=y] - softmax(z/T))`` once, recomputing the
    softmax from the saved logsumexp (no [N, V] fp32 temporary in either direction).

    Raises ValueError for bad shapes / dtypes / devices, ``temperature <= 0`` and targets outside
    [0, V) (CPU: checked in the kernel; CUDA: one reduction and one host sync before the launch).
    ``check_values=False`` skips the checks that read tensor values on the device (the targets' range), so
    the call neither syncs nor breaks CUDA-graph capture; a target outside [0, V) then gives NaN.
    """
    run_checks("alignops::selective_logprobs", logits, targets, int(ignore_index), float(temperature))
    impl = _backend.resolve(backend, logits.device, "selective_logprobs")
    if check_values and not (impl == "native" and logits.device.type == "cpu"):
        check_targets_in_range(targets, logits.shape[1], ignore_index)
    if impl == "torch":
        return _ref.selective_logprobs(logits, targets, ignore_index, temperature)
    op = torch.ops.alignops.selective_logprobs if impl == "native" else torch.ops.alignops.selective_logprobs_triton
    return op(logits, targets, ignore_index, float(temperature))[0]


class SequenceLogprobs(NamedTuple):
    """Per-sequence ``sum`` and ``mean`` of token log-probs, ``num_tokens`` counted, and ``per_token``."""

    sum: torch.Tensor
    mean: torch.Tensor
    num_tokens: torch.Tensor
    per_token: torch.Tensor


def sequence_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    completion_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    check_values: bool = True,
) -> SequenceLogprobs:
    r"""Per-sequence log-probs ``sum_t log p(y_t)`` over completion tokens, their mean and count.

    Two layouts, with logits already aligned to their targets (shifted by one, as TRL does):

    - padded: ``logits`` [B, T, V], ``targets`` [B, T], optional ``completion_mask`` [B, T] (bool or
      0/1; default ``targets != ignore_index``) -> [B] results;
    - packed (padding-free): ``logits`` [N, V], ``targets`` [N], ``cu_seqlens`` [S+1] (int, starting at
      0, ending at N, non-decreasing) -> [S] results.

    Tokens outside the completion (mask 0 or ``ignore_index``) are skipped before the row kernel runs.
    Segment sums are formed from an fp64 prefix sum (deterministic, no atomics, no host sync); ``mean``
    divides by ``max(num_tokens, 1)``. ``per_token`` is the [B, T] or [N] fp32 log-prob (0 where skipped).
    ``check_values``: as :func:`selective_logprobs` (``cu_seqlens`` values are checked on the CPU only).
    """
    if logits.dim() == 3:
        if cu_seqlens is not None:
            raise AlignopsError("cu_seqlens is for packed [N, V] logits; padded [B, T, V] logits take completion_mask")
        B, T, V = logits.shape
        if targets.shape != (B, T):
            raise AlignopsError(f"targets must have shape [B, T] = {(B, T)}, got {tuple(targets.shape)}")
        keep = targets != ignore_index
        if completion_mask is not None:
            if completion_mask.shape != (B, T):
                raise AlignopsError(
                    f"completion_mask must have shape [B, T] = {(B, T)}, got {tuple(completion_mask.shape)}"
                )
            keep = keep & completion_mask.bool()
        flat_targets = torch.where(keep, targets, torch.full_like(targets, ignore_index)).reshape(B * T)
        per_token = selective_logprobs(
            logits.reshape(B * T, V),
            flat_targets,
            ignore_index=ignore_index,
            temperature=temperature,
            backend=backend,
            check_values=check_values,
        ).reshape(B, T)
        total = per_token.sum(-1)
        count = keep.sum(-1)
    elif logits.dim() == 2:
        if cu_seqlens is None:
            raise AlignopsError("packed [N, V] logits need cu_seqlens [S+1]; padded logits are [B, T, V]")
        if completion_mask is not None:
            raise AlignopsError(
                "completion_mask is for padded [B, T, V] logits; for packed logits set the "
                "targets of non-completion tokens to ignore_index"
            )
        check_cu_seqlens(cu_seqlens, logits.shape[0], logits.device, check_values)
        per_token = selective_logprobs(
            logits,
            targets,
            ignore_index=ignore_index,
            temperature=temperature,
            backend=backend,
            check_values=check_values,
        )
        total = segment_sums(per_token, cu_seqlens)
        count = segment_sums((targets != ignore_index).long(), cu_seqlens)
    else:
        raise AlignopsError(f"logits must be [B, T, V] (padded) or [N, V] (packed), got shape {tuple(logits.shape)}")
    return SequenceLogprobs(total, total / count.clamp(min=1).to(total.dtype), count, per_token)


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over each packed segment ``[cu_seqlens[s], cu_seqlens[s+1])``.

    From prefix sums (fp64 for floating values, int64 for counts): deterministic, no atomics, no host
    sync, differentiable in floating values.
    """
    acc = torch.float64 if values.is_floating_point() else torch.long
    prefix = torch.cat([values.new_zeros(1, dtype=acc), values.to(acc).cumsum(0)])
    bounds = cu_seqlens.long()
    total = prefix[bounds[1:]] - prefix[bounds[:-1]]
    return total.to(values.dtype) if values.is_floating_point() else total


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int, device: torch.device, check_values: bool = True) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise AlignopsError(f"cu_seqlens must be a 1-D tensor [S+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise AlignopsError(f"cu_seqlens must be int64 or int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise AlignopsError(f"cu_seqlens must be on the device of logits ({device}), got {cu_seqlens.device}")
    if check_values and cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise AlignopsError(
                f"cu_seqlens must start at 0, end at N={n} and be non-decreasing, got {cu_seqlens.tolist()[:8]}..."
            )
