"""Fake kernel, autograd and Triton twin of alignops::fused_linear_distillation (schema in
csrc/distillation/fused_linear_distillation_cpu.cpp).

The op returns the gradient of its summed loss w.r.t. the student (computed from the same logits as the loss,
so the heads are never recomputed); backward scales it by the incoming gradient of the loss
(ops/_closed_form_grad.py). Per-token values and the entropy are metrics, not differentiated. The teacher gets no
gradient.

``alignops::fused_linear_distillation_triton`` has the native op's schema and outputs, computed by torch.mm GEMMs
over row blocks and the epilogue kernel of kernels/distillation.py, with the native op's autograd. Nothing there
waits on the device. On CPU tensors the kernel runs only in the Triton interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._dtypes import acc_dtype
from ._closed_form_grad import fake_grad_outputs, register_closed_form_autograd
from ._registration import register_fake, register_triton_twin


@register_fake("alignops::fused_linear_distillation")
def _fused_linear_distillation_fake(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    student_bias,
    teacher_bias,
    weights,
    divergence,
    coef,
    temperature,
    student_logit_scale,
    teacher_logit_scale,
    student_softcap,
    teacher_softcap,
    compute_grad,
):
    acc = acc_dtype(student_hidden.dtype)
    n = student_hidden.shape[0]
    new = student_hidden.new_empty
    return (
        new((), dtype=acc),
        new(n, dtype=acc),
        new(n, dtype=acc),
        *fake_grad_outputs(student_hidden, student_weight, student_bias, compute_grad),
    )


def register_fused_linear_distillation_autograd(op: str) -> None:
    """The kernels return the closed-form gradient of the summed loss (shared by native and Triton)."""
    register_closed_form_autograd(op, 15, 3, 4, "alignops.fused_linear_distillation_loss")


register_fused_linear_distillation_autograd("alignops::fused_linear_distillation")


def _mode(divergence: str, coef: float) -> str:
    """The kernel's mode of a checked (divergence, coef), as parse_mode in csrc/distillation/."""
    if divergence == "jsd":
        return "forward_kl" if coef == 0.0 else "reverse_kl" if coef == 1.0 else "jsd"
    return divergence


@register_triton_twin("alignops::fused_linear_distillation")
def fused_linear_distillation_triton(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    weights: torch.Tensor,
    divergence: str,
    coef: float,
    temperature: float,
    student_logit_scale: float,
    teacher_logit_scale: float,
    student_softcap: float,
    teacher_softcap: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::fused_linear_distillation`` (checks: the native op's, register_triton_twin)."""
    from ..kernels.distillation import launch_distillation

    check_triton_device(student_hidden, "student_hidden")
    mode = _mode(divergence, coef)
    N, Hs = student_hidden.shape
    V = student_weight.shape[0]
    acc = acc_dtype(student_hidden.dtype)
    new = student_hidden.new_zeros
    per_token, entropy = new(N, dtype=acc), new(N, dtype=acc)
    bias_grad = compute_grad and student_bias is not None
    grad_hidden = new((N, Hs) if compute_grad else 0, dtype=acc)
    grad_weight = new((V, Hs) if compute_grad else 0, dtype=acc)
    grad_bias = new(V if bias_grad else 0, dtype=acc)
    w = weights.to(acc).contiguous()
    if N > 0 and V > 0:
        launch_distillation(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias,
            teacher_bias,
            w,
            mode,
            coef,
            temperature,
            student_logit_scale,
            teacher_logit_scale,
            student_softcap,
            teacher_softcap,
            per_token,
            entropy,
            grad_hidden,
            grad_weight,
            grad_bias,
        )
    loss = (per_token * w).sum()
    if compute_grad:
        grad_hidden = grad_hidden.to(student_hidden.dtype)
        grad_weight = grad_weight.to(student_weight.dtype)
        if bias_grad:
            grad_bias = grad_bias.to(student_bias.dtype)
    return loss, per_token, entropy, grad_hidden, grad_weight, grad_bias


register_fused_linear_distillation_autograd("alignops::fused_linear_distillation_triton")
