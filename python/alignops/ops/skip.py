"""Fake kernels and autograd of skip_ffn, skip_ffn_ and skip_add_score (schemas in csrc/skip/skip_ffn_cpu.cpp),
shared by their Triton twins below: ``alignops::skip_ffn_triton``, ``skip_ffn_triton_`` and
``skip_add_score_triton``, the same arguments and outputs as the native ops, computed by the kernels of
kernels/skip.py.

``torch.library.triton_op`` traces the twins' Python bodies, so torch.compile sees the kernels and no separate fake
kernel is needed. Nothing in them waits on the device: the number of kept rows stays in the ``count`` output and
every buffer is sized by the capacity N. On CPU tensors the kernels run only in the Triton interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._codes import Activation
from .._dtypes import acc_dtype
from .._errors import AlignopsError
from ._registration import register_fake, register_triton_twin


@register_fake("alignops::skip_ffn")
def skip_ffn_fake(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps, save_for_backward):
    N = x.shape[0]
    G = w_gate_up.shape[0]
    rstd = x.new_empty((N if save_for_backward and norm_weight is not None else 0,), dtype=acc_dtype(x.dtype))
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((N,), dtype=torch.long),
        x.new_empty((1,), dtype=torch.long),
        rstd,
        x.new_empty((N if save_for_backward else 0, G)),
    )


@register_fake("alignops::skip_ffn_")
def skip_ffn_inplace_fake(x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps):
    return None


@register_fake("alignops::skip_add_score")
def skip_add_score_fake(residual, delta, criterion):
    return (
        torch.empty_like(residual, memory_format=torch.contiguous_format),
        residual.new_empty((residual.shape[0],), dtype=acc_dtype(residual.dtype)),
    )


def _add_score_backward(ctx, grad_h, _grad_score):
    # h = residual + delta; the score only decides which rows run, it carries no gradient.
    return grad_h, grad_h, None


def register_add_score_autograd(op: str) -> None:
    torch.library.register_autograd(op, _add_score_backward)


register_add_score_autograd("alignops::skip_add_score")


def _setup(ctx, inputs, output):
    x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps, save = inputs
    _, index, count, rstd, pre_act = output
    if not save:
        ctx.saved = False
        return
    ctx.saved = True
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.has_bias = (b_gate_up is not None, b_down is not None)
    ctx.save_for_backward(x, w_gate_up, w_down, norm_weight, index, count, rstd, pre_act)


def _act_and_grad(pre: torch.Tensor, activation: int, grad_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation(pre), d loss / d pre) in fp32 for a [K, G] pre-activation, in closed form."""
    p = pre.float()
    if activation == Activation.SWIGLU:
        gate, up = p.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = grad_act * up * sig * (1 + gate * (1 - sig))
        return silu * up, torch.cat([d_gate, grad_act * silu], dim=-1)
    if activation == Activation.GELU:
        cdf = 0.5 * (1 + torch.erf(p * 0.7071067811865476))
        pdf = torch.exp(-0.5 * p * p) * 0.3989422804014327
        return p * cdf, grad_act * (cdf + p * pdf)
    k, c = 0.7978845608028654, 0.044715  # gelu_tanh
    t = torch.tanh(k * (p + c * p**3))
    return 0.5 * p * (1 + t), grad_act * (0.5 * (1 + t) + 0.5 * p * (1 - t * t) * k * (1 + 3 * c * p * p))


# Spelled out: an inferred schema would make activation a SymInt, unlike every other alignops op.
@torch.library.custom_op(
    "alignops::skip_ffn_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad_y, Tensor x, Tensor w_gate_up, Tensor w_down, Tensor? norm_weight, Tensor index, Tensor count, "
        "Tensor rstd, Tensor pre_act, int activation, bool has_b_gate_up, bool has_b_down) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def skip_ffn_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    norm_weight: torch.Tensor | None,
    index: torch.Tensor,
    count: torch.Tensor,
    rstd: torch.Tensor,
    pre_act: torch.Tensor,
    activation: int,
    has_b_gate_up: bool,
    has_b_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of skip_ffn: (x, w_gate_up, w_down, norm_weight, b_gate_up, b_down); absent ones are [0].

    An opaque op (static output shapes) because its GEMMs are sized by the device-side count of kept
    rows, read here with one host sync. Skipped rows pass grad_y through unchanged. fp32 accumulation.
    """
    K = int(count.item())
    idx = index[:K]
    grad_x = grad_y.clone()
    gy = grad_y.index_select(0, idx).float()
    ga = gy @ w_down.float()
    a, gpre = _act_and_grad(pre_act[:K], activation, ga)
    grad_w_down = (gy.t() @ a).to(w_down.dtype)
    rows = x.index_select(0, idx).float()
    if norm_weight is not None:
        xhat = rows * rstd[:K].to(rows.dtype).unsqueeze(-1)
        normed = xhat * norm_weight.float()
    else:
        normed = rows
    grad_w_gate_up = (gpre.t() @ normed).to(w_gate_up.dtype)
    gn = gpre @ w_gate_up.float()
    if norm_weight is not None:
        grad_norm_weight = (gn * xhat).sum(0).to(norm_weight.dtype)
        gxhat = gn * norm_weight.float()
        # RMSNorm: dx = rstd * (g - xhat * mean(g * xhat)) with g the gradient w.r.t. xhat.
        gx_rows = rstd[:K].to(rows.dtype).unsqueeze(-1) * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))
    else:
        grad_norm_weight = x.new_empty(0)
        gx_rows = gn
    grad_x.index_add_(0, idx, gx_rows.to(grad_x.dtype))
    grad_b_gate_up = gpre.sum(0).to(x.dtype) if has_b_gate_up else x.new_empty(0)
    grad_b_down = gy.sum(0).to(x.dtype) if has_b_down else x.new_empty(0)
    return grad_x, grad_w_gate_up, grad_w_down, grad_norm_weight, grad_b_gate_up, grad_b_down


@skip_ffn_backward.register_fake
def _skip_ffn_backward_fake(
    grad_y, x, w_gate_up, w_down, norm_weight, index, count, rstd, pre_act, activation, has_b_gate_up, has_b_down
):
    return (
        torch.empty_like(grad_y),
        torch.empty_like(w_gate_up),
        torch.empty_like(w_down),
        x.new_empty(norm_weight.shape if norm_weight is not None else (0,)),
        x.new_empty((w_gate_up.shape[0],) if has_b_gate_up else (0,)),
        x.new_empty((x.shape[1],) if has_b_down else (0,)),
    )


def _backward(ctx, grad_y, _gi, _gc, _gr, _gp):
    if grad_y is None:
        return (None,) * 10
    if not ctx.saved:
        raise RuntimeError(
            "alignops::skip_ffn was called with save_for_backward=False; call it through "
            "alignops.skip.skip_ffn (which sets it) to differentiate"
        )
    x, w_gate_up, w_down, norm_weight, index, count, rstd, pre_act = ctx.saved_tensors
    gx, g1, g2, gn, gb1, gb2 = torch.ops.alignops.skip_ffn_backward(
        grad_y.contiguous(),
        x,
        w_gate_up,
        w_down,
        norm_weight,
        index,
        count,
        rstd,
        pre_act,
        ctx.activation,
        ctx.has_bias[0],
        ctx.has_bias[1],
    )
    return (
        gx,
        None,
        g1,
        g2,
        gn if norm_weight is not None else None,
        gb1 if ctx.has_bias[0] else None,
        gb2 if ctx.has_bias[1] else None,
        None,
        None,
        None,
    )


def register_skip_ffn_autograd(op: str) -> None:
    """Backward from the saved kept-row index and pre-activations (shared by native and Triton)."""
    torch.library.register_autograd(op, _backward, setup_context=_setup)


register_skip_ffn_autograd("alignops::skip_ffn")

_inplace_lib = torch.library.Library("alignops", "FRAGMENT")


def register_skip_ffn_inplace_autograd(op: str) -> None:
    """An Autograd kernel for the in-place op that refuses inputs requiring grad. The op returns nothing, so
    autograd would not see the write: the gradient through x would silently be the identity."""
    overload = getattr(torch.ops.alignops, op.split("::")[1]).default
    arg_names = [a.name for a in overload._schema.arguments]

    def refuse_grad(keyset, *args):
        if torch.is_grad_enabled():
            for name, a in zip(arg_names, args):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    raise AlignopsError(
                        f"{op} updates x in place and records no gradient, but {name} requires grad: use the "
                        "out-of-place alignops.skip_ffn (torch.ops.alignops.skip_ffn) to differentiate, or call "
                        "it under torch.no_grad()"
                    )
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _inplace_lib.impl(op.split("::")[1], refuse_grad, "Autograd", with_keyset=True)


register_skip_ffn_inplace_autograd("alignops::skip_ffn_")


def _launch(x, ffn, *outputs) -> None:
    """launch_skip_ffn with its operands as the kernel reads them (contiguous, keep as bytes), for both twins:
    ``ffn`` = (keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps), the ops' arguments."""
    from ..kernels.skip import launch_skip_ffn

    keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps = ffn

    def dense(t):
        return None if t is None else t.contiguous()

    launch_skip_ffn(
        x,
        keep.contiguous().view(torch.uint8),
        *map(dense, (w_gate_up, w_down, norm_weight, b_gate_up, b_down)),
        activation,
        eps,
        *outputs,
    )


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
        ffn = (keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps)
        _launch(x, ffn, y, index, count, rstd, pre_act, xn, act)
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
    ffn = (keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps)
    _launch(
        x,
        ffn,
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
    from ..kernels.skip import launch_add_score

    check_triton_device(residual, "residual")
    r, d = residual.contiguous(), delta.contiguous()
    h = torch.empty_like(r)
    score = r.new_empty(r.shape[0], dtype=acc_dtype(r.dtype))
    launch_add_score(r, d, criterion, h, score)
    return h, score


register_add_score_autograd("alignops::skip_add_score_triton")
