"""The GRPO family's policy-gradient loss, as TRL 1.16 ``GRPOTrainer._compute_loss`` computes it, and the
per-token entropy its trainer logs and masks with (``token_entropy``).

One fused op reads the per-token log-probs once (twice at sequence level) and returns the loss, its gradient
w.r.t. the log-probs and the metrics TRL logs, instead of the dozen [B, T] temporaries of TRL's torch
expression and their autograd graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_finite, check_not_nan, check_positive
from ._codes import ImportanceSamplingLevel, PolicyLossType, RowStat, lower_name
from ._errors import AlignopsError
from .ops._registration import run_checks
from .reference import policy as _ref

LOSS_TYPES = tuple(map(lower_name, PolicyLossType))
IMPORTANCE_SAMPLING_LEVELS = tuple(map(lower_name, ImportanceSamplingLevel))
_REDUCTIONS = ("mean", "sum", "none")


class PolicyLossOutput(NamedTuple):
    """The loss and the metrics TRL logs; metrics are detached 0-dim tensors in the accumulation dtype, NaN
    where TRL logs nothing for the configuration."""

    loss: torch.Tensor  # 0-dim ("mean", "sum") or [B] ("none"), fp32 (fp64 for fp64 input)
    clip_ratio_low: torch.Tensor  # TRL clip_ratio/low_mean (clip loss types)
    clip_ratio_high: torch.Tensor  # TRL clip_ratio/high_mean; cispo: cispo_clip_ratio
    clip_ratio_region: torch.Tensor  # TRL clip_ratio/region_mean (clip loss types)
    kl: torch.Tensor  # TRL kl (beta != 0)
    mean_ratio: torch.Tensor  # masked mean of coef_1 (after the delta clamp); not logged by TRL
    phi_mean: torch.Tensor  # TRL vespo/phi_seq_mean (vespo)


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise AlignopsError(f"{name} must be a tensor, got {type(t).__name__}")


def policy_loss(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    old_per_token_logps: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> PolicyLossOutput:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` for one process without gradient accumulation: loss, gradient
    w.r.t. ``per_token_logps`` and the logged metrics.

    With lp = per_token_logps, old = old_per_token_logps (lp detached when None), m the mask, A the advantages:

        coef_1 = exp(lp - old) ("token") or exp(sum_t m_t (lp_t - old_t) / max(M_b, 1)) per row ("sequence");
        clip types (grpo, bnpo, dr_grpo, dapo, luspo): ptl = -min(min(coef_1, delta) A, clip(coef_1, 1 - eps_low,
            1 + eps_high) A) (the delta clamp only when delta is set);
        cispo: ptl = -sg(min(coef_1, eps_high)) A lp;   sapo: ptl = -sigmoid(tau (coef_1 - 1)) 4 / tau A,
            tau = sapo_temperature_pos if A > 0 else sapo_temperature_neg;
        vespo: ptl = -sg(phi) A lp, phi = exp(lam + k log w - lam w), w the clamped sequence weight (TRL's
            get_gamma_weights, with log importance_sampling_ratio summed over the row);
        ptl *= off-policy mask (A >= 0 or the row's mean masked (sampling - lp) <= off_policy_mask_threshold),
            entropy_mask, importance_sampling_ratio (not for vespo);
        ptl += beta (exp(ref - lp) - (ref - lp) - 1) (times coef_1 when use_bias_correction_kl);
        loss = sum_b sum_t m_bt ptl_bt / max(M_b, 1) / B (grpo, sapo); / max(sum M, 1) (bnpo);
            / (B max_completion_length) (dr_grpo); / max(num_items_in_batch, 1) (dapo, cispo, vespo);
            / B without the row normaliser (luspo).

    ``reduction``: "mean" is that loss; "sum" omits the global normaliser (sum_b of the row terms, each divided
    by max(M_b, 1) for grpo / sapo); "none" gives the row terms [B]. Defaults outside TRL's config:
    ``num_items_in_batch=None`` is the batch's mask count, ``max_completion_length=None`` is T, an empty batch
    gives 0. ``num_items_in_batch`` may be a tensor (e.g. all-reduced over processes): it is applied as a tensor
    multiply, with no host sync. ``epsilon_high=None`` is ``epsilon_low``.

    Metrics (TRL's names in PolicyLossOutput's comments) are the masked means TRL logs: over valid tokens when
    TRL's tensor is [B, T], over rows when it is [B, 1] (sequence level with advantages [B] / [B, 1]; phi
    whenever the advantages are [B] / [B, 1]).

    Shapes / dtypes: per_token_logps [B, T] float32 / float64 / bfloat16 / float16 (the only input that gets a
    gradient); advantages and importance_sampling_ratio [B], [B, 1] or [B, T]; old / ref / sampling log-probs
    and entropy_mask [B, T]; completion_mask [B, T] bool or numeric (a weight); all on one device. Arithmetic in
    fp32 (fp64 for fp64 input): the other float inputs are converted to it. SAPO's temperatures and VESPO's
    k / lambda are rounded to fp32 as TRL's ``torch.where`` on Python floats does. NaN / inf in the log-probs
    propagate as in TRL (a non-finite value anywhere in a row, even under the mask, makes the loss NaN).
    Gradients at the measure-zero points follow torch >= 2.14's autograd of TRL's code: coef_1 exactly on a clip
    bound (or on delta) gets no gradient through the clamp, and a tie in the outer min splits it in half (torch
    2.13's clamp passed the full gradient at its bounds).

    Backends: native (C++, CPU rows in parallel), triton (GPU), torch (alignops.reference.policy); auto is
    native on the CPU, Triton on a GPU. Raises AlignopsError for bad shapes, dtypes or devices, unknown
    loss_type / importance_sampling_level / reduction, non-finite hyper-parameters, and beta != 0 without
    ref_per_token_logps.
    """
    tensors = {
        "per_token_logps": per_token_logps,
        "advantages": advantages,
        "completion_mask": completion_mask,
        "old_per_token_logps": old_per_token_logps,
        "ref_per_token_logps": ref_per_token_logps,
        "importance_sampling_ratio": importance_sampling_ratio,
        "sampling_per_token_logps": sampling_per_token_logps,
        "entropy_mask": entropy_mask,
    }
    for name, t in tensors.items():
        if t is not None or name in ("per_token_logps", "advantages", "completion_mask"):
            _check_tensor(t, name)
    # Any float dtype is accepted here (the op takes them in the accumulation dtype); shapes, devices and the
    # rest are the op's own checks, run below on the converted arguments.
    for name in ("advantages", "importance_sampling_ratio"):
        if tensors[name] is not None and not tensors[name].is_floating_point():
            raise AlignopsError(f"{name} must be a float tensor, got {tensors[name].dtype}")
    if loss_type not in LOSS_TYPES:
        raise AlignopsError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise AlignopsError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )
    if reduction not in _REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_finite(epsilon_low, "epsilon_low")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    check_finite(epsilon_high, "epsilon_high")
    if delta is not None:
        check_finite(delta, "delta")
    check_finite(beta, "beta")
    check_positive(sapo_temperature_pos, "sapo_temperature_pos")
    check_positive(sapo_temperature_neg, "sapo_temperature_neg")
    for name, x in (
        ("vespo_k_pos", vespo_k_pos),
        ("vespo_lambda_pos", vespo_lambda_pos),
        ("vespo_k_neg", vespo_k_neg),
        ("vespo_lambda_neg", vespo_lambda_neg),
    ):
        check_finite(x, name)
    if off_policy_mask_threshold is not None:
        check_not_nan(off_policy_mask_threshold, "off_policy_mask_threshold")
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise AlignopsError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            shape = list(num_items_in_batch.shape)
            raise AlignopsError(f"num_items_in_batch must be a number or a one-element tensor, got shape {shape}")
    elif num_items_in_batch is not None:
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise AlignopsError(f"num_items_in_batch must be a number or a tensor, got {num_items_in_batch!r}")
        if math.isnan(num_items_in_batch):
            raise AlignopsError(f"num_items_in_batch must not be NaN, got {num_items_in_batch!r}")

    acc = torch.float64 if per_token_logps.dtype == torch.float64 else torch.float32

    def aux(t):
        return None if t is None else t.detach().to(acc)

    mask = completion_mask if completion_mask.dtype == torch.bool else completion_mask.to(acc)
    compute_grad = torch.is_grad_enabled() and per_token_logps.requires_grad
    args = (
        per_token_logps,
        aux(advantages),
        mask,
        aux(old_per_token_logps),
        aux(ref_per_token_logps),
        aux(importance_sampling_ratio),
        aux(sampling_per_token_logps),
        aux(entropy_mask),
        int(PolicyLossType[loss_type.upper()]),
        int(ImportanceSamplingLevel[importance_sampling_level.upper()]),
        float(epsilon_low),
        float(epsilon_high),
        None if delta is None else float(delta),
        float(beta),
        bool(use_bias_correction_kl),
        None if off_policy_mask_threshold is None else float(off_policy_mask_threshold),
        float(sapo_temperature_pos),
        float(sapo_temperature_neg),
        float(vespo_k_pos),
        float(vespo_lambda_pos),
        float(vespo_k_neg),
        float(vespo_lambda_neg),
        compute_grad,
    )
    run_checks("alignops::policy_loss", *args)  # csrc/policy/policy_loss_cpu.cpp, whichever backend runs
    B, T = per_token_logps.shape
    impl = _backend.resolve(backend, per_token_logps.device, "policy_loss", native_cuda=False)
    if impl == "torch":
        return _torch_backend(per_token_logps, advantages, completion_mask, acc, locals())
    op = torch.ops.alignops.policy_loss if impl == "native" else torch.ops.alignops.policy_loss_triton
    loss_sum, _grad, row_stats = op(*args)

    n_tokens = row_stats[:, RowStat.MASK_COUNT].detach().sum()  # a count: no gradient to route back
    if reduction == "none":
        loss = row_stats[:, RowStat.ROW_LOSS]
    elif reduction == "sum":
        loss = loss_sum
    elif loss_type in ("grpo", "sapo", "luspo"):
        loss = loss_sum / max(B, 1)
    elif loss_type == "bnpo":
        loss = loss_sum / n_tokens.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = loss_sum / max(B * (T if max_completion_length is None else max_completion_length), 1)
    else:  # dapo, cispo, vespo
        if num_items_in_batch is None:
            n = n_tokens
        else:
            n = torch.as_tensor(num_items_in_batch, device=loss_sum.device).to(acc).reshape(())
        loss = loss_sum / n.clamp(min=1.0)

    stats = row_stats.detach()
    per_token = n_tokens.detach().clamp(min=1.0)
    per_row = float(max(B, 1))
    adv_rows = advantages.dim() == 1 or advantages.shape[1] == 1
    seq = importance_sampling_level == "sequence"
    clip_den = per_row if seq and adv_rows else per_token
    nan = stats.new_full((), math.nan)

    def mean(col, den):
        return stats[:, col].sum() / den

    clip = loss_type in _ref.CLIP_LOSS_TYPES
    return PolicyLossOutput(
        loss=loss,
        clip_ratio_low=mean(RowStat.CLIP_LOW, clip_den) if clip else nan,
        clip_ratio_high=mean(RowStat.CLIP_HIGH, clip_den) if clip or loss_type == "cispo" else nan,
        clip_ratio_region=mean(RowStat.CLIP_REGION, clip_den) if clip else nan,
        kl=mean(RowStat.KL, per_token) if beta != 0.0 else nan,
        mean_ratio=mean(RowStat.RATIO, per_row if seq else per_token),
        phi_mean=mean(RowStat.PHI, per_row if adv_rows else per_token) if loss_type == "vespo" else nan,
    )


def _torch_backend(per_token_logps, advantages, completion_mask, acc, args) -> PolicyLossOutput:
    from .reference import policy as _ref  # the torch backend is the reference itself

    keys = (
        "old_per_token_logps",
        "ref_per_token_logps",
        "loss_type",
        "epsilon_low",
        "epsilon_high",
        "delta",
        "importance_sampling_level",
        "beta",
        "use_bias_correction_kl",
        "importance_sampling_ratio",
        "num_items_in_batch",
        "max_completion_length",
        "sapo_temperature_pos",
        "sapo_temperature_neg",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
        "off_policy_mask_threshold",
        "sampling_per_token_logps",
        "entropy_mask",
        "reduction",
    )
    loss, metrics = _ref.policy_loss(per_token_logps, advantages, completion_mask, **{k: args[k] for k in keys})
    return PolicyLossOutput(loss, **{k: v.detach() for k, v in metrics.items()})


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    r"""Per-position entropy of the next-token distribution, ``H = -sum_v p_v log p_v`` with
    ``p = softmax(logits / temperature)``, without materialising ``log_softmax``.

    The entropy TRL's GRPOTrainer logs and masks with (``entropy_from_logits``; ``top_entropy_quantile``), or an
    entropy bonus: ``logits`` [..., V] (fp32, fp64, bf16 or fp16, V > 0) -> [...] in fp32 (fp64 for fp64 logits),
    differentiable. TRL divides the logits by the temperature first; here ``temperature`` does it inside the pass.

    With ``m`` the row's max, ``u = (logits - m) / T``, ``s = sum exp(u)`` and ``w = sum exp(u) u``,
    ``H = log s - w / s``: the forward reads each row once in Triton (an online max and sums) and twice on the CPU
    (ATen's row max, then one pass), and keeps ``(m, log s)``; the backward reads it once more and writes
    ``dH/dlogits = -p (log p + H) / T`` with ``log p = u - log s`` (never ``logits / T - logsumexp``, which cancels
    on confident rows), rounded once to the logits' dtype: no [..., V] temporary in either direction, where
    ``entropy_from_logits`` keeps log-probs and their exponential per chunk, in the logits' dtype (bf16 logits give
    bf16 sums there; here every sum is fp32). A -inf logit (a masked token) adds 0 (the limit of p log p) and gets
    a zero gradient (TRL's product gives NaN); NaN or +inf logits give NaN.

    Backends: native (C++ on the CPU), triton (GPU; the interpreter on CPU tensors), torch
    (alignops.reference.policy.token_entropy); auto is native on the CPU, Triton on a GPU. Raises AlignopsError
    for a non-tensor, a non-float dtype, a 0-D tensor, an empty vocabulary and a temperature outside
    [1e-30, 1e30] (the kernels multiply by 1 / T in fp32).
    """
    _check_tensor(logits, "logits")
    if logits.dim() == 0:
        raise AlignopsError("logits must have shape [..., V], got a 0-D tensor")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(math.prod(lead), vocab)
    run_checks("alignops::token_entropy", rows, float(temperature))
    impl = _backend.resolve(backend, rows.device, "token_entropy", native_cuda=False)
    if impl == "torch":
        return _ref.token_entropy(logits, float(temperature))
    op = torch.ops.alignops.token_entropy if impl == "native" else torch.ops.alignops.token_entropy_triton
    return op(rows, float(temperature))[0].view(lead)
