"""The ppo family's fake kernel and autograd registration (``alignops::gae_advantages``), and the argument
checks that the public function and the Triton op share (the C++ kernel has the same, csrc/ppo/gae_cpu.cpp)."""

from __future__ import annotations

import torch

from .._errors import AlignopsError
from ._registration import register_fake

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_gae_args(
    rewards: torch.Tensor,
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    last_values: torch.Tensor | None,
    gamma: float,
    lam: float,
) -> None:
    """rewards / values [B, T] of one float dtype, completion_mask [B, T] bool, last_values [B] or None, all on
    one device; gamma and lam in [0, 1] (NaN refused)."""
    for name, t in (("rewards", rewards), ("values", values), ("completion_mask", completion_mask)):
        if not isinstance(t, torch.Tensor):
            raise AlignopsError(f"{name} must be a tensor, got {type(t).__name__}")
    if rewards.dim() != 2:
        raise AlignopsError(f"rewards must be a 2-D tensor of shape [B, T], got shape {list(rewards.shape)}")
    if rewards.dtype not in _FLOATS:
        raise AlignopsError(f"rewards must be float32, float64, float16 or bfloat16, got {rewards.dtype}")
    for name, t in (("values", values), ("completion_mask", completion_mask)):
        if t.shape != rewards.shape:
            raise AlignopsError(f"{name} must have the shape of rewards {list(rewards.shape)}, got {list(t.shape)}")
        if t.device != rewards.device:
            raise AlignopsError(f"{name} must be on the device of rewards ({rewards.device}), got {t.device}")
    if values.dtype != rewards.dtype:
        raise AlignopsError(f"values must have the dtype of rewards ({rewards.dtype}), got {values.dtype}")
    if completion_mask.dtype != torch.bool:
        raise AlignopsError(f"completion_mask must be a bool tensor, got {completion_mask.dtype}")
    if last_values is not None:
        if not isinstance(last_values, torch.Tensor) or tuple(last_values.shape) != (rewards.shape[0],):
            shape = list(last_values.shape) if isinstance(last_values, torch.Tensor) else type(last_values).__name__
            raise AlignopsError(f"last_values must have shape [B] = [{rewards.shape[0]}], got {shape}")
        if last_values.dtype != rewards.dtype:
            raise AlignopsError(
                f"last_values must have the dtype of rewards ({rewards.dtype}), got {last_values.dtype}"
            )
        if last_values.device != rewards.device:
            raise AlignopsError(
                f"last_values must be on the device of rewards ({rewards.device}), got {last_values.device}"
            )
    for name, x in (("gamma", gamma), ("lam", lam)):
        if isinstance(x, torch.Tensor) or not (0.0 <= x <= 1.0):
            raise AlignopsError(f"{name} must be a float in [0, 1], got {x!r}")


@register_fake("alignops::gae_advantages")
def _gae_advantages_fake(rewards, values, completion_mask, last_values, gamma, lam):
    check_gae_args(rewards, values, completion_mask, last_values, gamma, lam)
    return (
        torch.empty_like(rewards, memory_format=torch.contiguous_format),
        torch.empty_like(rewards, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_advantages, grad_returns):
    raise AlignopsError(
        "gae_advantages is not differentiable: PPO uses the advantages and returns as fixed "
        "targets (TRL computes them under torch.no_grad()); pass rewards.detach() and "
        "values.detach(), or differentiate ppo_value_loss with respect to the new values"
    )


def register_gae_autograd(name: str) -> None:
    """Backward through ``name`` raises a message that says why, instead of torch's 'no autograd formula'."""
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)


register_gae_autograd("alignops::gae_advantages")
