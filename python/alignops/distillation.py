"""Teacher-student distillation straight from both models' LM-head inputs: the [N, V] logits of neither model
are materialised."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_finite, check_positive, check_same_device
from ._distributed import gathered_weight, refuse_dtensor
from ._errors import AlignopsError
from .reference import distillation as _ref

DIVERGENCES = _ref.DIVERGENCES
REDUCTIONS = ("mean", "sum")


class DistillationOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. the student), ``per_token`` divergence and student ``entropy`` (in the
    layout of ``completion_mask``, 0 on masked tokens; metrics, not differentiated) and ``num_tokens``."""

    loss: torch.Tensor
    per_token: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor


def _check_head(hidden, weight, bias, h: str, w: str, b: str) -> None:
    if hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise AlignopsError(
            f"{h} must be a floating [N, H] or [B, T, H] tensor, got {hidden.dtype} {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise AlignopsError(
            f"{w} must have shape [V, H] with H = {hidden.shape[-1]} ({h}'s last dimension), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise AlignopsError(f"{w} must have the dtype of {h} ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.dtype != hidden.dtype):
        raise AlignopsError(
            f"{b} must be a {hidden.dtype} tensor of shape [V] = [{weight.shape[0]}], got "
            f"{bias.dtype} {tuple(bias.shape)}"
        )


def _check_softcap(softcap, name: str) -> None:
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise AlignopsError(f"{name} must be > 0 and finite (or None for no softcap), got {softcap}")


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "jsd",
    skew: float = 0.1,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> DistillationOutput:
    r"""Teacher-student divergence from LM-head inputs, the loss of TRL 1.16's ``DistillationTrainer``.

    Shapes: ``student_hidden`` [N, Hs] or [B, T, Hs], ``student_weight`` [V, Hs], ``teacher_hidden`` [N, Ht] or
    [B, T, Ht], ``teacher_weight`` [V, Ht] (the widths may differ, the vocabulary may not), ``completion_mask``
    [N] or [B, T] (nonzero = the token counts), optional biases [V]. Each model has one floating dtype (fp32,
    fp64, bf16, fp16); arithmetic in fp32 (fp64 for fp64 students).

    Logits ``z = transform(h W^T + b) / temperature``, ``transform(u) = softcap tanh(logit_scale u / softcap)``
    (``logit_scale u`` without softcap); ``p_s``, ``p_t`` their softmaxes. Per token ``d``:

    - ``divergence="jsd"``: ``beta = 0`` forward KL(p_t || p_s), ``beta = 1`` reverse KL(p_s || p_t), otherwise
      ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = (1 - beta) p_s + beta p_t`` (TRL's convention);
    - ``"tv"``: ``0.5 sum_v |p_s - p_t|``;
    - ``"skew_kl"``: ``KL(p_t || skew p_t + (1 - skew) p_s)``; ``"skew_reverse_kl"``:
      ``KL(p_s || skew p_s + (1 - skew) p_t)`` (DistiLLM's skewed KLs).

    ``loss = sum_masked d / num_tokens`` (at least 1), or ``/ num_items_in_batch`` when given (TRL's
    gradient-accumulation-correct reduction), or the plain sum for ``reduction="sum"``. Gradients flow to the
    student's hidden states, weight and bias only.

    The CPU kernel drops masked rows before any GEMM and walks the kept rows in blocks of R rows: one GEMM per
    model and block, so the extra memory is a few [R, V] fp32 blocks (~16 MB each) plus the fp32 gradient of
    the student's weight, computed with the loss and scaled in backward. ``backend``: "auto" / "native" (C++,
    CPU), "torch" (the reference, which materialises both [N, V] logits).

    Raises AlignopsError for shape / dtype / device mismatches (the meta device included), a vocabulary
    mismatch, beta or skew outside [0, 1], temperature <= 0, NaN / inf hyper-parameters.

    DTensor weights and biases (FSDP2, HSDP, tensor parallel) are all-gathered once per call and the student's
    gradient reduce-scattered back, averaged over the ranks (``alignops._distributed.gathered_weight``); the hidden
    states and the mask are this rank's plain tensors.
    """
    refuse_dtensor(
        "fused_linear_distillation_loss",
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        completion_mask=completion_mask,
    )
    student_weight = gathered_weight(student_weight, "student_weight")
    student_bias = gathered_weight(student_bias, "student_bias")
    with torch.no_grad():  # the teacher is not trained: its gather needs no backward
        teacher_weight = gathered_weight(teacher_weight, "teacher_weight")
        teacher_bias = gathered_weight(teacher_bias, "teacher_bias")
    _check_head(student_hidden, student_weight, student_bias, "student_hidden", "student_weight", "student_bias")
    _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher_hidden", "teacher_weight", "teacher_bias")
    check_same_device(
        [
            ("student_hidden", student_hidden),
            ("student_weight", student_weight),
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
            ("completion_mask", completion_mask),
            ("student_bias", student_bias),
            ("teacher_bias", teacher_bias),
            ("num_items_in_batch", num_items_in_batch),
        ]
    )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise AlignopsError(
            f"teacher_weight must have the vocabulary of student_weight (V = "
            f"{student_weight.shape[0]}), got {tuple(teacher_weight.shape)}"
        )
    layout = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != layout or completion_mask.shape != layout:
        raise AlignopsError(
            f"teacher_hidden and completion_mask must have the token layout of student_hidden "
            f"{tuple(layout)}, got {tuple(teacher_hidden.shape[:-1])} and "
            f"{tuple(completion_mask.shape)}"
        )
    if divergence not in DIVERGENCES:
        raise AlignopsError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for value, name in ((beta, "beta"), (skew, "skew")):
        check_finite(value, name)
        if not 0.0 <= value <= 1.0:
            raise AlignopsError(f"{name} must lie in [0, 1], got {value!r}")
    check_positive(temperature, "temperature")
    check_finite(student_logit_scale, "student_logit_scale")
    check_finite(teacher_logit_scale, "teacher_logit_scale")
    _check_softcap(student_softcap, "student_softcap")
    _check_softcap(teacher_softcap, "teacher_softcap")
    impl = _backend.resolve(backend, student_hidden.device, "fused_linear_distillation_loss", native_cuda=False)
    if impl == "torch":
        loss, per_token, entropy, count = _ref.fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            completion_mask,
            beta=beta,
            skew=skew,
            temperature=temperature,
            divergence=divergence,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
            num_items_in_batch=num_items_in_batch,
            reduction=reduction,
        )
        return DistillationOutput(loss, per_token.detach().view(layout), entropy.view(layout), count)
    op = (
        torch.ops.alignops.fused_linear_distillation
        if impl == "native"
        else torch.ops.alignops.fused_linear_distillation_triton
    )
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    weights = (completion_mask.reshape(-1) != 0).to(acc)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    total, per_token, entropy, *_ = op(
        hs,
        student_weight,
        ht.detach(),
        teacher_weight.detach(),
        student_bias,
        None if teacher_bias is None else teacher_bias.detach(),
        weights,
        divergence,
        float(beta if divergence == "jsd" else skew),
        float(temperature),
        float(student_logit_scale),
        float(teacher_logit_scale),
        float(student_softcap or 0.0),
        float(teacher_softcap or 0.0),
        compute_grad,
    )
    count = weights.sum().to(torch.int64)
    if reduction == "sum":
        loss = total
    elif num_items_in_batch is not None:
        loss = total / num_items_in_batch
    else:
        loss = total / count.clamp(min=1)
    return DistillationOutput(loss, per_token.detach().view(layout), entropy.detach().view(layout), count)


__all__ = ["DistillationOutput", "fused_linear_distillation_loss"]
