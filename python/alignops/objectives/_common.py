"""What the objective families share: argument checks with the messages the tests match on, the
accumulation dtype, the reduction, the all-reduce, the NLL term and the reward-metric properties."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import check_finite, check_floating, check_same_device, values_checkable
from .._errors import AlignopsError

_REDUCTIONS = ("none", "mean", "sum")


def _check_float(name: str, t, ndim: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise AlignopsError(f"{name} must be a {ndim}-D tensor of shape {shape}, got shape {tuple(t.shape)}")
    check_floating(t, name)


def _check_like(name: str, t, like: torch.Tensor, like_name: str, *, floating: bool = True) -> None:
    """``t`` has the shape and device of ``like`` (dtypes may differ: everything is accumulated in fp32/fp64)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise AlignopsError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
    if floating:
        check_floating(t, name)
    check_same_device([(like_name, like), (name, t)])


def _check_lengths(name: str, t, like: torch.Tensor, like_name: str) -> None:
    if t is None:
        return
    _check_like(name, t, like, like_name, floating=False)
    if t.dtype == torch.bool or t.is_complex():
        raise AlignopsError(f"{name} must be an integer or float tensor of token counts, got {t.dtype}")


def _check_labels(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    _check_like(name, t, like, like_name, floating=False)
    if t.dtype != torch.bool and (t.is_floating_point() or t.is_complex()):
        raise AlignopsError(f"{name} must be a bool (or integer 0/1) tensor, got {t.dtype}")
    if t.dtype != torch.bool and t.numel() and _values_checkable(t):
        bad = (t != 0) & (t != 1)
        if bool(bad.any()):
            raise AlignopsError(f"{name} must hold 0 / 1 labels, got {t[bad][0].item()}")
    return t.bool()


def _check_positive(name: str, value) -> None:
    check_finite(value, name)
    if not value > 0:
        raise AlignopsError(f"{name} must be a finite float > 0, got {value!r}")


def _check_nonnegative(name: str, value) -> None:
    check_finite(value, name)
    if not value >= 0:
        raise AlignopsError(f"{name} must be a finite float >= 0, got {value!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _values_checkable(t: torch.Tensor) -> bool:
    """Value checks cost a host sync: done on CPU tensors only (a GPU step is never stalled for them), and
    never while compiling or on meta tensors (:func:`alignops._checks.values_checkable`)."""
    return t.device.type == "cpu" and values_checkable(t)


def _acc_dtype(*tensors) -> torch.dtype:
    return (
        torch.float64
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _all_reduce_sum(t: torch.Tensor, process_group) -> torch.Tensor:
    """SUM over ``process_group`` (the default group when None) once torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    elif process_group is not None:
        raise AlignopsError("process_group was given but torch.distributed is not initialised")
    return t


def _per_token_nll(logps: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Per-pair NLL terms whose batch mean is the token-mean cross-entropy over all the sequences' tokens.

    ``-logps_i / mean_j(n_j)``: the mean over i is ``-sum(logps) / sum(n)``, the ``CrossEntropyLoss`` that
    TRL and Liger add; without lengths the log-probs are taken to be per-token means already.
    """
    if lengths is None:
        return -logps
    return -logps / lengths.to(logps.dtype).clamp(min=1.0).mean()


def _nll_term(nll, logps: torch.Tensor, lengths: torch.Tensor | None, name: str) -> torch.Tensor:
    if nll is None:
        return _per_token_nll(logps, lengths)
    if not isinstance(nll, torch.Tensor) or not nll.is_floating_point():
        raise AlignopsError(f"{name} must be a float tensor: [B] per pair, or a 0-d batch-level NLL")
    if nll.dim() == 0:
        return nll.to(logps.dtype).expand(logps.shape)
    if nll.shape != logps.shape:
        raise AlignopsError(f"{name} must be [B] = {tuple(logps.shape)} or 0-d, got shape {tuple(nll.shape)}")
    check_same_device([("the log-probs", logps), (name, nll)])
    return nll.to(logps.dtype)


def _margins(self) -> torch.Tensor:
    """chosen_rewards - rejected_rewards, per pair."""
    return self.chosen_rewards - self.rejected_rewards


def _accuracy(self) -> torch.Tensor:
    """Reward accuracy, per pair: 1.0 where chosen_rewards > rejected_rewards."""
    return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)


def _unpaired_margins(self) -> torch.Tensor:
    """Mean reward of the desirable samples minus that of the undesirable ones (this batch; 0 when empty)."""
    return self.chosen_rewards_sum / self.num_chosen.clamp(min=1) - self.rejected_rewards_sum / self.num_rejected.clamp(
        min=1
    )
