"""Fake kernels, autograd and Triton twins of the preference ops (schemas in csrc/preference/*_cpu.cpp):
preference_loss, selective_logprobs and fused_linear_logprobs, each with its backward op where it has one.

Each Triton twin has the same arguments and outputs as its native op, computed by the kernels of
kernels/preference.py (fused_linear_logprobs: torch.mm GEMMs over vocabulary tiles and the epilogue kernels of
kernels/fused_linear.py), runs after the native op's checks (register_triton_twin: ``alignops::<op>_check``, the
C++ checks) and shares the native op's autograd. ``torch.library.triton_op`` traces the twins' Python bodies,
so torch.compile sees the kernels and no separate fake kernel is needed. Nothing in fused_linear_logprobs's twins
waits on the device: the GEMMs run on all N rows and the kernels skip the ignored ones (see
kernels/fused_linear.py), and targets outside [0, V) are not checked (they give NaN; the public function checks
them). On CPU tensors the kernels run only in the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_triton_device
from .._dtypes import acc_dtype
from . import preference_autograd
from ._registration import register_fake, register_triton_twin

# ---- preference_loss and selective_logprobs: fakes and autograd in preference_autograd.py (shared with the
# stable-ABI library), registered here on the alignops:: ops -----------------------------------------------------

register_fake("alignops::preference_loss")(preference_autograd.preference_loss_fake)
register_fake("alignops::selective_logprobs")(preference_autograd.selective_logprobs_fake)
register_fake("alignops::selective_logprobs_backward")(preference_autograd.selective_logprobs_backward_fake)


def register_preference_loss_autograd(op: str) -> None:
    """The kernels return the closed-form gradient; backward is one multiply (shared by native and Triton)."""
    torch.library.register_autograd(
        op, preference_autograd.preference_loss_backward, setup_context=preference_autograd.preference_loss_setup
    )


def register_selective_logprobs_autograd(op: str, backward_op) -> None:
    """Backward is the registered op ``backward_op`` (recomputes softmax from the saved lse)."""
    torch.library.register_autograd(
        op,
        preference_autograd.selective_logprobs_backward_for(backward_op),
        setup_context=preference_autograd.selective_logprobs_setup,
    )


register_preference_loss_autograd("alignops::preference_loss")
register_selective_logprobs_autograd("alignops::selective_logprobs", torch.ops.alignops.selective_logprobs_backward)


# ---- fused_linear_logprobs --------------------------------------------------------------------------


@register_fake("alignops::fused_linear_logprobs")
def _fused_linear_logprobs_fake(
    hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap, return_entropy
):
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    return (
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n if return_entropy else 0, dtype=acc),
    )


@register_fake("alignops::fused_linear_logprobs_backward")
def _fused_linear_logprobs_backward_fake(
    grad_logp,
    hidden,
    weight,
    targets,
    bias,
    lse,
    ignore_index,
    temperature,
    logit_scale,
    softcap,
    bias_grad,
    grad_entropy=None,
    entropy=None,
):
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        hidden.new_empty(weight.shape[0] if bias_grad else 0),
    )


def _fused_linear_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, temperature, logit_scale, softcap, _ = inputs
    ctx.set_materialize_grads(False)  # lse is never differentiated; logp and entropy only when used
    ctx.save_for_backward(hidden, weight, targets, bias, output[1], output[2])
    ctx.options = (ignore_index, temperature, logit_scale, softcap)


def register_fused_linear_logprobs_autograd(op: str, backward_op) -> None:
    """Backward is ``backward_op``, which recomputes the logits tile by tile (native and Triton); the entropy's
    gradient (when the entropy was returned and is used) rides in the same pass."""

    def backward(ctx, grad_logp, _grad_lse, grad_entropy):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        if entropy.numel() == 0:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        extra = () if grad_entropy is None else (grad_entropy.contiguous(), entropy)
        gh, gw, gb = backward_op(
            grad_logp.contiguous(), hidden, weight, targets, bias, lse, *ctx.options, bias_grad, *extra
        )
        return (
            gh if ctx.needs_input_grad[0] else None,
            gw if ctx.needs_input_grad[1] else None,
            None,
            gb if bias_grad else None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(op, backward, setup_context=_fused_linear_setup)


register_fused_linear_logprobs_autograd(
    "alignops::fused_linear_logprobs", torch.ops.alignops.fused_linear_logprobs_backward
)


# ---- Triton twins -----------------------------------------------------------------------------------


@register_triton_twin("alignops::preference_loss")
def preference_loss_triton(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    loss_types: Sequence[int],
    loss_weights: Sequence[float],
    beta_value: float,
    label_smoothing: float,
    gamma: float,
    discopop_tau: float,
    f_divergence: int,
    f_alpha: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::preference_loss``: (loss, chosen_rewards, rejected_rewards, grad [4, B] or
    [0]), all in the accumulation dtype."""
    from ..kernels.preference import launch_preference_loss

    pc = policy_chosen_logps
    check_triton_device(pc, "policy_chosen_logps")
    acc = acc_dtype(pc.dtype)
    optional = {}
    for name, t in (("beta", beta), ("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            t = t.to(acc).contiguous()
        optional[name] = t
    loss, chosen_rewards, rejected_rewards, grad = preference_autograd.preference_loss_outputs(pc, compute_grad)
    launch_preference_loss(
        pc.contiguous(),
        policy_rejected_logps.contiguous(),
        ref_chosen_logps.contiguous(),
        ref_rejected_logps.contiguous(),
        optional["beta"],
        optional["chosen_lengths"],
        optional["rejected_lengths"],
        loss,
        chosen_rewards,
        rejected_rewards,
        grad,
        tuple(zip(loss_types, loss_weights)),
        beta_value,
        label_smoothing,
        gamma,
        discopop_tau,
        f_divergence,
        f_alpha,
    )
    return loss, chosen_rewards, rejected_rewards, grad


@register_triton_twin("alignops::selective_logprobs")
def selective_logprobs_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::selective_logprobs``: (logp [N], lse [N]) in the accumulation dtype.
    Targets outside [0, V) (other than ignore_index) are not checked here: they give logp = NaN."""
    from ..kernels.preference import launch_selective_logprobs_forward

    check_triton_device(logits, "logits")
    logp, lse = preference_autograd.selective_logprobs_fake(logits, targets, ignore_index, temperature)
    launch_selective_logprobs_forward(logits.contiguous(), targets.contiguous(), logp, lse, ignore_index, temperature)
    return logp, lse


@register_triton_twin("alignops::selective_logprobs_backward")
def selective_logprobs_backward_triton(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    """Triton twin of ``alignops::selective_logprobs_backward``: d logits in the logits dtype."""
    from ..kernels.preference import launch_selective_logprobs_backward

    check_triton_device(logits, "logits")
    x = logits.contiguous()
    grad_logits = torch.empty_like(x)
    launch_selective_logprobs_backward(
        grad_logp.contiguous(), lse.contiguous(), x, targets.contiguous(), grad_logits, ignore_index, temperature
    )
    return grad_logits


register_preference_loss_autograd("alignops::preference_loss_triton")
register_selective_logprobs_autograd(
    "alignops::selective_logprobs_triton", torch.ops.alignops.selective_logprobs_backward_triton
)


@register_triton_twin("alignops::fused_linear_logprobs")
def fused_linear_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: float,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::fused_linear_logprobs``: (logp [N], lse [N], entropy [N] or [0]) in the
    accumulation dtype (fp32; fp64 for fp64 inputs), 0 on ignored rows. softcap <= 0 means no softcap."""
    from ..kernels.fused_linear import launch_fused_linear_forward

    check_triton_device(hidden, "hidden")
    N = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    logp = hidden.new_empty(N, dtype=acc)
    lse = hidden.new_empty(N, dtype=acc)
    entropy = hidden.new_empty(N if return_entropy else 0, dtype=acc)
    launch_fused_linear_forward(
        hidden,
        weight,
        targets.contiguous(),
        None if bias is None else bias.contiguous(),
        logp,
        lse,
        entropy,
        ignore_index,
        temperature,
        logit_scale,
        softcap,
    )
    return logp, lse, entropy


@register_triton_twin("alignops::fused_linear_logprobs_backward")
def fused_linear_logprobs_backward_triton(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: float,
    bias_grad: bool,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::fused_linear_logprobs_backward``: (grad_hidden [N, H], grad_weight [V, H],
    grad_bias [V] or [0]) in the input dtype, from the forward's lse. grad_hidden is summed over the tiles in
    fp32 and rounded once; each tile of grad_weight is one GEMM, so the result is deterministic. With
    ``grad_entropy`` and the forward's ``entropy`` the entropy's gradient is added in the same pass."""
    from ..kernels.fused_linear import launch_fused_linear_backward

    check_triton_device(hidden, "hidden")
    N = hidden.shape[0]
    V = weight.shape[0]
    if N == 0:
        return (
            torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.zeros_like(weight, memory_format=torch.contiguous_format),
            hidden.new_zeros(V if bias_grad else 0),
        )
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_bias = hidden.new_empty(V if bias_grad else 0)
    launch_fused_linear_backward(
        grad_logp.contiguous(),
        hidden,
        weight,
        targets.contiguous(),
        None if bias is None else bias.contiguous(),
        lse.contiguous(),
        grad_hidden,
        grad_weight,
        grad_bias,
        ignore_index,
        temperature,
        logit_scale,
        softcap,
        None if grad_entropy is None else grad_entropy.contiguous(),
        None if entropy is None else entropy.contiguous(),
    )
    return grad_hidden, grad_weight, grad_bias


register_fused_linear_logprobs_autograd(
    "alignops::fused_linear_logprobs_triton", torch.ops.alignops.fused_linear_logprobs_backward_triton
)
