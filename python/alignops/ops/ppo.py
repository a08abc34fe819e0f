"""The ppo family's fake kernel and autograd registration (``alignops::gae_advantages``). The fake kernel, the
public function and the Triton op run the op's checks of csrc/ppo/gae_cpu.cpp (``alignops::gae_advantages_check``)."""

from __future__ import annotations

import torch

from .._errors import AlignopsError
from ._registration import register_fake, run_checks


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
