"""Pure-PyTorch FFN skipping: the dense FFN, then the skipped rows put back (the spec and test oracle).

FFN(x) = W_down act(W_gate_up RMSNorm(x) + b_gate_up) + b_down, with RMSNorm as HF's LlamaRMSNorm:
n = w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) (fp64 inputs stay fp64). SwiGLU splits W_gate_up [2I, H]
into the gate (first I rows) and the up projection: act = silu(gate) * up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._errors import AlignopsError

ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")
CRITERIA = ("cosine", "norm_ratio")


def change_score(x: torch.Tensor, previous: torch.Tensor, criterion: str = "cosine") -> torch.Tensor:
    """Per row: ``1 - cos(x, previous)`` or ``|x - previous| / |previous|`` (fp32; fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, pf = x.to(acc), previous.to(acc)
    if criterion == "cosine":
        return 1 - F.cosine_similarity(xf, pf, dim=-1, eps=1e-12)
    return (xf - pf).norm(dim=-1) / pf.norm(dim=-1).clamp_min(1e-12)


def add_score(residual: torch.Tensor, delta: torch.Tensor, criterion: str = "cosine"):
    """A decoder layer's residual add and the change it made: (h = residual + delta, change_score(h, residual))."""
    h = residual + delta
    return h, change_score(h, residual, criterion)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return x
    xf = x if x.dtype == torch.float64 else x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * n.to(x.dtype)


def activate(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = u.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(u)
    if activation == "gelu_tanh":
        return F.gelu(u, approximate="tanh")
    raise AlignopsError(f"unknown activation {activation!r}")


def ffn(x, w_gate_up, w_down, norm_weight=None, b_gate_up=None, b_down=None, activation="swiglu", eps=1e-6):
    """The dense residual FFN block: x + FFN(RMSNorm(x)) on every row."""
    u = F.linear(rms_norm(x, norm_weight, eps), w_gate_up, b_gate_up)
    return x + F.linear(activate(u, activation), w_down, b_down)


def skip_ffn(
    x, w_gate_up, w_down, norm_weight=None, keep=None, b_gate_up=None, b_down=None, activation="swiglu", eps=1e-6
):
    """Dense FFN on every row, then ``torch.where(keep, dense, x)``: skipped rows are exactly x."""
    dense = ffn(x, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, eps)
    if keep is None:
        return dense
    return torch.where(keep.unsqueeze(-1), dense, x)


def naive_skip_ffn(
    x, w_gate_up, w_down, norm_weight=None, keep=None, b_gate_up=None, b_down=None, activation="swiglu", eps=1e-6
):
    """What people write today: nonzero -> index_select -> linear -> index_add (the benchmark peer)."""
    flat = x.reshape(-1, x.shape[-1])
    idx = keep.reshape(-1).nonzero().squeeze(-1)
    rows = flat.index_select(0, idx)
    delta = F.linear(
        activate(F.linear(rms_norm(rows, norm_weight, eps), w_gate_up, b_gate_up), activation), w_down, b_down
    )
    return flat.index_add(0, idx, delta).reshape(x.shape)
