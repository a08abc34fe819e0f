"""Triton ops of fused_linear_logprobs: ``alignops::fused_linear_logprobs_triton`` and its backward, the same
arguments and outputs as the native ops of csrc/registration.cpp, computed by torch.mm GEMMs over vocabulary
tiles and the epilogue kernels of kernels/fused_linear.py.

``torch.library.triton_op`` traces these Python bodies, so torch.compile sees the kernels and no separate fake
kernel is needed. Autograd is the native op's (ops/preference.py). Nothing here waits on the device: the GEMMs
run on all N rows and the kernels skip the ignored ones (see kernels/fused_linear.py), and targets outside
[0, V) are not checked (they give NaN; the public function checks them). On CPU tensors the kernels run only
in the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from ..kernels.fused_linear import launch_fused_linear_backward, launch_fused_linear_forward
from ._registration import register_triton_twin
from .preference import acc_dtype, register_fused_linear_logprobs_autograd


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
