"""Triton op of the skip family: ``alignops::skip_ffn_triton``, the same arguments and outputs as the native
``alignops::skip_ffn`` of csrc/registration.cpp, computed by the kernels of kernels/skip.py.

``torch.library.triton_op`` traces this Python body, so torch.compile sees the kernels and no separate fake
kernel is needed. Nothing here waits on the device: the number of kept rows stays in the ``count`` output
and every buffer is sized by the capacity N. On CPU tensors the kernels run only in the Triton interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from ..kernels.skip import launch_add_score, launch_skip_ffn
from ._registration import register_triton_twin
from .preference import acc_dtype
from .skip import register_add_score_autograd, register_skip_ffn_autograd, register_skip_ffn_inplace_autograd


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
    check_triton_device(x, "x")
    I = w_down.shape[1]
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


@register_triton_twin("alignops::skip_ffn_", mutates_args=("x",), name="alignops::skip_ffn_triton_")
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
    check_triton_device(x, "x")
    I = w_down.shape[1]
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
    check_triton_device(residual, "residual")
    r, d = residual.contiguous(), delta.contiguous()
    h = torch.empty_like(r)
    score = r.new_empty(r.shape[0], dtype=acc_dtype(r.dtype))
    launch_add_score(r, d, criterion, h, score)
    return h, score


register_add_score_autograd("alignops::skip_add_score_triton")
