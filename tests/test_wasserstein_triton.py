"""The Triton wasserstein ops (alignops::wasserstein_1d_triton and its backward) against the native C++ op,
scipy and POT. Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py), with
16-step blocks (kernels/wasserstein.py), so these small shapes span several blocks of the merge."""

import pytest

ot = pytest.importorskip("ot")
pytest.importorskip("triton", reason="needs the triton package")
import scipy.stats
import torch

import alignops
import alignops.ops.wasserstein  # registers alignops::wasserstein_1d_triton

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def sample(B, n, dtype=torch.float64, weights=False, scale=1.0, shift=0.0):
    x = (torch.randn(B, n, dtype=torch.float64) * scale + shift).to(dtype)
    w = (torch.rand(B, n, dtype=torch.float64) + 0.05).to(dtype) if weights else None
    return x, w


def on(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("n,m", [(1, 1), (16, 16), (13, 40), (57, 3)])
def test_w1_matches_scipy_and_native(dtype, weights, n, m):
    u, uw = sample(5, n, dtype, weights)
    v, vw = sample(5, m, dtype, weights, scale=2.0, shift=0.4)
    got = alignops.wasserstein_1d(*on(u, v, uw, vw), backend="triton").cpu()
    exp = [
        scipy.stats.wasserstein_distance(
            u[i].double().numpy(),
            v[i].double().numpy(),
            None if uw is None else uw[i].double().numpy(),
            None if vw is None else vw[i].double().numpy(),
        )
        for i in range(5)
    ]
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.tensor(exp, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(got, alignops.wasserstein_1d(u, v, uw, vw, backend="native"), **TOL[dtype])


@pytest.mark.parametrize("p", [2.0, 1.5])
def test_wp_matches_pot(p):
    u, uw = sample(4, 23, weights=True)
    v, vw = sample(4, 19, scale=0.5)
    got = alignops.wasserstein_1d(*on(u, v, uw, vw), p=p, backend="triton").cpu()
    exp = ot.wasserstein_1d(
        u.T.contiguous(), v.T.contiguous(), (uw / uw.sum(-1, keepdim=True)).T.contiguous(), None, p=p
    )
    torch.testing.assert_close(got, exp, **TOL[torch.float64])


def test_ties_zero_weights_and_empty_batch():
    u = torch.randint(0, 4, (3, 37)).double()
    v = torch.randint(0, 4, (3, 21)).double()
    uw = torch.rand(3, 37, dtype=torch.float64)
    uw[:, ::4] = 0
    for p in (1.0, 2.0):
        torch.testing.assert_close(
            alignops.wasserstein_1d(*on(u, v, uw), p=p, backend="triton").cpu(),
            alignops.wasserstein_1d(u, v, uw, p=p, backend="native"),
            **TOL[torch.float64],
        )
    assert alignops.wasserstein_1d(*on(torch.randn(0, 5), torch.randn(0, 3)), backend="triton").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    u, _ = sample(4, 30, dtype)
    v, _ = sample(4, 18, dtype, shift=0.5)
    got = alignops.wasserstein_1d(*on(u, v), backend="triton").cpu()
    assert got.dtype == dtype
    exact = alignops.wasserstein_1d(u.double(), v.double(), backend="native")
    torch.testing.assert_close(got.double(), exact, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_backward_matches_native(p):
    u, uw = sample(3, 29, weights=True)
    v, vw = sample(3, 18, weights=True, scale=1.5)
    g = torch.randn(3, dtype=torch.float64)
    got = torch.ops.alignops.wasserstein_1d_backward_triton(*on(g, u, v, uw, vw), p, True)
    exp = torch.ops.alignops.wasserstein_1d_backward(g, u, v, uw, vw, p, True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
    got = torch.ops.alignops.wasserstein_1d_backward_triton(*on(g, u, v), None, None, p, True)
    assert got[2].numel() == 0 and got[3].numel() == 0


def test_backward_fp32_radix_rows_match_native():
    # fp32 rows of >= 64 atoms: the native op radix-sorts them, the Triton op uses torch.sort
    u, uw = sample(2, 100, torch.float32, weights=True)
    v, vw = sample(2, 70, torch.float32, weights=True, scale=1.5)
    u[:, :20] = torch.randint(-1, 2, (2, 20)).float()  # ties
    g = torch.randn(2)
    got = torch.ops.alignops.wasserstein_1d_backward_triton(*on(g, u, v, uw, vw), 2.0, True)
    exp = torch.ops.alignops.wasserstein_1d_backward(g, u, v, uw, vw, 2.0, True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_gradcheck():
    u, uw = sample(2, 5, weights=True)
    v, vw = sample(2, 7, weights=True, shift=0.3)
    args = [t.requires_grad_() for t in on(u, v, uw, vw)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: alignops.wasserstein_1d(a, b, c, d, p=2.0, backend="triton"), args
    )


OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def test_opcheck():
    u, uw = on(*sample(3, 9, torch.float32, weights=True))
    v, vw = on(*sample(3, 6, torch.float32, weights=True))
    torch.library.opcheck(torch.ops.alignops.wasserstein_1d_triton, (u, v, uw, vw, 1.0), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(
        torch.ops.alignops.wasserstein_1d_backward_triton,
        (torch.randn(3, device=DEVICE), u, v, uw, vw, 2.0, True),
        test_utils=OPCHECK_UTILS,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles Triton ops only for the GPU")
def test_compile_fullgraph_cuda():
    u, uw = on(*sample(8, 300, torch.float32, weights=True))
    v, _ = on(*sample(8, 200, torch.float32))
    fn = torch.compile(lambda a, b, c: alignops.wasserstein_1d(a, b, c, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(u, v, uw), alignops.wasserstein_1d(u, v, uw, backend="triton"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_large_batch_matches_native_cuda():
    u = torch.randn(512, 1024)
    v = torch.randn(512, 777) * 1.3
    got = alignops.wasserstein_1d(u.cuda(), v.cuda()).cpu()
    torch.testing.assert_close(got, alignops.wasserstein_1d(u, v, backend="native"), rtol=1e-4, atol=1e-5)


def test_bad_input():
    u, v = on(torch.randn(3, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="p must be a finite value >= 1"):
        torch.ops.alignops.wasserstein_1d_triton(u, v, None, None, 0.0)
    with pytest.raises(ValueError, match="v must have as many problems as u"):
        torch.ops.alignops.wasserstein_1d_triton(u, v[:2], None, None, 1.0)
    with pytest.raises(ValueError, match="u_weights must have the shape of u"):
        torch.ops.alignops.wasserstein_1d_triton(u, v, v, None, 1.0)
    with pytest.raises(ValueError, match=r"u must be a 2-D tensor of shape \[B, n\]"):
        torch.ops.alignops.wasserstein_1d_triton(u[0], v, None, None, 1.0)
    with pytest.raises(ValueError, match="at least one atom"):
        torch.ops.alignops.wasserstein_1d_triton(u, v[:, :0], None, None, 1.0)
