"""Wasserstein distances as differentiable, batched alignment losses (to be re-exported by ``alignops.ot``).

The seed paper's released Wasserstein term ("Can Brain Signals Reveal Inner Alignment with Human
Languages?") is computed on detached numpy copies and so trains nothing; these are torch ops with gradients.

- :func:`wasserstein_1d`: 1-D OT between empirical measures; native C++ (CPU) and Triton (GPU) kernels.
- :func:`sliced_wasserstein`: projections + :func:`wasserstein_1d` (POT's ``sliced_wasserstein_distance``).
- :func:`gaussian_w2`: Bures-Wasserstein distance between Gaussians; dense linear algebra (``eigh``), so
  torch composite code with a stable matrix-square-root backward (see ``alignops._spectral``).
"""

from __future__ import annotations

import math

import torch

from . import _backend
from ._api import keyword_only
from ._checks import check_same_device, values_checkable
from ._errors import AlignopsError
from ._spectral import psd_sqrt
from .ops._registration import run_checks, run_value_checks
from .reference import wasserstein as _ref


def _check_layout(x: torch.Tensor, name: str, like: torch.Tensor | None = None, like_name: str = "") -> None:
    """The checks of the public [..., n] layout, which the op (one problem per row of [P, n]) never sees; the op's
    own checks (dtypes, devices, empty samples, p) run once the problems are flattened."""
    if not isinstance(x, torch.Tensor):
        raise AlignopsError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise AlignopsError(f"{name} must have shape [..., n] (atoms on the last dimension), got a 0-D tensor")
    if like is not None and x.shape != like.shape:
        raise AlignopsError(f"{name} must have the shape of {like_name} {list(like.shape)}, got {list(x.shape)}")


def wasserstein_1d(
    u: torch.Tensor,
    v: torch.Tensor,
    u_weights: torch.Tensor | None = None,
    v_weights: torch.Tensor | None = None,
    p: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""p-th power of the p-Wasserstein distance between 1-D empirical measures, batched and differentiable.

    .. math:: W_p^p(\mu, \nu) = \int_0^1 |F_\mu^{-1}(q) - F_\nu^{-1}(q)|^p \, dq

    with :math:`\mu = \sum_i a_i \delta_{u_i}`, :math:`\nu = \sum_j b_j \delta_{v_j}`, the weights normalised
    per problem. This is POT's ``ot.wasserstein_1d`` convention (the p-th power, no root; POT itself does not
    normalise the weights) and, for ``p = 1``, exactly ``scipy.stats.wasserstein_distance``.

    Args:
        u: [..., n] atoms of the first measure; v: [..., m] atoms of the second. The leading dimensions are
            broadcast together; each index of them is one problem.
        u_weights, v_weights: optional non-negative weights of the shapes of u / v (uniform when None), with
            a positive sum per problem.
        p: order, a finite value >= 1.
        backend: ``"native"`` (C++, CPU: per problem a sort and one merge of the two CDFs, threaded over the
            problems), ``"triton"`` (GPU: torch.sort sorts, a Triton kernel merges the CDFs), ``"torch"``
            (the reference of ``alignops.reference.wasserstein``), ``"auto"`` (native on CPU, Triton on CUDA).

    Returns:
        [...] in u's dtype (sums in fp64 on the CPU, in fp32 (fp64 for fp64 input) in Triton).

    Gradients w.r.t. u, v (``p |d|^(p-1) sign(d)`` times the length of each merged CDF segment; the
    subgradient 0 at ``d = 0`` for p = 1) and w.r.t. the weights (through the CDF breakpoints; where a
    breakpoint of u meets one of v the function has a kink and the one-sided derivative is returned).

    Raises:
        ValueError: shapes, dtypes or devices that do not match, an empty sample, p < 1, negative or
            non-finite weights or a zero total weight (the last two checked on the CPU only: on a GPU that
            check would wait for the device).
    """
    _check_layout(u, "u")
    _check_layout(v, "v")
    for w, x, name, x_name in ((u_weights, u, "u_weights", "u"), (v_weights, v, "v_weights", "v")):
        if w is not None:
            _check_layout(w, name, x, x_name)
    try:
        lead = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
    except RuntimeError as e:
        raise AlignopsError(
            f"the leading (batch) dimensions of u {list(u.shape)} and v {list(v.shape)} must broadcast"
        ) from e
    problems = math.prod(lead)

    def flat(x):  # [..., k] -> [P, k], one problem per row (a view where the broadcast allows)
        return None if x is None else x.expand(*lead, x.shape[-1]).reshape(problems, x.shape[-1])

    args = (flat(u), flat(v), flat(u_weights), flat(v_weights), float(p))
    impl = _backend.resolve(backend, u.device, "wasserstein_1d", native_cuda=False)
    if impl == "torch":
        run_checks("alignops::wasserstein_1d", *args)
        if u.device.type == "cpu" and values_checkable(u):  # as the CPU kernel; on a GPU it would sync
            run_value_checks("alignops::wasserstein_1d", *args[2:4])
        out = _ref.wasserstein_1d(*args)
    else:
        op = torch.ops.alignops.wasserstein_1d if impl == "native" else torch.ops.alignops.wasserstein_1d_triton
        out = op(*args)
    return out.reshape(lead)


def random_projections(
    d: int, n_projections: int, seed: int | None = None, *, dtype=torch.float32, device=None
) -> torch.Tensor:
    """[d, n_projections] directions uniform on the sphere (normalised Gaussians), from ``torch.Generator(seed)``."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    theta = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    return _backend.to_device((theta / theta.norm(dim=0, keepdim=True)).to(dtype), device or "cpu")


@keyword_only("n_projections", "seed")
def sliced_wasserstein(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    n_projections: int = 50,
    seed: int | None = None,
    projections: torch.Tensor | None = None,
    p: float = 2.0,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Sliced p-Wasserstein distance, POT's ``ot.sliced_wasserstein_distance`` convention.

    .. math:: SW_p(X, Y) = \Big(\frac{1}{L} \sum_{l=1}^{L} W_p^p(X\theta_l, Y\theta_l)\Big)^{1/p}

    Args:
        X: [..., n, d] and Y: [..., m, d] point clouds (leading dimensions broadcast).
        n_projections, seed: L random unit directions from :func:`random_projections` (ignored when
            ``projections`` is given; POT draws its own from numpy, so pass the same ``projections`` to
            compare).
        projections: [d, L] directions (columns), used as given.
        p: order >= 1 (POT's default 2). a [..., n], b [..., m]: optional weights of the points.
        backend: of the 1-D problems, see :func:`wasserstein_1d` (one problem per batch index and direction).

    Returns: [...] in X's dtype, differentiable w.r.t. X, Y, a, b and projections; where the distance is 0
    (X = Y) the gradient is the subgradient 0 (the root's derivative is infinite there).

    Raises: ValueError for mismatched shapes / dtypes / devices, or as :func:`wasserstein_1d`.
    """
    if X.dim() < 2 or Y.dim() < 2:
        raise AlignopsError(f"X and Y must have shape [..., n, d], got {list(X.shape)} and {list(Y.shape)}")
    if X.shape[-1] != Y.shape[-1]:
        raise AlignopsError(f"X and Y must have the same dimension d, got {X.shape[-1]} and {Y.shape[-1]}")
    d = X.shape[-1]
    if projections is None:
        if n_projections < 1:
            raise AlignopsError(f"n_projections must be >= 1, got {n_projections}")
        projections = random_projections(d, n_projections, seed, dtype=X.dtype, device=X.device)
    elif projections.dim() != 2 or projections.shape[0] != d:
        raise AlignopsError(f"projections must have shape [d, L] with d = {d}, got {list(projections.shape)}")
    for name, t in (("Y", Y), ("projections", projections)):
        if t.dtype != X.dtype or t.device != X.device:
            raise AlignopsError(
                f"{name} must have the dtype and device of X ({X.dtype}, {X.device}), got {t.dtype}, {t.device}"
            )
    xp = (X @ projections).transpose(-1, -2)  # [..., L, n]
    yp = (Y @ projections).transpose(-1, -2)
    aw = None if a is None else a.unsqueeze(-2).expand_as(xp)
    bw = None if b is None else b.unsqueeze(-2).expand_as(yp)
    return _ref.root(wasserstein_1d(xp, yp, aw, bw, p, backend=backend).mean(-1), p)


def gaussian_w2(mu1: torch.Tensor, S1: torch.Tensor, mu2: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    r"""Squared 2-Wasserstein (Bures-Wasserstein) distance between Gaussians, batched and differentiable.

    .. math:: W_2^2 = \|\mu_1 - \mu_2\|^2 + \mathrm{tr}\big(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}\big)

    The square of POT's ``ot.gaussian.bures_wasserstein_distance``. ``S1^(1/2)`` comes from ``eigh`` with the
    stable backward of ``alignops._spectral`` (finite at repeated eigenvalues, e.g. S1 = I), and the trace
    of the outer root is ``sum sqrt(eigvalsh(.))``, whose gradient needs no eigenvector differences either.
    Torch composite code (dense linear algebra: a C++ kernel would re-call the same LAPACK routines).

    Args: mu1, mu2 [..., d]; S1, S2 [..., d, d] symmetric PSD (symmetrised as (S + S^T) / 2); batch
        dimensions broadcast. float32 / float64 (CPU and CUDA).

    Returns: [...] in the inputs' dtype (clamped at 0: rounding can make it slightly negative).

    Raises: ValueError for shapes or devices that do not match or non-float inputs, and for an indefinite covariance
    (an eigenvalue below ``-1000 d eps max|eig|``, more than rounding makes) on CPU tensors outside
    torch.compile: an ``eigvalsh`` and a host read, skipped on a GPU (the root then clamps the negative part).
    """
    for name, t in (("mu1", mu1), ("S1", S1), ("mu2", mu2), ("S2", S2)):
        if t.dtype not in (torch.float32, torch.float64):
            raise AlignopsError(f"{name} must be float32 or float64, got {t.dtype}")
    check_same_device([("mu1", mu1), ("S1", S1), ("mu2", mu2), ("S2", S2)])
    d = mu1.shape[-1] if mu1.dim() >= 1 else -1
    if d < 0 or mu2.shape[-1:] != mu1.shape[-1:]:
        raise AlignopsError(
            f"mu1 and mu2 must have shape [..., d] with the same d, got {list(mu1.shape)} and {list(mu2.shape)}"
        )
    for name, S in (("S1", S1), ("S2", S2)):
        if S.dim() < 2 or S.shape[-2:] != (d, d):
            raise AlignopsError(f"{name} must have shape [..., d, d] with d = {d}, got {list(S.shape)}")
        if S.numel() and S.device.type == "cpu" and not torch.compiler.is_compiling():
            lam = torch.linalg.eigvalsh(0.5 * (S + S.transpose(-1, -2))).detach()
            scale = lam.abs().amax(-1).clamp_min(torch.finfo(S.dtype).tiny)
            lowest = lam[..., 0]
            bad = lowest < -1000 * d * torch.finfo(S.dtype).eps * scale
            if bool(bad.any()):
                raise AlignopsError(
                    f"{name} must be positive semi-definite (a covariance), got an eigenvalue "
                    f"{lowest[bad][0].item():.6g}"
                )
    r1 = psd_sqrt(S1)
    M = r1 @ (0.5 * (S2 + S2.transpose(-1, -2))) @ r1
    mu_eig = torch.linalg.eigvalsh(0.5 * (M + M.transpose(-1, -2)))
    # sqrt has an infinite slope at 0: eigenvalues of a singular product stop at the smallest normal number.
    cross = mu_eig.clamp_min(torch.finfo(M.dtype).tiny).sqrt().sum(-1)
    tr = S1.diagonal(dim1=-2, dim2=-1).sum(-1) + S2.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * cross
    return (((mu1 - mu2) ** 2).sum(-1) + tr).clamp_min(0)
