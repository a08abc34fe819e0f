"""Matrix square root of symmetric PSD matrices, with a backward that stays finite at repeated eigenvalues.

Forward: ``eigh`` (LAPACK / cuSOLVER; a C++ kernel would only re-call it). Backward: the Daleckii-Krein
formula ``dS = V [(V^T G V) o D] V^T`` with the divided differences ``D_ij = (f(l_i) - f(l_j)) / (l_i - l_j)``
of ``f = sqrt`` written in closed form, ``D_ij = 1 / (s_i + s_j)`` (``s = sqrt(l)``): no eigenvalue gap is
ever divided by, so equal or nearly equal eigenvalues give the exact limit ``f'(l)`` instead of the 0/0
(NaN) of autograd through ``eigh``. The input is symmetrised (``(S + S^T) / 2``) first, so the gradient is
that of a symmetric function of all entries.
"""

from __future__ import annotations

import torch


class _PsdSqrt(torch.autograd.Function):
    @staticmethod
    def forward(S: torch.Tensor) -> torch.Tensor:
        lam, V = torch.linalg.eigh(S)
        s = lam.clamp_min(0).sqrt()
        return (V * s.unsqueeze(-2)) @ V.transpose(-1, -2), s, V

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, s, V = output
        ctx.mark_non_differentiable(s, V)
        ctx.save_for_backward(s, V)

    @staticmethod
    def backward(ctx, grad, _gs, _gv):
        s, V = ctx.saved_tensors
        # 0 + 0 only for a singular matrix, whose derivative is infinite there: large but finite instead.
        total = (s.unsqueeze(-1) + s.unsqueeze(-2)).clamp_min(torch.finfo(s.dtype).tiny ** 0.5)
        inner = V.transpose(-1, -2) @ grad @ V
        return V @ (inner / total) @ V.transpose(-1, -2)


def psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    """S^(1/2) of symmetric PSD S [..., d, d] (negative eigenvalues from rounding are set to 0)."""
    return _PsdSqrt.apply(0.5 * (S + S.transpose(-1, -2)))[0]
