"""Wasserstein distances in pure PyTorch (autograd through sort / searchsorted): the spec and the test oracle.

``wasserstein_1d`` follows POT's ``ot.wasserstein_1d`` (quantile functions evaluated on the merged
cumulative weights, integrated piecewise): for normalised weights it returns
``W_p^p = int_0^1 |F_u^-1(q) - F_v^-1(q)|^p dq`` (the p-th power, as POT); for p = 1 this is
``scipy.stats.wasserstein_distance``. Unlike POT the weights are normalised here, as scipy does.
"""

from __future__ import annotations

import torch


def _cdf(values: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted values, normalised cumulative weights with the last one exactly 1), in fp64."""
    x, order = torch.sort(values.double(), dim=-1, stable=True)
    if weights is None:
        w = torch.ones_like(x)
    else:
        w = torch.gather(weights.double(), -1, order)
    c = torch.cumsum(w, -1)
    c = c / c[..., -1:]
    return x, torch.cat([c[..., :-1], torch.ones_like(c[..., -1:])], -1)


def wasserstein_1d(
    u: torch.Tensor,
    v: torch.Tensor,
    u_weights: torch.Tensor | None = None,
    v_weights: torch.Tensor | None = None,
    p: float = 1.0,
) -> torch.Tensor:
    """W_p^p between the 1-D empirical measures u [..., n] and v [..., m]; returns [...] in u's dtype."""
    xu, cu = _cdf(u, u_weights)
    xv, cv = _cdf(v, v_weights)
    qs, _ = torch.sort(torch.cat([cu, cv], -1), dim=-1)
    iu = torch.searchsorted(cu.contiguous(), qs.contiguous()).clamp_max(u.shape[-1] - 1)
    iv = torch.searchsorted(cv.contiguous(), qs.contiguous()).clamp_max(v.shape[-1] - 1)
    delta = torch.diff(qs, dim=-1, prepend=torch.zeros_like(qs[..., :1]))
    diff = (torch.gather(xu, -1, iu) - torch.gather(xv, -1, iv)).abs()
    return (delta * diff.pow(p)).sum(-1).to(u.dtype)


def root(m: torch.Tensor, p: float) -> torch.Tensor:
    """m^(1/p) for m >= 0 with the subgradient 0 at m = 0 (SW_p's minimum, X = Y), where autograd's
    (1/p) m^(1/p - 1) is inf and times the zero gradient of W_p^p gave NaN."""
    pos = m > 0
    return torch.where(pos, torch.where(pos, m, torch.ones_like(m)).pow(1.0 / p), torch.zeros_like(m))


def sliced_wasserstein(
    X: torch.Tensor,
    Y: torch.Tensor,
    projections: torch.Tensor,
    p: float = 2.0,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """POT's sliced_wasserstein_distance: (mean over projections of W_p^p(X theta, Y theta))^(1/p).

    X [..., n, d], Y [..., m, d], projections [d, L] (unit columns); returns [...]."""
    xp = (X @ projections).transpose(-1, -2)  # [..., L, n]
    yp = (Y @ projections).transpose(-1, -2)
    aw = None if a is None else a.unsqueeze(-2).expand_as(xp)
    bw = None if b is None else b.unsqueeze(-2).expand_as(yp)
    return root(wasserstein_1d(xp, yp, aw, bw, p).mean(-1), p)


def _sqrtm_eigh(S: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def gaussian_w2(mu1: torch.Tensor, S1: torch.Tensor, mu2: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    """Squared Bures-Wasserstein distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via eigh."""
    r1 = _sqrtm_eigh(S1)
    cross = _sqrtm_eigh(r1 @ S2 @ r1)
    tr = (
        S1.diagonal(dim1=-2, dim2=-1).sum(-1)
        + S2.diagonal(dim1=-2, dim2=-1).sum(-1)
        - 2 * cross.diagonal(dim1=-2, dim2=-1).sum(-1)
    )
    return ((mu1 - mu2) ** 2).sum(-1) + tr
