"""Loads the stable-ABI build of preference_loss (csrc/stable/preference_stable.cpp) into the running torch.

``alignops_stable::preference_loss`` / ``selective_logprobs`` / ``selective_logprobs_backward`` have the schemas
of their ``alignops::`` twins (csrc/registration.cpp). This module gives them what the package gives the native
ops in python/alignops/ops/preference.py: fake kernels (torch.compile, opcheck) and autograd (preference_loss
returns the closed-form gradient [4, B], backward is one multiply; selective_logprobs' backward is the
registered backward op). It is standalone on purpose: it must work under a torch that has no alignops build (torch
2.13 in .ci/stable_abi.sh), so it imports nothing from alignops and repeats those ~50 lines.

Used by tests/test_stable_abi.py and bench/bench_stable_abi.py; see docs/stable-abi.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Where .ci/stable_abi.sh writes the .so; ALIGNOPS_STABLE_SO overrides it.
DEFAULT_SO = ROOT / "build" / "stable_abi" / "_alignops_stable.so"
OP = "alignops_stable::preference_loss"

_loaded = False


def so_path() -> Path:
    return Path(os.environ.get("ALIGNOPS_STABLE_SO", DEFAULT_SO))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(
    pc,
    pr,
    rc,
    rr,
    beta,
    chosen_lengths,
    rejected_lengths,
    loss_types,
    loss_weights,
    beta_value,
    label_smoothing,
    gamma,
    discopop_tau,
    f_divergence,
    f_alpha,
    compute_grad,
):
    acc, B = _acc(pc.dtype), pc.shape[0]
    grad = pc.new_empty((4, B) if compute_grad else (0,), dtype=acc)
    return pc.new_empty(B, dtype=acc), pc.new_empty(B, dtype=acc), pc.new_empty(B, dtype=acc), grad


def _setup(ctx, inputs, output):
    # Rewards and the gradient buffer are never differentiated: no [B] zero grads for them.
    ctx.set_materialize_grads(False)
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_loss, _grad_cr, _grad_rj, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 16
    if grad.dim() == 1:  # the empty [0] placeholder: the op ran with compute_grad=False
        raise RuntimeError(f"{OP} was called with compute_grad=False; pass compute_grad=True to differentiate")
    scaled = grad * grad_loss
    grads = [scaled[k].to(dt) if ctx.needs_input_grad[k] else None for k, dt in enumerate(ctx.dtypes)]
    return (*grads, *([None] * 12))


def register_python_layer(ns: str) -> None:
    """The fake kernels and the Python autograd of python/alignops/ops/preference.py, on the three ops of library
    ``ns`` (``alignops_stable``, or in bench/stable_abi_overhead.py the native baseline ``alignops`` built for a
    torch without alignops, so both carry the same Python layer)."""
    torch.library.register_fake(f"{ns}::preference_loss", _fake)
    torch.library.register_autograd(f"{ns}::preference_loss", _backward, setup_context=_setup)
    torch.library.register_fake(f"{ns}::selective_logprobs", _selective_fake)
    torch.library.register_fake(f"{ns}::selective_logprobs_backward", _selective_backward_fake)
    torch.library.register_autograd(
        f"{ns}::selective_logprobs", _selective_backward_for(ns), setup_context=_selective_setup
    )


def _selective_fake(logits, targets, ignore_index, temperature):
    n, acc = logits.shape[0], _acc(logits.dtype)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


def _selective_backward_fake(grad_logp, logits, targets, lse, ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _selective_setup(ctx, inputs, output):
    logits, targets, ignore_index, temperature = inputs
    ctx.set_materialize_grads(False)  # lse is never differentiated
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index, ctx.temperature = ignore_index, temperature


def _selective_backward_for(ns: str):
    def backward(ctx, grad_logp, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        if grad_logp is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        op = getattr(torch.ops, ns).selective_logprobs_backward
        grad = op(grad_logp.contiguous(), logits, targets, lse, ctx.ignore_index, ctx.temperature)
        return grad, None, None, None

    return backward


def load(path: str | os.PathLike | None = None):
    """Loads the .so once (torch.ops.load_library), registers fakes + autograd; returns the preference_loss op
    (``torch.ops.alignops_stable.selective_logprobs`` is registered too)."""
    global _loaded
    if not _loaded:
        p = Path(path) if path is not None else so_path()
        if not p.exists():
            raise FileNotFoundError(f"{p} is not built: run .ci/stable_abi.sh (or its build step)")
        torch.ops.load_library(str(p))
        register_python_layer("alignops_stable")
        _loaded = True
    return torch.ops.alignops_stable.preference_loss
