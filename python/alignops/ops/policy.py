"""Fake kernel, autograd and Triton twin of alignops::policy_loss (schema and output columns in
csrc/policy/policy_loss_cpu.cpp).

The op returns the closed-form gradient of its summed loss w.r.t. per_token_logps. Every row's loss depends on
that row's log-probs only (the off-policy mask, VESPO's gamma weights and CISPO's clamped ratio are detached, as
in TRL), so the same [B, T] gradient also differentiates each row's loss (row_stats[:, 7]): backward is
``grad * (grad_loss_sum + grad_row_stats[:, 7:8])``. The other row_stats columns are metrics, not
differentiated. ``register_policy_loss_autograd`` is shared with the Triton twin (alignops::policy_loss_triton),
whose arguments and outputs are the native op's, computed by kernels/policy.py (its fake kernel is triton_op's
own). Nothing there waits on the device. On CPU tensors only in the Triton interpreter.

alignops::token_entropy (csrc/policy/token_entropy_cpu.cpp): its fakes, its autograd (the backward is the op
alignops::token_entropy_backward, from the saved entropy and row stats; not differentiable again) and the Triton
twins of both.
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._codes import ImportanceSamplingLevel, RowStat
from .._dtypes import acc_dtype
from ._registration import register_fake, register_triton_twin, run_checks

_NUM_ARGS = 23


@register_fake("alignops::policy_loss")
def _policy_loss_fake(per_token_logps, advantages, completion_mask, *args):
    compute_grad = args[-1]
    acc = acc_dtype(per_token_logps.dtype)
    B = per_token_logps.shape[0]
    new = per_token_logps.new_empty
    grad = torch.empty_like(per_token_logps, memory_format=torch.contiguous_format) if compute_grad else new(0)
    return new((), dtype=acc), grad, new((B, RowStat.NUM_ROW_STATS), dtype=acc)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss_sum, _grad_grad, grad_row_stats):
    if grad_loss_sum is None and grad_row_stats is None:
        return (None,) * _NUM_ARGS
    if not ctx.compute_grad:
        raise RuntimeError(
            "alignops::policy_loss was called with compute_grad=False; call it through alignops.policy_loss "
            "(which sets it) to differentiate"
        )
    (grad,) = ctx.saved_tensors
    scale = grad.new_zeros((grad.shape[0], 1), dtype=acc_dtype(grad.dtype))
    if grad_loss_sum is not None:
        scale = scale + grad_loss_sum
    if grad_row_stats is not None:
        scale = scale + grad_row_stats[:, RowStat.ROW_LOSS : RowStat.ROW_LOSS + 1]
    grad_logps = (grad * scale).to(grad.dtype) if ctx.needs_input_grad[0] else None
    return (grad_logps, *(None,) * (_NUM_ARGS - 1))


def register_policy_loss_autograd(op: str) -> None:
    """The kernels return the closed-form gradient of the summed loss (shared by native and Triton)."""
    torch.library.register_autograd(op, _backward, setup_context=_setup)


register_policy_loss_autograd("alignops::policy_loss")


def _row_or_token(t: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """[B, T] stays per token; [B], [B, 1] (and [B, T] with T = 1, as the C++ op reads it) become one value per
    row, [B]."""
    if t is None:
        return None
    if t.dim() == 2 and t.shape[1] == T and T != 1:
        return t.contiguous()
    return t.reshape(B).contiguous()


@register_triton_twin("alignops::policy_loss")
def policy_loss_triton(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    importance_sampling_ratio: torch.Tensor | None,
    sampling_per_token_logps: torch.Tensor | None,
    entropy_mask: torch.Tensor | None,
    loss_type: int,
    importance_sampling_level: int,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    use_bias_correction_kl: bool,
    off_policy_mask_threshold: float | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    vespo_k_pos: float,
    vespo_lambda_pos: float,
    vespo_k_neg: float,
    vespo_lambda_neg: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::policy_loss`` (outputs: the schema's comment in csrc/policy/policy_loss_cpu.cpp)."""
    from ..kernels.policy import launch_policy_loss

    lp = per_token_logps
    check_triton_device(lp, "per_token_logps")
    B, T = lp.shape
    acc = acc_dtype(lp.dtype)
    lp = lp.contiguous()
    stats = lp.new_empty((B, RowStat.NUM_ROW_STATS), dtype=acc)
    grad = torch.empty_like(lp) if compute_grad else lp.new_empty(0)
    if B > 0:
        mask = completion_mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)

        def contiguous(t):
            return None if t is None else t.contiguous()

        launch_policy_loss(
            lp,
            _row_or_token(advantages, B, T),
            mask,
            contiguous(old_per_token_logps),
            contiguous(ref_per_token_logps) if beta != 0.0 else None,
            _row_or_token(importance_sampling_ratio, B, T),
            contiguous(sampling_per_token_logps) if off_policy_mask_threshold is not None else None,
            contiguous(entropy_mask),
            grad if compute_grad else None,
            stats,
            loss_type=loss_type,
            sequence=importance_sampling_level == ImportanceSamplingLevel.SEQUENCE,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            delta=delta,
            beta=beta,
            use_bias_correction_kl=use_bias_correction_kl,
            off_policy_mask_threshold=off_policy_mask_threshold,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
        )
    # The row losses summed in fp64 in row order, as the C++ op sums them: deterministic, and the same number.
    loss_sum = stats[:, RowStat.ROW_LOSS].to(torch.float64).sum().to(acc)
    return loss_sum, grad, stats


register_policy_loss_autograd("alignops::policy_loss_triton")


# ---- token_entropy ----------------------------------------------------------------------------------------------


@register_fake("alignops::token_entropy")
def _token_entropy_fake(logits, temperature):
    run_checks("alignops::token_entropy", logits, temperature)
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty((logits.shape[0], 2), dtype=acc)


@register_fake("alignops::token_entropy_backward")
def _token_entropy_backward_fake(grad, logits, entropy, stats, temperature):
    run_checks("alignops::token_entropy_backward", grad, logits, entropy, stats, temperature)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "token_entropy: double backward is not supported; the gradient is computed in closed form by a kernel, "
        "without a graph to differentiate again"
    )


def register_token_entropy_autograd(op: str, backward_op: str) -> None:
    """Backward is the op ``backward_op`` (the logits' gradient from the saved entropy and row stats, one pass);
    the backward op itself refuses to be differentiated (create_graph=True would otherwise lose the Hessian term
    without a word)."""
    backward = getattr(torch.ops.alignops, backward_op.split("::")[1])

    def setup(ctx, inputs, output):
        logits, temperature = inputs
        ctx.set_materialize_grads(False)  # stats are never differentiated
        ctx.save_for_backward(logits, *output)
        ctx.temperature = temperature

    def grad(ctx, grad_entropy, _grad_stats):
        logits, entropy, stats = ctx.saved_tensors
        if grad_entropy is None:
            return None, None
        return backward(grad_entropy.contiguous(), logits, entropy, stats, ctx.temperature), None

    torch.library.register_autograd(op, grad, setup_context=setup)
    torch.library.register_autograd(backward_op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


register_token_entropy_autograd("alignops::token_entropy", "alignops::token_entropy_backward")


@register_triton_twin("alignops::token_entropy")
def token_entropy_triton(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::token_entropy`` (kernels/policy.py)."""
    from ..kernels.policy import launch_token_entropy_forward

    check_triton_device(logits, "logits")
    x = logits.contiguous()
    acc = acc_dtype(x.dtype)
    entropy, stats = x.new_empty(x.shape[0], dtype=acc), x.new_empty((x.shape[0], 2), dtype=acc)
    launch_token_entropy_forward(x, entropy, stats, temperature)
    return entropy, stats


@register_triton_twin("alignops::token_entropy_backward")
def token_entropy_backward_triton(
    grad: torch.Tensor, logits: torch.Tensor, entropy: torch.Tensor, stats: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Triton twin of ``alignops::token_entropy_backward`` (kernels/policy.py)."""
    from ..kernels.policy import launch_token_entropy_backward

    check_triton_device(logits, "logits")
    x = logits.contiguous()
    grad_logits = torch.empty_like(x)
    launch_token_entropy_backward(
        grad.contiguous(), entropy.contiguous(), stats.contiguous(), x, grad_logits, temperature
    )
    return grad_logits


register_token_entropy_autograd("alignops::token_entropy_triton", "alignops::token_entropy_backward_triton")
