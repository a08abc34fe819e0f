"""wasserstein family (+ the CCA / CKA ops of represent added with it): batched wasserstein_1d vs the torch
reference, POT's ot.wasserstein_1d (torch backend) and scipy looped over problems; sliced_wasserstein vs
POT; batched small CCA vs the per-problem torch reference (DCCA-style eigh) and looping scikit-learn;
debiased linear CKA vs Kornblith's numpy formula looped. Every provider gets all CPU threads."""

from __future__ import annotations

import numpy as np
import torch

import alignops
from alignops.reference import represent as rref
from alignops.reference import wasserstein as ref

from .common import case_maker

FAMILY = "wasserstein"


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def _fwd_bwd(fn, *inputs):
    out = fn(*inputs)
    out.sum().backward()
    return out


def _clear(*ts):
    def reset():
        for t in ts:
            t.grad = None

    return reset


def _w1d_groups(device, B, n, m):
    u = torch.randn(B, n, device=device)
    v = torch.randn(B, m, device=device) * 1.5 + 0.3
    shape = f"B={B} n={n} m={m}"
    case = case_maker(FAMILY, "wasserstein_1d", shape, "float32", "fwd")
    cases = [
        case("torch reference", lambda: _no_grad(ref.wasserstein_1d, u, v), baseline=True),
        case("alignops", lambda: _no_grad(alignops.wasserstein_1d, u, v)),
    ]
    try:
        import ot

        ut, vt = u.T.contiguous(), v.T.contiguous()
        cases.append(case("POT ot.wasserstein_1d (torch)", lambda: _no_grad(ot.wasserstein_1d, ut, vt)))
    except ImportError:
        pass
    if device == "cpu":
        try:
            from scipy.stats import wasserstein_distance

            un, vn = u.numpy(), v.numpy()
            cases.append(case("scipy loop", lambda: [wasserstein_distance(un[i], vn[i]) for i in range(B)]))
        except ImportError:
            pass
    yield cases
    ug, vg = u.clone().requires_grad_(), v.clone().requires_grad_()
    case = case_maker(FAMILY, "wasserstein_1d", shape, "float32", "fwd+bwd")
    yield [
        case("torch reference", lambda: _fwd_bwd(ref.wasserstein_1d, ug, vg), baseline=True, reset=_clear(ug, vg)),
        case("alignops", lambda: _fwd_bwd(alignops.wasserstein_1d, ug, vg), reset=_clear(ug, vg)),
    ]


def _sliced_group(device, n, d, L):
    X = torch.randn(n, d, device=device)
    Y = torch.randn(n, d, device=device) * 1.2 + 0.1
    proj = alignops.wasserstein.random_projections(d, L, 0, device=device)
    case = case_maker(FAMILY, "sliced_wasserstein", f"n=m={n} d={d} L={L}", "float32", "fwd")
    cases = []
    try:
        import ot

        Xn, Yn, Pn = X.cpu().numpy(), Y.cpu().numpy(), proj.cpu().numpy()
        cases.append(case("POT (numpy)", lambda: ot.sliced_wasserstein_distance(Xn, Yn, projections=Pn), baseline=True))
    except ImportError:
        pass
    cases += [
        case("alignops", lambda: _no_grad(alignops.sliced_wasserstein, X, Y, projections=proj), baseline=not cases),
        case("torch reference", lambda: _no_grad(ref.sliced_wasserstein, X, Y, proj)),
    ]
    yield cases


def _views(B, n, d, device):
    z = torch.randn(B, n, 4, device=device)
    H1 = z @ torch.randn(4, d, device=device) + torch.randn(B, n, d, device=device)
    H2 = z @ torch.randn(4, d, device=device) + torch.randn(B, n, d, device=device)
    return H1, H2


def _cca_groups(device, B, n, d, B_sklearn):
    H1, H2 = _views(B, n, d, device)
    shape = f"B={B} n={n} d={d}"
    case = case_maker("represent", "cca", shape, "float32", "fwd")
    yield [
        case(
            "torch reference loop (eigh)",
            lambda: _no_grad(lambda: [rref.cca(H1[i], H2[i]) for i in range(B)]),
            baseline=True,
        ),
        case("alignops (batched)", lambda: _no_grad(alignops.cca, H1, H2)),
    ]
    g1, g2 = H1.clone().requires_grad_(), H2.clone().requires_grad_()
    case = case_maker("represent", "cca_loss", shape, "float32", "fwd+bwd")
    yield [
        case(
            "torch reference loop (eigh)",
            lambda: _fwd_bwd(lambda a, b: torch.stack([-rref.cca(a[i], b[i]).sum() for i in range(B)]), g1, g2),
            baseline=True,
            reset=_clear(g1, g2),
        ),
        case("alignops (batched)", lambda: _fwd_bwd(alignops.cca_loss, g1, g2), reset=_clear(g1, g2)),
    ]
    try:
        from sklearn.cross_decomposition import CCA
    except ImportError:
        return
    k = 4  # scikit-learn's NIPALS CCA fits one component at a time: all d of them would take minutes
    s1, s2 = H1[:B_sklearn].cpu().numpy(), H2[:B_sklearn].cpu().numpy()
    case = case_maker("represent", "cca", f"B={B_sklearn} n={n} d={d} k={k}", "float32", "fwd")
    yield [
        case(
            "scikit-learn CCA loop",
            lambda: [CCA(n_components=k).fit(s1[i], s2[i]).transform(s1[i], s2[i]) for i in range(B_sklearn)],
            baseline=True,
        ),
        case("alignops (batched)", lambda: _no_grad(alignops.cca, H1[:B_sklearn], H2[:B_sklearn], k=k)),
    ]


def _np_debiased_cka(x, y):
    def center(g):
        n = g.shape[0]
        g = g.copy()
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0)
        return g

    gx, gy = center(x @ x.T), center(y @ y.T)
    return gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy))


def _cka_group(device, B, n, d):
    X, Y = _views(B, n, d, device)
    Xn, Yn = X.cpu().double().numpy(), Y.cpu().double().numpy()
    case = case_maker("represent", "linear_cka(debiased)", f"B={B} n={n} d={d}", "float32", "fwd")
    yield [
        case("numpy loop (Kornblith)", lambda: [_np_debiased_cka(Xn[i], Yn[i]) for i in range(B)], baseline=True),
        case("alignops (batched)", lambda: _no_grad(alignops.linear_cka, X, Y, debiased=True)),
    ]


def groups(device: str, quick: bool):
    if quick:
        yield from _w1d_groups(device, 256, 128, 96)
        yield from _sliced_group(device, 512, 16, 32)
        yield from _cca_groups(device, 16, 64, 8, 2)
        yield from _cka_group(device, 16, 64, 8)
        return
    yield from _w1d_groups(device, 4096, 1024, 1024)
    yield from _sliced_group(device, 4096, 64, 128)
    yield from _cca_groups(device, 256, 512, 32, 8)
    yield from _cka_group(device, 256, 512, 32)


def summary(results) -> list[str]:
    """Speed-ups of alignops over each provider of the same op / shape / mode, from this run's medians."""
    lines = []
    for r in results:
        if not r.provider.startswith("alignops"):
            continue
        for o in results:
            if (o.op, o.shape, o.mode) == (r.op, r.shape, r.mode) and o is not r and o.median_ms == o.median_ms:
                lines.append(
                    f"{r.op} {r.shape} {r.mode}: alignops {r.median_ms:.1f} ms, "
                    f"{o.median_ms / r.median_ms:.1f}x faster than {o.provider} ({o.median_ms:.1f} ms)"
                )
    return lines
