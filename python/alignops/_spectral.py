"""Matrix square root and inverse square root of symmetric PSD matrices, with a backward that stays finite at
repeated eigenvalues.

Forward: ``eigh`` (LAPACK / cuSOLVER; a C++ kernel would only re-call it). Backward: the Daleckii-Krein
formula ``dS = V [(V^T G V) o D] V^T`` with the divided differences ``D_ij = (f(l_i) - f(l_j)) / (l_i - l_j)``
written in closed form, ``1 / (s_i + s_j)`` for ``f = sqrt`` and ``-1 / (s_i s_j (s_i + s_j))`` for
``f = 1/sqrt`` (``s = sqrt(l)``): no difference of eigenvalues is ever divided by, so equal or nearly equal
eigenvalues give the exact limit ``f'(l)`` instead of the 0/0 (NaN) of autograd through ``eigh``.
The input is symmetrised (``(S + S^T) / 2``) by the callers, so the gradient is that of a symmetric function.
"""

from __future__ import annotations

import torch


class _PsdPower(torch.autograd.Function):
    @staticmethod
    def forward(S: torch.Tensor, inverse: bool, floor: float) -> torch.Tensor:
        lam, V = torch.linalg.eigh(S)
        s = lam.clamp_min(floor).sqrt()
        f = 1.0 / s if inverse else s
        return (V * f.unsqueeze(-2)) @ V.transpose(-1, -2), s, V

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, inverse, _ = inputs
        _, s, V = output
        ctx.inverse = inverse
        ctx.mark_non_differentiable(s, V)
        ctx.save_for_backward(s, V)

    @staticmethod
    def backward(ctx, grad, _gs, _gv):
        s, V = ctx.saved_tensors
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        # 0 + 0 only for a singular matrix under sqrt, whose derivative is infinite: bounded by the floor.
        total = (si + sj).clamp_min(torch.finfo(s.dtype).tiny ** 0.5)
        D = -1.0 / (si * sj * total) if ctx.inverse else 1.0 / total
        inner = V.transpose(-1, -2) @ grad @ V
        return V @ (inner * D) @ V.transpose(-1, -2), None, None


def psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    """S^(1/2) of symmetric PSD S [..., d, d] (negative eigenvalues from rounding are set to 0)."""
    return _PsdPower.apply(0.5 * (S + S.transpose(-1, -2)), False, 0.0)[0]


def psd_inv_sqrt(S: torch.Tensor, floor: float) -> torch.Tensor:
    """S^(-1/2) of symmetric positive definite S [..., d, d], eigenvalues floored at ``floor`` > 0."""
    return _PsdPower.apply(0.5 * (S + S.transpose(-1, -2)), True, floor)[0]
