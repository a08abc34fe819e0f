"""The ppo family's fake kernel, autograd registration and Triton twin (``alignops::gae_advantages`` and
``alignops::gae_advantages_triton``, the native op's arguments and outputs computed by kernels/ppo.py; on CPU
tensors only in the Triton interpreter). The fake kernel, the public function and the Triton op run the op's
checks of csrc/ppo/gae_cpu.cpp (``alignops::gae_advantages_check``)."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._errors import AlignopsError
from ._registration import register_fake, register_triton_twin, run_checks


@register_fake("alignops::gae_advantages")
def _gae_advantages_fake(rewards, values, completion_mask, last_values, gamma, lam):
    run_checks("alignops::gae_advantages", rewards, values, completion_mask, last_values, gamma, lam)
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


@register_triton_twin("alignops::gae_advantages")
def gae_advantages_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    last_values: torch.Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::gae_advantages``."""
    from ..kernels.ppo import launch_gae

    check_triton_device(rewards, "rewards")
    r, v = rewards.contiguous(), values.contiguous()
    adv = torch.empty_like(r, memory_format=torch.contiguous_format)
    ret = torch.empty_like(r, memory_format=torch.contiguous_format)
    if r.numel():
        last = last_values.contiguous() if last_values is not None else None
        launch_gae(r, v, completion_mask.contiguous().view(torch.uint8), last, adv, ret, float(gamma), float(lam))
    return adv, ret


register_gae_autograd("alignops::gae_advantages_triton")
