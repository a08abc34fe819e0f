"""Fake kernel and autograd of alignops::fused_linear_distillation (schema in csrc/registration.cpp).

The op returns the gradient of its summed loss w.r.t. the student (computed from the same logits as the loss,
so the heads are never recomputed); backward scales it by the incoming gradient of the loss
(ops/_closed_form_grad.py). Per-token values and the entropy are metrics, not differentiated. The teacher gets no
gradient."""

from __future__ import annotations

from ._closed_form_grad import fake_grad_outputs, register_closed_form_autograd
from ._registration import register_fake
from .preference import acc_dtype


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
