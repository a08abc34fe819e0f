"""Triton ops of the preference family: the same arguments and outputs as the native ops of
csrc/registration.cpp, computed by the kernels of kernels/preference.py.

Each body runs after the native op's checks (register_triton_twin: ``alignops::<op>_check``, the C++ checks).
``torch.library.triton_op`` traces these Python bodies, so torch.compile sees the kernels and no separate
fake kernel is needed. Autograd is the native ops' (ops/preference.py). On CPU tensors the kernels run
only in the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_triton_device
from ..kernels.preference import (
    launch_preference_loss,
    launch_selective_logprobs_backward,
    launch_selective_logprobs_forward,
)
from ._registration import register_triton_twin
from .preference import acc_dtype, register_preference_loss_autograd, register_selective_logprobs_autograd


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
    check_triton_device(pc, "policy_chosen_logps")
    acc = acc_dtype(pc.dtype)
    optional = {}
    for name, t in (("beta", beta), ("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
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
    check_triton_device(logits, "logits")
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
