"""Triton op of the policy family: ``alignops::policy_loss_triton``, the arguments and outputs of the native op
(csrc/registration.cpp), computed by kernels/policy.py; fake kernel (triton_op's own) and autograd shared with
the native op (ops/policy.py). Nothing here waits on the device. On CPU tensors only in the Triton interpreter.
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._codes import ImportanceSamplingLevel
from ..kernels.policy import launch_policy_loss
from ._registration import register_triton_twin
from .policy import NUM_ROW_STATS, ROW_LOSS, register_policy_loss_autograd
from .preference import acc_dtype


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
