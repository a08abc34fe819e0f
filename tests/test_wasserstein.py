"""wasserstein family on the CPU: wasserstein_1d (native C++ and reference) vs scipy.stats.wasserstein_distance
and POT's ot.wasserstein_1d, sliced_wasserstein vs ot.sliced_wasserstein_distance with the same projections,
gaussian_w2 vs the closed form with scipy.linalg.sqrtm and POT; gradients, opcheck, compile, bad input."""

import functools

import numpy as np
import ot
import pytest
import scipy.linalg
import scipy.stats
import torch

import alignops
from alignops.reference import wasserstein as ref

BACKENDS = ["native", "torch"]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def sample(B, n, dtype=torch.float64, weights=False, scale=1.0, shift=0.0):
    x = (torch.randn(B, n, dtype=torch.float64) * scale + shift).to(dtype)
    w = (torch.rand(B, n, dtype=torch.float64) + 0.05).to(dtype) if weights else None
    return x, w


def scipy_w1(u, v, uw, vw):
    return np.array(
        [
            scipy.stats.wasserstein_distance(
                u[i].double().numpy(),
                v[i].double().numpy(),
                None if uw is None else uw[i].double().numpy(),
                None if vw is None else vw[i].double().numpy(),
            )
            for i in range(u.shape[0])
        ]
    )


def pot_wp(u, v, uw, vw, p):
    """ot.wasserstein_1d takes atoms on dim 0 and assumes normalised weights."""

    def norm(w):
        return None if w is None else (w / w.sum(-1, keepdim=True)).double().T.contiguous()

    return ot.wasserstein_1d(u.double().T.contiguous(), v.double().T.contiguous(), norm(uw), norm(vw), p=p).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("n,m", [(1, 1), (7, 7), (13, 47), (123, 5)])
def test_w1_matches_scipy(backend, dtype, weights, n, m):
    u, uw = sample(6, n, dtype, weights)
    v, vw = sample(6, m, dtype, weights, scale=2.0, shift=0.5)
    got = alignops.wasserstein_1d(u, v, uw, vw, backend=backend)
    assert got.dtype == dtype and got.shape == (6,)
    torch.testing.assert_close(got, torch.from_numpy(scipy_w1(u, v, uw, vw)).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [2.0, 3.5, 1.25])
@pytest.mark.parametrize("weights", [False, True])
def test_wp_matches_pot(backend, p, weights):
    u, uw = sample(5, 31, weights=weights)
    v, vw = sample(5, 18, weights=weights, scale=0.5, shift=-1.0)
    got = alignops.wasserstein_1d(u, v, uw, vw, p=p, backend=backend)
    torch.testing.assert_close(got, torch.from_numpy(pot_wp(u, v, uw, vw, p)), **TOL[torch.float64])


def test_native_matches_reference_large_and_ties():
    u = torch.randint(0, 5, (64, 300)).double()  # many tied atoms
    v = torch.randn(64, 257, dtype=torch.float64)
    uw = torch.rand(64, 300, dtype=torch.float64)
    uw[:, ::3] = 0  # atoms of zero mass
    for p in (1.0, 2.0):
        torch.testing.assert_close(
            alignops.wasserstein_1d(u, v, uw, None, p=p, backend="native"),
            ref.wasserstein_1d(u, v, uw, None, p=p),
            rtol=1e-10,
            atol=1e-10,
        )
    torch.testing.assert_close(
        alignops.wasserstein_1d(u, v, uw, None), torch.from_numpy(scipy_w1(u, v, uw, None)), rtol=1e-10, atol=1e-10
    )


def test_identical_measures_give_zero_and_translation_gives_shift():
    u = torch.randn(4, 33, dtype=torch.float64)
    assert torch.equal(alignops.wasserstein_1d(u, u[:, torch.randperm(33)]), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(alignops.wasserstein_1d(u, u + 0.75), torch.full((4,), 0.75, dtype=torch.float64))
    torch.testing.assert_close(
        alignops.wasserstein_1d(u, u + 0.75, p=2.0), torch.full((4,), 0.5625, dtype=torch.float64)
    )


def test_batch_shapes_broadcast_and_empty_batch():
    u = torch.randn(2, 3, 9, dtype=torch.float64)
    v = torch.randn(3, 5, dtype=torch.float64)
    got = alignops.wasserstein_1d(u, v)
    assert got.shape == (2, 3)
    exp = alignops.wasserstein_1d(u.reshape(6, 9), v.repeat(2, 1)).reshape(2, 3)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)
    assert alignops.wasserstein_1d(torch.randn(0, 4), torch.randn(0, 6)).shape == (0,)
    assert alignops.wasserstein_1d(torch.randn(4), torch.randn(6)).shape == ()


def test_nan_propagates():
    u = torch.randn(3, 8)
    u[1, 2] = float("nan")
    got = alignops.wasserstein_1d(u, torch.randn(3, 8))
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    u, _ = sample(8, 40, dtype)
    v, _ = sample(8, 25, dtype, shift=0.3)
    got = alignops.wasserstein_1d(u, v)
    exact = ref.wasserstein_1d(u.double(), v.double())  # the same (rounded) atoms in fp64
    assert got.dtype == dtype
    # one rounding of the result to the output dtype
    torch.testing.assert_close(got.double(), exact, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_gradcheck_values_and_weights(p):
    u, uw = sample(3, 6, weights=True)
    v, vw = sample(3, 5, weights=True, shift=0.2)
    args = [t.requires_grad_() for t in (u, v, uw, vw)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: alignops.wasserstein_1d(a, b, c, d, p=p, backend="native"), args)


def test_gradients_match_reference_autograd():
    u, uw = sample(4, 21, weights=True)
    v, vw = sample(4, 13, weights=True, scale=3.0)
    grads = []
    for backend in BACKENDS:
        args = [t.clone().requires_grad_() for t in (u, v, uw, vw)]
        weights = torch.arange(1.0, 5.0, dtype=u.dtype)
        (alignops.wasserstein_1d(*args, p=2.0, backend=backend) * weights).sum().backward()
        grads.append([a.grad for a in args])
    for g_native, g_ref in zip(*grads):
        torch.testing.assert_close(g_native, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weights", [False, True])
def test_fp32_radix_path_matches_reference(weights):
    # n >= 64 fp32 rows are sorted by the kernel's radix sort: values, gradients, ties, negative zeros
    u = torch.randn(8, 300)
    u[:, :40] = torch.randint(-2, 3, (8, 40)).float()
    u[:, 40] = -0.0
    v = torch.randn(8, 129) * 2
    uw = torch.rand(8, 300) if weights else None
    got_u, ref_u = u.clone().requires_grad_(), u.double().requires_grad_()
    got = alignops.wasserstein_1d(got_u, v, uw, p=2.0, backend="native")
    exp = ref.wasserstein_1d(ref_u, v.double(), None if uw is None else uw.double(), p=2.0)
    torch.testing.assert_close(got, exp.float(), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    exp.sum().backward()
    torch.testing.assert_close(got_u.grad, ref_u.grad.float(), rtol=1e-4, atol=1e-6)


def test_uniform_gradient_is_transport_map():
    # W1 between sorted samples of equal size: d/du_i = sign(u_(i) - v_(i)) / n
    u = torch.tensor([[0.0, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[2.0, -1.0, 1.5]], dtype=torch.float64)  # pairs (0, -1), (1, 1.5), (3, 2)
    alignops.wasserstein_1d(u, v).sum().backward()
    torch.testing.assert_close(u.grad, torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64) / 3)


def test_opcheck():
    u, uw = sample(4, 9, torch.float32, weights=True)
    v, vw = sample(4, 6, torch.float32, weights=True)
    torch.library.opcheck(torch.ops.alignops.wasserstein_1d, (u, v, uw, vw, 2.0))
    torch.library.opcheck(torch.ops.alignops.wasserstein_1d, (u.double().requires_grad_(), v.double(), None, None, 1.0))
    torch.library.opcheck(torch.ops.alignops.wasserstein_1d_backward, (torch.randn(4), u, v, uw, vw, 1.0, True))


def test_compile_fullgraph():
    u, uw = sample(4, 17, torch.float32, weights=True)
    v, _ = sample(4, 10, torch.float32)
    fn = torch.compile(lambda a, b, c: alignops.wasserstein_1d(a, b, c, p=2.0), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(u, v, uw), alignops.wasserstein_1d(u, v, uw, p=2.0))


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_input(backend):
    # one message per mistake whichever backend serves the call: the op's checks run on both
    u, v = torch.randn(3, 5), torch.randn(3, 4)
    w1 = functools.partial(alignops.wasserstein_1d, backend=backend)
    with pytest.raises(ValueError, match="p must be a finite value >= 1, got 0.5"):
        w1(u, v, p=0.5)
    with pytest.raises(ValueError, match="p must be a finite value >= 1, got nan"):
        w1(u, v, p=float("nan"))
    with pytest.raises(ValueError, match=r"v must have the dtype of u \(torch.float32\), got torch.float64"):
        w1(u, v.double())
    with pytest.raises(ValueError, match=r"u_weights must have the shape of u \[3, 5\], got \[3, 4\]"):
        w1(u, v, u_weights=torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"u_weights must have the dtype of u \(torch.float32\), got torch.float64"):
        w1(u, v, u_weights=torch.rand(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one atom"):
        w1(u, torch.randn(3, 0))
    with pytest.raises(ValueError, match="must broadcast"):
        w1(u, torch.randn(2, 4))
    with pytest.raises(ValueError, match="u must be float32"):
        w1(torch.ones(3, 5, dtype=torch.long), v)
    with pytest.raises(ValueError, match="0-D tensor"):
        w1(torch.tensor(1.0), v)
    with pytest.raises(ValueError, match="u_weights must be finite and >= 0"):
        w1(u, v, u_weights=-torch.rand(3, 5))
    with pytest.raises(ValueError, match="u_weights must be finite and >= 0"):
        w1(u, v, u_weights=torch.full((3, 5), float("nan")))
    with pytest.raises(ValueError, match="v_weights must have a positive sum"):
        w1(u, v, v_weights=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="v must be on the device of u"):
        w1(u, v.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        alignops.wasserstein_1d(u, v, backend="cuda")


def test_op_bad_input():
    u = torch.randn(3, 5)
    with pytest.raises(ValueError, match="v must have as many problems as u"):
        torch.ops.alignops.wasserstein_1d(u, torch.randn(2, 4), None, None, 1.0)
    with pytest.raises(ValueError, match=r"u must be a 2-D tensor of shape \[B, n\]"):
        torch.ops.alignops.wasserstein_1d(u[0], torch.randn(4), None, None, 1.0)


# ---- sliced_wasserstein ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("weights", [False, True])
def test_sliced_matches_pot_with_same_projections(backend, p, weights):
    X = torch.randn(40, 5, dtype=torch.float64)
    Y = torch.randn(27, 5, dtype=torch.float64) * 1.5 + 0.3
    a = torch.rand(40, dtype=torch.float64) if weights else None
    b = torch.rand(27, dtype=torch.float64) if weights else None
    proj = ot.sliced.get_random_projections(5, 30, seed=3)
    exp = ot.sliced_wasserstein_distance(
        X.numpy(),
        Y.numpy(),
        None if a is None else (a / a.sum()).numpy(),
        None if b is None else (b / b.sum()).numpy(),
        projections=proj,
        p=p,
    )
    got = alignops.sliced_wasserstein(X, Y, projections=torch.from_numpy(proj), p=p, a=a, b=b, backend=backend)
    torch.testing.assert_close(got, torch.tensor(exp, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_sliced_batched_seeded_and_differentiable():
    X = torch.randn(3, 20, 4, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(3, 15, 4, dtype=torch.float64)
    d1 = alignops.sliced_wasserstein(X, Y, n_projections=16, seed=7)
    d2 = alignops.sliced_wasserstein(X, Y, n_projections=16, seed=7)
    assert d1.shape == (3,) and torch.equal(d1, d2)
    proj = alignops.wasserstein.random_projections(4, 16, 7, dtype=torch.float64)
    torch.testing.assert_close(proj.norm(dim=0), torch.ones(16, dtype=torch.float64))
    for i in range(3):
        exp = ot.sliced_wasserstein_distance(X[i].detach().numpy(), Y[i].numpy(), projections=proj.numpy())
        torch.testing.assert_close(d1[i], torch.tensor(exp, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    d1.sum().backward()
    assert torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda x: alignops.sliced_wasserstein(x, Y[:, :6], projections=proj[:, :3]),
        (X[:, :7].detach().clone().requires_grad_(),),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_sliced_gradient_at_zero_distance_is_zero(backend, p):
    # d/dm m^(1/p) is inf at m = 0, and times W_p^p's zero gradient it gave NaN for SW(X, X).backward().
    # Batch 0 is X = Y (subgradient 0); batch 1 is X != Y, checked against SW written out in plain torch
    # (equal sizes, uniform weights: W_p^p of sorted projections).
    X = torch.randn(2, 9, 3, dtype=torch.float64)
    Y = torch.stack([X[0], torch.randn(9, 3, dtype=torch.float64)])
    proj = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=0)
    Xg, Yg, Pg = (t.clone().requires_grad_(True) for t in (X, Y, proj))
    got = alignops.sliced_wasserstein(Xg, Yg, projections=Pg, p=p, backend=backend)
    got.sum().backward()
    Xe, Ye, Pe = (t.clone().requires_grad_(True) for t in (X[1], Y[1], proj))
    xs, ys = (Xe @ Pe).sort(0).values, (Ye @ Pe).sort(0).values
    exp = ((xs - ys).abs().pow(p).mean(0).mean()) ** (1 / p)
    exp.backward()
    assert got[0] == 0
    torch.testing.assert_close(got[1], exp.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(Xg.grad[0], torch.zeros_like(X[0])) and torch.equal(Yg.grad[0], torch.zeros_like(X[0]))
    torch.testing.assert_close(Xg.grad[1], Xe.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Yg.grad[1], Ye.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Pg.grad, Pe.grad, rtol=1e-9, atol=1e-12)


def test_sliced_bad_input():
    with pytest.raises(ValueError, match="same dimension d"):
        alignops.sliced_wasserstein(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="projections must have shape"):
        alignops.sliced_wasserstein(torch.randn(5, 3), torch.randn(5, 3), projections=torch.randn(4, 2))
    with pytest.raises(ValueError, match="projections must have the dtype and device of X"):
        alignops.sliced_wasserstein(torch.randn(5, 3), torch.randn(5, 3), projections=torch.randn(3, 2).double())
    with pytest.raises(ValueError, match="n_projections must be >= 1"):
        alignops.sliced_wasserstein(torch.randn(5, 3), torch.randn(5, 3), n_projections=0)


# ---- gaussian_w2 -----------------------------------------------------------------------------------------


def random_spd(*batch, d, dtype=torch.float64):
    A = torch.randn(*batch, d, d, dtype=dtype)
    return A @ A.transpose(-1, -2) / d + 0.1 * torch.eye(d, dtype=dtype)


def closed_form(mu1, S1, mu2, S2):
    r = scipy.linalg.sqrtm(S1)
    cross = np.real(scipy.linalg.sqrtm(r @ S2 @ r))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(S1 + S2 - 2 * cross))


@pytest.mark.parametrize("d", [1, 3, 8])
def test_gaussian_w2_matches_scipy_sqrtm_and_pot(d):
    mu1, mu2 = torch.randn(4, d, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    S1, S2 = random_spd(4, d=d), random_spd(4, d=d)
    got = alignops.gaussian_w2(mu1, S1, mu2, S2)
    exp = [closed_form(mu1[i].numpy(), S1[i].numpy(), mu2[i].numpy(), S2[i].numpy()) for i in range(4)]
    torch.testing.assert_close(got, torch.tensor(exp, dtype=torch.float64), rtol=1e-8, atol=1e-10)
    pot = [
        float(ot.gaussian.bures_wasserstein_distance(mu1[i].numpy(), mu2[i].numpy(), S1[i].numpy(), S2[i].numpy())) ** 2
        for i in range(4)
    ]
    torch.testing.assert_close(got, torch.tensor(pot, dtype=torch.float64), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got, ref.gaussian_w2(mu1, S1, mu2, S2), rtol=1e-9, atol=1e-10)
    f32 = alignops.gaussian_w2(mu1.float(), S1.float(), mu2.float(), S2.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), got, rtol=1e-3, atol=1e-4)


def test_gaussian_w2_gradients_stable_at_repeated_eigenvalues():
    d = 4
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    S2 = random_spd(d=d)
    for S1 in (torch.eye(d, dtype=torch.float64), 2.0 * torch.eye(d, dtype=torch.float64), random_spd(d=d)):
        args = [t.clone().requires_grad_() for t in (mu1, S1, mu2, S2)]
        alignops.gaussian_w2(*args).backward()
        assert all(torch.isfinite(a.grad).all() for a in args)
        assert torch.autograd.gradcheck(alignops.gaussian_w2, [t.clone().requires_grad_() for t in (mu1, S1, mu2, S2)])
    # autograd through eigh (the reference) is NaN at S1 = I: the failure mode this op exists to avoid
    S1 = torch.eye(d, dtype=torch.float64, requires_grad=True)
    ref.gaussian_w2(mu1, S1, mu2, S2).backward()
    assert not torch.isfinite(S1.grad).all()


def test_gaussian_w2_identical_is_zero_and_compiles():
    mu, S = torch.randn(2, 3, dtype=torch.float64), random_spd(2, d=3)
    torch.testing.assert_close(
        alignops.gaussian_w2(mu, S, mu, S), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-10
    )
    fn = torch.compile(alignops.gaussian_w2, fullgraph=True, backend="aot_eager")
    S2 = random_spd(2, d=3)
    torch.testing.assert_close(fn(mu, S, mu + 1, S2), alignops.gaussian_w2(mu, S, mu + 1, S2))


def test_gaussian_w2_bad_input():
    with pytest.raises(ValueError, match="S2 must have shape"):
        alignops.gaussian_w2(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="mu1 and mu2 must have shape"):
        alignops.gaussian_w2(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="mu1 must be float32 or float64"):
        alignops.gaussian_w2(torch.zeros(3, dtype=torch.long), torch.eye(3), torch.zeros(3), torch.eye(3))


def test_empty_batches_sliced_and_gaussian():
    assert alignops.sliced_wasserstein(torch.randn(0, 10, 3), torch.randn(0, 7, 3), n_projections=5, seed=0).shape == (
        0,
    )
    assert alignops.gaussian_w2(
        torch.randn(0, 3), torch.randn(0, 3, 3), torch.randn(0, 3), torch.randn(0, 3, 3)
    ).shape == (0,)
