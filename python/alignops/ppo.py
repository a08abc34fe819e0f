"""PPO's generalised advantage estimation and clipped value loss, with TRL's PPOTrainer conventions.

TRL's PPOTrainer (trl/trainer/ppo_trainer.py up to v1.12; moved to trl.experimental and removed in v1.13,
so TRL 1.16 has no PPO to import) computes, under torch.no_grad(), with ``lastgaelam`` its running advantage:

    delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},    R_t = A_t + V_t,
    A <- masked_whiten(A, mask) (mean and Bessel-corrected variance over the batch's valid tokens), 0 outside,

and trains the value head with 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)).
Defaults follow TRL's PPOConfig: gamma = 1.0, lam = 0.95, cliprange_value = 0.2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_finite, check_floating, check_same_device
from ._errors import AlignopsError
from .ops._registration import run_checks
from .reference import ppo as _ref


class GAEOutput(NamedTuple):
    advantages: torch.Tensor  # [B, T], dtype of rewards, 0 outside the mask
    returns: torch.Tensor  # [B, T], advantages + values before whitening, 0 outside the mask


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # fp32 (fp64 for fp64 values): scalar, or [B, T] with reduction="none"
    clipfrac: torch.Tensor  # scalar: fraction of valid tokens where the clipped term is the larger one


def _as_mask(completion_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(completion_mask, torch.Tensor):
        raise AlignopsError(f"completion_mask must be a tensor, got {type(completion_mask).__name__}")
    return completion_mask if completion_mask.dtype == torch.bool else completion_mask != 0


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: torch.Tensor | None = None,
    whiten: bool = False,
    backend: str = "auto",
) -> GAEOutput:
    """Generalised advantage estimation, batched: one reverse scan per row.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.

    Follows TRL's PPOTrainer loop (names gamma, lam, whiten; see the module docstring). Mask semantics: a
    position where ``completion_mask`` is False contributes nothing (A = R = 0 there) and ends the episode,
    so the valid position before it takes V_{t+1} = 0 and A_{t+1} = 0 — what TRL's loop gives on its padding
    after the last token, where TRL has zero-filled rewards and values. With padding at the end of each row
    (TRL's layout) the results equal TRL's on the valid tokens. After position T-1 the scan bootstraps from
    ``last_values`` [B] (a truncated rollout), 0 when None as in TRL.

    ``whiten=True``: advantages <- (A - mean) * rsqrt(var + 1e-8) over all valid tokens of the batch, var
    Bessel-corrected, then 0 outside the mask (TRL's ``masked_whiten`` then ``masked_fill``); returns are left
    unwhitened, as TRL. Needs two or more valid tokens (else NaN / inf, as TRL's formula). Done in PyTorch ops
    in fp32 after the kernel: it is a batch-wide reduction, not part of the scan.

    Shapes / dtypes: rewards, values [B, T] float32 / float64 / bfloat16 / float16 (one dtype); completion_mask
    [B, T] bool (other dtypes are read as != 0); last_values [B] of the same dtype. Outputs [B, T] in the
    dtype of rewards; the scan accumulates in fp32 (fp64 for fp64) and rounds each output once. NaN in a
    valid position propagates to that position and the earlier ones of its episode, as in TRL's loop.

    Not differentiable: PPO uses advantages and returns as fixed targets (TRL computes them under no_grad);
    backward through the op raises AlignopsError. Backends: native (C++, CPU rows in parallel), triton (GPU;
    one program per 32 rows), torch (the Python-loop reference). ``auto`` is native on the CPU, Triton on a
    GPU. Raises AlignopsError for shape / dtype / device mismatches (meta included) and gamma or lam outside
    [0, 1] (or NaN).
    """
    mask = _as_mask(completion_mask)
    for name, x in (("rewards", rewards), ("values", values)):
        if not isinstance(x, torch.Tensor):
            raise AlignopsError(f"{name} must be a tensor, got {type(x).__name__}")
    run_checks("alignops::gae_advantages", rewards, values, mask, last_values, float(gamma), float(lam))
    impl = _backend.resolve(backend, rewards.device, "gae_advantages", native_cuda=False)
    if impl == "torch":
        advantages, returns = _ref.gae_advantages(rewards, values, mask, last_values, float(gamma), float(lam))
    else:
        op = torch.ops.alignops.gae_advantages if impl == "native" else torch.ops.alignops.gae_advantages_triton
        advantages, returns = op(rewards, values, mask, last_values, float(gamma), float(lam))
    if whiten:
        advantages = _ref.masked_whiten(advantages, mask)
    return GAEOutput(advantages, returns)


_REDUCTIONS = ("mean", "sum", "none")


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    cliprange_value: float = 0.2,
    reduction: str = "mean",
) -> ValueLossOutput:
    """PPO's clipped value loss, as TRL's PPOTrainer:

    per_token = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2),   c = cliprange_value,
    loss = sum_{mask} per_token / n_valid ("mean", TRL's masked_mean), the sum ("sum"), or per_token [B, T]
    with 0 outside the mask ("none"); clipfrac = fraction of valid tokens where the clipped term is larger.

    Multiply by TRL's ``vf_coef`` (0.1 by default there) when adding it to the policy loss. With no valid token
    the mean and clipfrac are 0 (TRL's masked_mean gives 0/0 = NaN): an empty batch adds nothing to a step.

    values (the new predictions; differentiable), old_values, returns, completion_mask: [B, T], one float dtype
    (mask bool, or read as != 0). Computed in fp32 (fp64 for fp64) PyTorch ops differentiated by autograd: an
    elementwise epilogue of a few flops per token, memory-bound either way, which a fused kernel would not
    make meaningfully faster than torch.compile does. Raises AlignopsError for shape / dtype / device
    mismatches and a negative or non-finite cliprange_value or an unknown reduction.
    """
    mask = _as_mask(completion_mask)
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        if not isinstance(t, torch.Tensor):
            raise AlignopsError(f"{name} must be a tensor, got {type(t).__name__}")
    if values.dim() != 2:
        raise AlignopsError(f"values must be a 2-D tensor of shape [B, T], got shape {list(values.shape)}")
    check_floating(values, "values")
    for name, t in (("old_values", old_values), ("returns", returns), ("completion_mask", mask)):
        if t.shape != values.shape:
            raise AlignopsError(f"{name} must have the shape of values {list(values.shape)}, got {list(t.shape)}")
        check_same_device([("values", values), (name, t)])
        if name != "completion_mask" and t.dtype != values.dtype:
            raise AlignopsError(f"{name} must have the dtype of values ({values.dtype}), got {t.dtype}")
    check_finite(cliprange_value, "cliprange_value")
    if cliprange_value < 0:
        raise AlignopsError(f"cliprange_value must be >= 0, got {cliprange_value!r}")
    if reduction not in _REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    loss, clipfrac = _ref.ppo_value_loss(values, old_values, returns, mask, float(cliprange_value), reduction)
    return ValueLossOutput(loss, clipfrac)
