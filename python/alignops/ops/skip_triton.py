"""Triton op of the skip family: ``alignops::skip_ffn_triton``, the same arguments and outputs as the native
``alignops::skip_ffn`` of csrc/registration.cpp, computed by the kernels of kernels/skip.py.

``torch.library.triton_op`` traces this Python body, so torch.compile sees the kernels and no separate fake
kernel is needed. Nothing here waits on the device: the number of kept rows stays in the ``count`` output
and every buffer is sized by the capacity N. On CPU tensors the kernels run only in the Triton interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .._checks import check_param, check_triton_device
from .._codes import Activation, Criterion
from .._errors import AlignopsError
from ..kernels.skip import launch_add_score, launch_skip_ffn
from ._registration import native_schema, register_triton_op, register_triton_twin
from .preference import acc_dtype
from .skip import register_add_score_autograd, register_skip_ffn_autograd, register_skip_ffn_inplace_autograd

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_args(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps) -> int:
    """The checks of the native op (csrc/skip/skip_ffn_cpu.cpp), with its messages; returns the FFN width I."""
    if x.dim() != 2:
        raise AlignopsError(f"x must be a 2-D tensor of shape [N, H], got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise AlignopsError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    check_triton_device(x, "x")
    if activation not in {int(a) for a in Activation}:
        raise AlignopsError(f"activation code must be 0 (swiglu), 1 (gelu) or 2 (gelu_tanh), got {activation}")
    if not eps > 0:
        raise AlignopsError(f"eps must be > 0, got {eps}")
    N, H = x.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (N,):
        raise AlignopsError(f"keep must be a bool tensor of shape [N] = [{N}], got {keep.dtype} {list(keep.shape)}")
    if keep.device != x.device:
        raise AlignopsError(f"keep must be on the device of x ({x.device}), got {keep.device}")
    if w_down.dim() != 2:
        raise AlignopsError(f"w_down must be a 2-D tensor of shape [H, I], got shape {list(w_down.shape)}")
    if w_down.shape[0] != H:
        raise AlignopsError(f"w_down must have shape [H, I] with H = {H}, got {list(w_down.shape)}")
    I = w_down.shape[1]
    swiglu = activation == Activation.SWIGLU
    G = 2 * I if swiglu else I
    check_param(w_gate_up, "w_gate_up", (G, H), "[2I, H]" if swiglu else "[I, H]", x)
    check_param(w_down, "w_down", (H, I), "[H, I]", x)
    check_param(norm_weight, "norm_weight", (H,), "[H]", x)
    check_param(b_gate_up, "b_gate_up", (G,), "[2I]" if swiglu else "[I]", x)
    check_param(b_down, "b_down", (H,), "[H]", x)
    return I


@register_triton_twin("alignops::skip_ffn")
def skip_ffn_triton(
    x: torch.Tensor,
    keep: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    norm_weight: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    activation: int,
    eps: float,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::skip_ffn``: (y [N, H], index [N] int64, count [1] int64, rstd, pre_act).

    As the native op: index holds the ``count`` kept rows ascending, then -1; rstd is [N] in the accumulation
    dtype when norm_weight is given and save_for_backward, else [0]; pre_act is [N, G] in x's dtype when
    save_for_backward, else [0, G]; rstd and pre_act are 0 past count. The intermediate buffers are sized by
    the capacity N ([N, H] normalised rows, [N, I] activations), so nothing waits for count."""
    I = _check_args(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps)
    N, H = x.shape
    G = w_gate_up.shape[0]
    x = x.contiguous()
    y = x.clone()
    index = x.new_empty(N, dtype=torch.int64)
    count = x.new_zeros(1, dtype=torch.int64) if N == 0 else x.new_empty(1, dtype=torch.int64)
    rstd = x.new_empty(N if norm_weight is not None and save_for_backward else 0, dtype=acc_dtype(x.dtype))
    pre_act = x.new_empty((N, G) if save_for_backward else (0, G))
    if N > 0:
        xn = x.new_empty((N, H) if norm_weight is not None else (0, H))
        act = x.new_empty((N, I))
        launch_skip_ffn(
            x,
            keep.contiguous().view(torch.uint8),
            w_gate_up.contiguous(),
            w_down.contiguous(),
            None if norm_weight is None else norm_weight.contiguous(),
            None if b_gate_up is None else b_gate_up.contiguous(),
            None if b_down is None else b_down.contiguous(),
            activation,
            eps,
            y,
            index,
            count,
            rstd,
            pre_act,
            xn,
            act,
        )
    return y, index, count, rstd, pre_act


register_skip_ffn_autograd("alignops::skip_ffn_triton")


@register_triton_op("alignops::skip_ffn_triton_", native_schema("alignops::skip_ffn_"), mutates_args=("x",))
def skip_ffn_triton_(
    x: torch.Tensor,
    keep: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    norm_weight: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    activation: int,
    eps: float,
) -> None:
    """Triton twin of ``alignops::skip_ffn_``: kept rows of x become x + FFN(RMSNorm(x)), skipped rows are
    never written (each output tile of the second GEMM reads its residual elements before it stores them)."""
    I = _check_args(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps)
    if not x.is_contiguous():
        raise AlignopsError("x must be contiguous to be updated in place")
    N, H = x.shape
    if N == 0:
        return
    G = w_gate_up.shape[0]
    launch_skip_ffn(
        x,
        keep.contiguous().view(torch.uint8),
        w_gate_up.contiguous(),
        w_down.contiguous(),
        None if norm_weight is None else norm_weight.contiguous(),
        None if b_gate_up is None else b_gate_up.contiguous(),
        None if b_down is None else b_down.contiguous(),
        activation,
        eps,
        x,
        x.new_empty(N, dtype=torch.int64),
        x.new_empty(1, dtype=torch.int64),
        x.new_empty(0, dtype=acc_dtype(x.dtype)),
        x.new_empty((0, G)),
        x.new_empty((N, H) if norm_weight is not None else (0, H)),
        x.new_empty((N, I)),
    )


register_skip_ffn_inplace_autograd("alignops::skip_ffn_triton_")


@register_triton_twin("alignops::skip_add_score")
def skip_add_score_triton(
    residual: torch.Tensor, delta: torch.Tensor, criterion: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``alignops::skip_add_score``: (h = residual + delta, score [N] in the accumulation dtype)."""
    if residual.dim() != 2:
        raise AlignopsError(f"residual must be a 2-D tensor of shape [N, H], got shape {list(residual.shape)}")
    if residual.dtype not in _DTYPES:
        raise AlignopsError(f"residual must be float32, float64, float16 or bfloat16, got {residual.dtype}")
    check_triton_device(residual, "residual")
    if delta.shape != residual.shape:
        raise AlignopsError(f"delta must have the shape of residual {list(residual.shape)}, got {list(delta.shape)}")
    if delta.dtype != residual.dtype or delta.device != residual.device:
        raise AlignopsError(
            f"delta must have the dtype and device of residual ({residual.dtype}, {residual.device}), "
            f"got {delta.dtype}, {delta.device}"
        )
    if criterion not in {int(c) for c in Criterion}:
        raise AlignopsError(f"criterion code must be 0 (cosine) or 1 (norm_ratio), got {criterion}")
    r, d = residual.contiguous(), delta.contiguous()
    h = torch.empty_like(r)
    score = r.new_empty(r.shape[0], dtype=acc_dtype(r.dtype))
    launch_add_score(r, d, criterion, h, score)
    return h, score


register_add_score_autograd("alignops::skip_add_score_triton")
