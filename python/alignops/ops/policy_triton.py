"""Triton op of the policy family: ``alignops::policy_loss_triton``, the arguments and outputs of the native op
(csrc/registration.cpp), computed by kernels/policy.py; fake kernel (triton_op's own) and autograd shared with
the native op (ops/policy.py). Nothing here waits on the device. On CPU tensors only in the Triton interpreter.
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._codes import ImportanceSamplingLevel, PolicyLossType
from .._errors import AlignopsError
from ..kernels.policy import launch_policy_loss
from ._registration import register_triton_twin
from .policy import NUM_ROW_STATS, ROW_LOSS, register_policy_loss_autograd
from .preference import acc_dtype

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(lp, adv, mask, full, row_or_token, loss_type, level, beta, ref) -> None:
    """What the kernel's memory accesses rely on (the C++ op's check_policy_inputs); the public
    alignops.policy_loss checks values and gives the user-facing messages before either op runs."""
    if lp.dim() != 2 or lp.dtype not in _FLOATS:
        raise AlignopsError(f"per_token_logps must be a 2-D float tensor [B, T], got {lp.dtype} {list(lp.shape)}")
    B, T = lp.shape
    acc = acc_dtype(lp.dtype)
    for name, t in row_or_token:
        if t is None:
            continue
        if t.dtype != acc:
            raise AlignopsError(f"{name} must be {acc}, got {t.dtype}")
        if tuple(t.shape) not in ((B,), (B, 1), (B, T)):
            raise AlignopsError(f"{name} must have shape [B], [B, 1] or [B, T] = [{B}, {T}], got {list(t.shape)}")
    for name, t in full:
        if t is None:
            continue
        if t.dtype != acc:
            raise AlignopsError(f"{name} must be {acc}, got {t.dtype}")
        if t.shape != lp.shape:
            raise AlignopsError(f"{name} must have the shape of per_token_logps {list(lp.shape)}, got {list(t.shape)}")
    if mask.shape != lp.shape:
        raise AlignopsError(
            f"completion_mask must have the shape of per_token_logps {list(lp.shape)}, got {list(mask.shape)}"
        )
    if mask.dtype not in (torch.bool, acc):
        raise AlignopsError(f"completion_mask must be bool or {acc}, got {mask.dtype}")
    for name, t in (("advantages", adv), ("completion_mask", mask), *row_or_token, *full):
        if t is not None and t.device != lp.device:
            raise AlignopsError(f"{name} must be on the device of per_token_logps ({lp.device}), got {t.device}")
    if beta != 0.0 and ref is None:
        raise AlignopsError("ref_per_token_logps is required when beta != 0")
    if loss_type not in set(PolicyLossType):
        raise AlignopsError(f"loss_type must be a PolicyLossType code, got {loss_type}")
    if level not in set(ImportanceSamplingLevel):
        raise AlignopsError(f"importance_sampling_level must be 0 or 1, got {level}")


def _row_or_token(t: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """[B, T] stays per token; [B], [B, 1] (and [B, T] with T = 1, as the C++ op reads it) become one value per
    row, [B]."""
    if t is None:
        return None
    if t.dim() == 2 and t.shape[1] == T and T != 1:
        return t.contiguous()
    return t.reshape(B).contiguous()


@register_triton_twin("alignops::policy_loss")
def policy_loss_triton(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    importance_sampling_ratio: torch.Tensor | None,
    sampling_per_token_logps: torch.Tensor | None,
    entropy_mask: torch.Tensor | None,
    loss_type: int,
    importance_sampling_level: int,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    use_bias_correction_kl: bool,
    off_policy_mask_threshold: float | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    vespo_k_pos: float,
    vespo_lambda_pos: float,
    vespo_k_neg: float,
    vespo_lambda_neg: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::policy_loss`` (outputs: the schema's comment in csrc/registration.cpp)."""
    lp = per_token_logps
    full = (
        ("old_per_token_logps", old_per_token_logps),
        ("ref_per_token_logps", ref_per_token_logps),
        ("sampling_per_token_logps", sampling_per_token_logps),
        ("entropy_mask", entropy_mask),
    )
    row_or_token = (("advantages", advantages), ("importance_sampling_ratio", importance_sampling_ratio))
    _check(lp, advantages, completion_mask, full, row_or_token, loss_type, importance_sampling_level, beta,
           ref_per_token_logps)  # fmt: skip
    check_triton_device(lp, "per_token_logps")
    B, T = lp.shape
    acc = acc_dtype(lp.dtype)
    lp = lp.contiguous()
    stats = lp.new_empty((B, NUM_ROW_STATS), dtype=acc)
    grad = torch.empty_like(lp) if compute_grad else lp.new_empty(0)
    if B > 0:
        mask = completion_mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)

        def contiguous(t):
            return None if t is None else t.contiguous()

        launch_policy_loss(
            lp,
            _row_or_token(advantages, B, T),
            mask,
            contiguous(old_per_token_logps),
            contiguous(ref_per_token_logps) if beta != 0.0 else None,
            _row_or_token(importance_sampling_ratio, B, T),
            contiguous(sampling_per_token_logps) if off_policy_mask_threshold is not None else None,
            contiguous(entropy_mask),
            grad if compute_grad else None,
            stats,
            loss_type=loss_type,
            sequence=importance_sampling_level == ImportanceSamplingLevel.SEQUENCE,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            delta=delta,
            beta=beta,
            use_bias_correction_kl=use_bias_correction_kl,
            off_policy_mask_threshold=off_policy_mask_threshold,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
        )
    # The row losses summed in fp64 in row order, as the C++ op sums them: deterministic, and the same number.
    loss_sum = stats[:, ROW_LOSS].to(torch.float64).sum().to(acc)
    return loss_sum, grad, stats


register_policy_loss_autograd("alignops::policy_loss_triton")
