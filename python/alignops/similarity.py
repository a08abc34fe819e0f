"""Similarity scores between two sets of representations: :func:`cca` / :func:`cca_loss` (Deep CCA),
:func:`linear_cka` (plain and debiased CKA) and :func:`ches_score` (CHES of Razin et al.), batched over many
small problems. The loops in :mod:`alignops.reference.represent` are the spec and the test oracle.

Dense linear algebra on small matrices (covariances, Grams): torch composite code, batched over problems.
A C++ kernel would only re-call the same LAPACK / BLAS routines.
"""

from __future__ import annotations

import torch

from ._api import keyword_only
from ._checks import check_finite, check_floating, check_same_device
from ._errors import AlignopsError

__all__ = ["cca", "cca_loss", "linear_cka", "ches_score"]


def _check_views(H1: torch.Tensor, H2: torch.Tensor, n1: str, n2: str, min_rows: int) -> None:
    for name, H in ((n1, H1), (n2, H2)):
        if H.dim() < 2:
            raise AlignopsError(f"{name} must have shape [..., n, d] (n samples of d features), got {list(H.shape)}")
        check_floating(H, name)
    check_same_device([(n1, H1), (n2, H2)])
    if H1.shape[-2] != H2.shape[-2]:
        raise AlignopsError(
            f"{n1} and {n2} must have the same number of samples n, got {H1.shape[-2]} and {H2.shape[-2]}"
        )
    if H1.shape[-2] < min_rows:
        raise AlignopsError(f"{n1} and {n2} need n >= {min_rows} samples, got {H1.shape[-2]}")
    try:
        torch.broadcast_shapes(H1.shape[:-2], H2.shape[:-2])
    except RuntimeError as e:
        raise AlignopsError(
            f"the batch dimensions of {n1} {list(H1.shape)} and {n2} {list(H2.shape)} must broadcast"
        ) from e


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@keyword_only("k", "reg")
def cca(H1: torch.Tensor, H2: torch.Tensor, *, k: int | None = None, reg: float = 1e-3) -> torch.Tensor:
    r"""Canonical correlations of two views, batched over many small problems (Deep CCA, Andrew et al. 2013).

    .. math::
        \Sigma_{11} = \tfrac{1}{n-1} \bar H_1^T \bar H_1 + r I,\quad \Sigma_{22} = \tfrac{1}{n-1} \bar H_2^T \bar H_2
        + r I,\quad \Sigma_{12} = \tfrac{1}{n-1} \bar H_1^T \bar H_2,\quad
        T = \Sigma_{11}^{-1/2} \Sigma_{12} \Sigma_{22}^{-1/2}

    (bars: centred over the samples); the canonical correlations are the singular values of T, largest
    first. The seed paper's code ("all singular values" branch) takes an elementwise sqrt of a matrix
    here; this is the matrix square root, as in the DCCA paper.

    Numerics: covariances accumulate in fp64 whatever the input dtype. The whitening is by Cholesky factors,
    ``T' = L_1^{-1} \Sigma_{12} L_2^{-T}`` with ``\Sigma = L L^T``: ``L^{-1} = Q \Sigma^{-1/2}`` for an
    orthogonal Q, so T' has the singular values of T. Neither the Cholesky nor the triangular solves
    differentiate through eigenvectors, so gradients stay finite and exact at repeated or nearly repeated
    eigenvalues (whitened features, duplicated views), where autograd through ``eigh`` (the DCCA reference
    code, most ports) divides by eigenvalue gaps and gives NaN; the singular values' backward is
    ``U_k V_k^T``, with no gaps either. Torch composite code (batched LAPACK calls).

    Args:
        H1: [..., n, d1], H2: [..., n, d2] (batch dimensions broadcast), float on any device.
        k: number of correlations, 1 <= k <= min(d1, d2) (None: all).
        reg: ridge r >= 0 added to both auto-covariances (r = 0 needs full-rank views: a singular covariance
            raises torch.linalg.LinAlgError from the Cholesky factorisation).

    Returns: [..., k] correlations in fp32 (fp64 for fp64 inputs), differentiable w.r.t. H1 and H2.

    Raises: ValueError for non-matching shapes / devices, n < 2, k out of range or a reg that is not finite
    and >= 0.
    """
    _check_views(H1, H2, "H1", "H2", 2)
    d1, d2 = H1.shape[-1], H2.shape[-1]
    kmax = min(d1, d2)
    if k is None:
        k = kmax
    if not 1 <= k <= kmax:
        raise AlignopsError(f"k must be in [1, min(d1, d2) = {kmax}], got {k}")
    check_finite(reg, "reg")
    if not reg >= 0:
        raise AlignopsError(f"reg must be >= 0, got {reg}")
    out = _out_dtype(H1, H2)
    H1, H2 = H1.double(), H2.double()
    n = H1.shape[-2]
    H1 = H1 - H1.mean(-2, keepdim=True)
    H2 = H2 - H2.mean(-2, keepdim=True)
    eye1 = torch.eye(d1, dtype=H1.dtype, device=H1.device)
    eye2 = torch.eye(d2, dtype=H1.dtype, device=H1.device)
    S11 = H1.transpose(-1, -2) @ H1 / (n - 1) + reg * eye1
    S22 = H2.transpose(-1, -2) @ H2 / (n - 1) + reg * eye2
    S12 = H1.transpose(-1, -2) @ H2 / (n - 1)
    try:
        L1, L2 = torch.linalg.cholesky(S11), torch.linalg.cholesky(S22)
    except torch.linalg.LinAlgError:  # a NaN / inf view fails here first: name it instead of the factorisation
        for name, H in (("H1", H1), ("H2", H2)):
            if not bool(H.isfinite().all()):
                raise AlignopsError(f"{name} must be finite, got NaN or inf entries") from None
        raise
    A = torch.linalg.solve_triangular(L1, S12, upper=False)  # L1^-1 S12
    T = torch.linalg.solve_triangular(L2, A.transpose(-1, -2), upper=False).transpose(-1, -2)  # (.) L2^-T
    return torch.linalg.svdvals(T)[..., :k].to(out)


@keyword_only("k", "reg")
def cca_loss(H1: torch.Tensor, H2: torch.Tensor, *, k: int | None = None, reg: float = 1e-3) -> torch.Tensor:
    """Deep CCA loss: ``-(sum of the top-k canonical correlations)`` [...] (see :func:`cca`, same arguments)."""
    return -cca(H1, H2, k=k, reg=reg).sum(-1)


@keyword_only("debiased")
def linear_cka(X: torch.Tensor, Y: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    r"""Linear centred kernel alignment (Kornblith et al. 2019), batched; ``debiased=True`` uses the unbiased
    HSIC estimator of Song et al. (2012) in the numerator and in both normalisers, as Kornblith's colab does.

    .. math:: \mathrm{CKA}(X, Y) = \frac{\|\bar Y^T \bar X\|_F^2}{\|\bar X^T \bar X\|_F \, \|\bar Y^T \bar Y\|_F}

    Debiased: each ``<K, L>`` term (``K = \bar X \bar X^T``, ``L = \bar Y \bar Y^T``) becomes
    ``<K, L> - n/(n-2) r_K . r_L + |X|^2 |Y|^2 / ((n-1)(n-2))`` with ``r`` the squared row norms, and the
    normaliser is the square root of the same debiased term of (X, X) and (Y, Y) (not the biased norm).
    Computed in fp64 from the d x d cross-covariances or the n x n Grams, whichever is smaller.

    Args: X [..., n, d1], Y [..., n, d2] (batch dimensions broadcast); n >= 2 (n >= 4 debiased).
    Returns: [...] in fp32 (fp64 for fp64 inputs), differentiable. NaN where a representation is constant
        over the samples (0 / 0), or where a debiased normaliser is negative (possible for tiny n).
    Raises: ValueError for non-matching shapes / devices or too few samples.
    """
    _check_views(X, Y, "X", "Y", 4 if debiased else 2)
    out = _out_dtype(X, Y)
    X, Y = X.double(), Y.double()
    n, d1, d2 = X.shape[-2], X.shape[-1], Y.shape[-1]
    X = X - X.mean(-2, keepdim=True)
    Y = Y - Y.mean(-2, keepdim=True)
    if n * n <= d1 * d2:
        K, L = X @ X.transpose(-1, -2), Y @ Y.transpose(-1, -2)
        xy, xx, yy = (K * L).sum((-1, -2)), K.square().sum((-1, -2)), L.square().sum((-1, -2))
    else:
        xy = (X.transpose(-1, -2) @ Y).square().sum((-1, -2))
        xx = (X.transpose(-1, -2) @ X).square().sum((-1, -2))
        yy = (Y.transpose(-1, -2) @ Y).square().sum((-1, -2))
    if debiased:
        rx, ry = X.square().sum(-1), Y.square().sum(-1)
        sx, sy = rx.sum(-1), ry.sum(-1)

        def unbiased(kl, ra, rb, sa, sb):
            return kl - n / (n - 2.0) * (ra * rb).sum(-1) + sa * sb / ((n - 1.0) * (n - 2.0))

        xy, xx, yy = unbiased(xy, rx, ry, sx, sy), unbiased(xx, rx, rx, sx, sx), unbiased(yy, ry, ry, sy, sy)
    return (xy / (xx * yy).sqrt()).to(out)


def ches_score(
    h_chosen: torch.Tensor,
    h_rejected: torch.Tensor,
    chosen_mask: torch.Tensor | None = None,
    rejected_mask: torch.Tensor | None = None,
    *,
    length_normalized: bool = False,
) -> torch.Tensor:
    r"""Centred hidden embedding similarity (Razin et al., "Unintentional Unalignment: Likelihood Displacement
    in DPO"), batched over preference pairs.

    .. math:: \mathrm{CHES}(x, y^+, y^-) = \langle h^+, h^- \rangle - \|h^+\|^2,\qquad
        h^\pm = \sum_{k \in y^\pm} h_k

    with ``h_k`` the last-layer hidden state of response token k. A high CHES flags pairs whose rejected
    response is likely to displace the chosen one's likelihood under DPO. ``length_normalized=True``:
    ``<h+/|y+|, h-/|y-|> - |h+|^2 / |y+|^2``.

    Args:
        h_chosen: [B, T+, H], h_rejected: [B, T-, H] last-layer hidden states.
        chosen_mask, rejected_mask: [B, T+] / [B, T-] bool, True on response tokens (None: every token).
    Returns: [B] in fp32 (fp64 for fp64 input), sums accumulated in that dtype; differentiable. An empty
        response gives NaN when length_normalized.
    Raises: ValueError for shapes, dtypes or devices that do not match.
    """
    for name, h in (("h_chosen", h_chosen), ("h_rejected", h_rejected)):
        if h.dim() != 3 or not h.is_floating_point():
            raise AlignopsError(f"{name} must be a float tensor of shape [B, T, H], got {h.dtype} {list(h.shape)}")
    if h_rejected.shape[0] != h_chosen.shape[0] or h_rejected.shape[2] != h_chosen.shape[2]:
        raise AlignopsError(
            f"h_rejected must have the batch size and hidden size of h_chosen {list(h_chosen.shape)}, "
            f"got {list(h_rejected.shape)}"
        )
    check_same_device([("h_chosen", h_chosen), ("h_rejected", h_rejected)])
    acc = _out_dtype(h_chosen, h_rejected)

    def pooled(h, mask, name):
        if mask is None:
            return h.to(acc).sum(1), torch.full(h.shape[:1], h.shape[1], dtype=acc, device=h.device)
        if mask.dtype != torch.bool or mask.shape != h.shape[:2]:
            raise AlignopsError(
                f"{name} must be a bool tensor of shape {list(h.shape[:2])}, got {mask.dtype} {list(mask.shape)}"
            )
        check_same_device([("the hidden states", h), (name, mask)])
        m = mask.to(acc)
        return torch.einsum("bt,bth->bh", m, h.to(acc)), m.sum(1)

    hp, lp = pooled(h_chosen, chosen_mask, "chosen_mask")
    hm, lm = pooled(h_rejected, rejected_mask, "rejected_mask")
    if length_normalized:
        hp, hm = hp / lp.unsqueeze(-1), hm / lm.unsqueeze(-1)
    return (hp * hm).sum(-1) - hp.square().sum(-1)
