"""Triton ops of the preference family: the same arguments and outputs as the native ops of
csrc/registration.cpp, computed by the kernels of kernels/preference.py.

``torch.library.triton_op`` traces these Python bodies, so torch.compile sees the kernels and no separate
fake kernel is needed. Autograd is the native ops' (ops/preference.py). On CPU tensors the kernels run
only in the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_logits_targets, check_triton_device
from .._codes import FDivergence, LossType
from .._errors import AlignopsError
from ..kernels.preference import (
    launch_preference_loss,
    launch_selective_logprobs_backward,
    launch_selective_logprobs_forward,
)
from ._registration import register_triton_twin
from .preference import acc_dtype, register_preference_loss_autograd, register_selective_logprobs_autograd

_MAX_LOSS_TERMS = 16


def _check_per_pair(t: torch.Tensor, pc: torch.Tensor, name: str) -> None:
    if t.dim() != 1 or t.shape != pc.shape:
        raise AlignopsError(
            f"{name} must have the shape of policy_chosen_logps {tuple(pc.shape)}, got {tuple(t.shape)}"
        )
    if t.device != pc.device:
        raise AlignopsError(f"{name} must be on the device of policy_chosen_logps ({pc.device}), got {t.device}")
    if t.is_complex() or t.dtype == torch.bool:
        raise AlignopsError(f"{name} must be a real numeric tensor, got {t.dtype}")


@register_triton_twin("alignops::preference_loss")
def preference_loss_triton(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    loss_types: Sequence[int],
    loss_weights: Sequence[float],
    beta_value: float,
    label_smoothing: float,
    gamma: float,
    discopop_tau: float,
    f_divergence: int,
    f_alpha: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::preference_loss``: (loss, chosen_rewards, rejected_rewards, grad [4, B] or
    [0]), all in the accumulation dtype."""
    pc = policy_chosen_logps
    if pc.dim() != 1:
        raise AlignopsError(f"policy_chosen_logps must be a 1-D tensor of shape [B], got shape {tuple(pc.shape)}")
    if not pc.is_floating_point():
        raise AlignopsError(f"policy_chosen_logps must be a floating-point tensor, got {pc.dtype}")
    check_triton_device(pc, "policy_chosen_logps")
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        _check_per_pair(t, pc, name)
        if t.dtype != pc.dtype:
            raise AlignopsError(f"{name} must have the dtype of policy_chosen_logps ({pc.dtype}), got {t.dtype}")
    if len(loss_types) != len(loss_weights):
        raise AlignopsError(
            f"loss_weights must have one weight per loss type: got {len(loss_weights)} weights for "
            f"{len(loss_types)} loss types"
        )
    if len(loss_types) > _MAX_LOSS_TERMS:
        raise AlignopsError(f"at most {_MAX_LOSS_TERMS} loss types can be combined, got {len(loss_types)}")
    for code in loss_types:
        if not 0 <= code < len(LossType):
            raise AlignopsError(f"loss type code must be in [0, {len(LossType)}), got {code}")
    if not 0 <= f_divergence < len(FDivergence):
        raise AlignopsError(f"f_divergence code must be in [0, {len(FDivergence) - 1}], got {f_divergence}")

    acc = acc_dtype(pc.dtype)
    optional = {}
    for name, t in (("beta", beta), ("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            _check_per_pair(t, pc, name)
            t = t.to(acc).contiguous()
        optional[name] = t
    B = pc.shape[0]
    loss = pc.new_empty(B, dtype=acc)
    chosen_rewards = pc.new_empty(B, dtype=acc)
    rejected_rewards = pc.new_empty(B, dtype=acc)
    grad = pc.new_empty((4, B) if compute_grad else (0,), dtype=acc)
    launch_preference_loss(
        pc.contiguous(),
        policy_rejected_logps.contiguous(),
        ref_chosen_logps.contiguous(),
        ref_rejected_logps.contiguous(),
        optional["beta"],
        optional["chosen_lengths"],
        optional["rejected_lengths"],
        loss,
        chosen_rewards,
        rejected_rewards,
        grad,
        tuple(zip(loss_types, loss_weights)),
        beta_value,
        label_smoothing,
        gamma,
        discopop_tau,
        f_divergence,
        f_alpha,
    )
    return loss, chosen_rewards, rejected_rewards, grad


@register_triton_twin("alignops::selective_logprobs")
def selective_logprobs_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::selective_logprobs``: (logp [N], lse [N]) in the accumulation dtype.
    Targets outside [0, V) (other than ignore_index) are not checked here: they give logp = NaN."""
    check_logits_targets(logits, targets, temperature)
    check_triton_device(logits, "logits")
    acc = acc_dtype(logits.dtype)
    logp = logits.new_empty(logits.shape[0], dtype=acc)
    lse = logits.new_empty(logits.shape[0], dtype=acc)
    launch_selective_logprobs_forward(logits.contiguous(), targets.contiguous(), logp, lse, ignore_index, temperature)
    return logp, lse


@register_triton_twin("alignops::selective_logprobs_backward")
def selective_logprobs_backward_triton(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    """Triton twin of ``alignops::selective_logprobs_backward``: d logits in the logits dtype."""
    check_logits_targets(logits, targets, temperature)
    check_triton_device(logits, "logits")
    acc = acc_dtype(logits.dtype)
    for name, t in (("grad_logp", grad_logp), ("lse", lse)):
        if t.dim() != 1 or t.shape != targets.shape:
            raise AlignopsError(f"{name} must have the shape of targets {tuple(targets.shape)}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise AlignopsError(f"{name} must be on the device of logits ({logits.device}), got {t.device}")
        if t.dtype != acc:
            raise AlignopsError(f"{name} must be {acc} for {logits.dtype} logits, got {t.dtype}")
    x = logits.contiguous()
    grad_logits = torch.empty_like(x)
    launch_selective_logprobs_backward(
        grad_logp.contiguous(), lse.contiguous(), x, targets.contiguous(), grad_logits, ignore_index, temperature
    )
    return grad_logits


register_preference_loss_autograd("alignops::preference_loss_triton")
register_selective_logprobs_autograd(
    "alignops::selective_logprobs_triton", torch.ops.alignops.selective_logprobs_backward_triton
)
