"""Triton op of the ppo family: ``alignops::gae_advantages_triton``, the arguments and outputs of the native op
(csrc/registration.cpp), computed by kernels/ppo.py. On CPU tensors only in the Triton interpreter."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from ..kernels.ppo import launch_gae
from ._registration import register_triton_twin
from .ppo import register_gae_autograd


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
    check_triton_device(rewards, "rewards")
    r, v = rewards.contiguous(), values.contiguous()
    adv = torch.empty_like(r, memory_format=torch.contiguous_format)
    ret = torch.empty_like(r, memory_format=torch.contiguous_format)
    if r.numel():
        last = last_values.contiguous() if last_values is not None else None
        launch_gae(r, v, completion_mask.contiguous().view(torch.uint8), last, adv, ret, float(gamma), float(lam))
    return adv, ret


register_gae_autograd("alignops::gae_advantages_triton")
