"""Triton kernels of the ot family vs the native ops and POT. On a machine without a GPU they run in the
Triton interpreter on CPU tensors (tests/conftest.py), on small shapes: 16-wide tiles there, so a 7 x 9
problem covers the single-tile (in-register) path, a batch of 3 problems of 37 x 21 the tiled
one-program-per-problem path and a batch of 2 the split path (kernels.ot.use_split)."""

import pytest
import torch

from alignops import ot as O

ot = pytest.importorskip("ot")
pytest.importorskip("triton", reason="needs the triton package")
from ot.bregman import sinkhorn_log as pot_sinkhorn_log  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 7, 9), (3, 37, 21), (2, 37, 21)])
@pytest.mark.parametrize("kw", [dict(n_iters=20), dict(n_iters=400, tol=1e-6), dict(n_iters=60, eps_scaling=0.5)])
def test_sinkhorn_triton_matches_native_ragged(dtype, shape, kw):
    B, N, M = shape
    C = torch.rand(B, N, M, dtype=dtype)
    ns = torch.tensor([N] + [N - 3] * (B - 1))
    ms = torch.tensor([M] * (B - 1) + [2])
    ref = O.sinkhorn(C, eps=0.1, n_sizes=ns, m_sizes=ms, backend="native", scores=True, **kw)
    got = O.sinkhorn(C.to(DEVICE), eps=0.1, n_sizes=ns.to(DEVICE), m_sizes=ms.to(DEVICE), backend="triton",
                     scores=True, **kw)
    if dtype == torch.float32 and "tol" in kw:
        # in fp32 the error crosses tol within a few iterations of the native kernel's (other exp rounding)
        assert ((got.n_iters.cpu() - ref.n_iters).abs() <= 3).all()
        assert (got.err <= kw["tol"]).all() and (ref.err <= kw["tol"]).all()
        torch.testing.assert_close(got.f.cpu(), ref.f, rtol=0, atol=1e-4)
        return
    torch.testing.assert_close(got.f.cpu(), ref.f, **TOL[dtype])
    torch.testing.assert_close(got.g.cpu(), ref.g, **TOL[dtype])
    assert torch.equal(got.n_iters.cpu(), ref.n_iters)
    # the error sums |column sum - b| over the columns: fp32 rounding of each column sum adds up
    torch.testing.assert_close(got.err.cpu(), ref.err, rtol=1e-3, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_sinkhorn_triton_matches_pot_and_empty_problems():
    C = torch.rand(3, 20, 18, dtype=torch.float64)
    ns, ms = torch.tensor([20, 0, 20]), torch.tensor([18, 18, 18])
    got = O.sinkhorn(C.to(DEVICE), eps=0.2, n_iters=30, n_sizes=ns.to(DEVICE), m_sizes=ms.to(DEVICE),
                     backend="triton")
    assert got.n_iters.tolist() == [30, 0, 30] and float(got.err[1]) == 0
    w_a, w_b = torch.full((20,), 1 / 20, dtype=torch.float64), torch.full((18,), 1 / 18, dtype=torch.float64)
    for p in (0, 2):
        _, log = pot_sinkhorn_log(w_a.numpy(), w_b.numpy(), C[p].numpy(), 0.2, numItermax=30, stopThr=0.0, log=True,
                                  warn=False)
        torch.testing.assert_close(got.f[p].cpu(), torch.from_numpy(0.2 * log["log_u"]), **TOL[torch.float64])


def test_sinkhorn_triton_envelope_gradient_is_the_plan():
    C = torch.rand(2, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = O.sinkhorn(C, eps=0.3, n_iters=500, tol=1e-12, backend="triton", return_plan=True)
    ((out.f / 6).sum() + (out.g / 5).sum()).backward()
    torch.testing.assert_close(C.grad, out.plan.detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalize_triton_matches_native(dtype):
    S = 3 * torch.randn(2, 41, 37, dtype=dtype)
    ref = O.sinkhorn_normalize(S, 4, temperature=0.5, backend="native")
    got = O.sinkhorn_normalize(S.to(DEVICE), 4, temperature=0.5, backend="triton")
    torch.testing.assert_close(got.row_bias.cpu(), ref.row_bias, **TOL[dtype])
    torch.testing.assert_close(got.col_bias.cpu(), ref.col_bias, **TOL[dtype])


# As for the other families: in the interpreter wrap_triton hands back the plain interpreted kernel, so the
# fake-tensor and AOT-dispatch checks need a GPU.
OPCHECK_UTILS = (("test_schema", "test_autograd_registration") if DEVICE == "cpu"
                 else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_triton_opcheck_and_bad_input():
    C = torch.rand(2, 5, 6, device=DEVICE)
    args = (C, torch.full((2, 5), 0.2, device=DEVICE), torch.full((2, 6), 1 / 6, device=DEVICE),
            torch.tensor([5, 3], device=DEVICE), torch.tensor([6, 6], device=DEVICE), [1.0], 0.3, 10, -1.0, False)
    torch.library.opcheck(torch.ops.alignops.sinkhorn_triton.default, args, test_utils=OPCHECK_UTILS)
    with pytest.raises(ValueError, match="eps must be a finite value > 0"):
        torch.ops.alignops.sinkhorn_triton(*args[:6], -1.0, *args[7:])
    with pytest.raises(ValueError, match="cost must be float32 or float64"):
        torch.ops.alignops.sinkhorn_triton(C.half(), *args[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sinkhorn_triton_large_and_small_eps_on_gpu():
    C = torch.rand(64, 512, 512, device="cuda")
    ref = O.sinkhorn(C.cpu(), eps=1e-2, n_iters=50, backend="native")
    got = O.sinkhorn(C, eps=1e-2, n_iters=50, backend="triton")
    torch.testing.assert_close(got.f.cpu(), ref.f, rtol=1e-3, atol=1e-4)
    small = O.sinkhorn(C[:4], eps=1e-4, n_iters=50, backend="triton", return_plan=True)
    assert torch.isfinite(small.plan).all()


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 37, 21, 5), (2, 37, 21, 5)])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_sinkhorn_points_triton_matches_native(shape, p):
    B, N, M, d = shape
    x, y = torch.rand(B, N, d, dtype=torch.float64), torch.rand(B, M, d, dtype=torch.float64)
    ref = O.sinkhorn_distance(x, y, 0.05, p=p, n_iters=30, backend="native")
    got = O.sinkhorn_distance(x.to(DEVICE), y.to(DEVICE), 0.05, p=p, n_iters=30, backend="triton")
    torch.testing.assert_close(got.value.cpu(), ref.value, **TOL[torch.float64])
    assert torch.equal(got.n_iters.cpu(), ref.n_iters)


def test_sinkhorn_triton_with_newton_steps_reaches_the_small_eps_target():
    # the Newton steps run on the Triton solver's potentials, on its device
    torch.manual_seed(0)
    C = torch.rand(3, 37, 21)
    kw = dict(eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.9, newton_steps=10)
    got = O.sinkhorn(C.to(DEVICE), backend="triton", return_plan=True, **kw)
    ref = O.sinkhorn(C, backend="native", **kw)
    assert (got.err <= 1e-4).all() and (got.n_iters <= 300).all() and (ref.err <= 1e-4).all()
    cols = (got.plan.double().sum(1) - 1 / 21).abs().sum(-1)
    assert (cols <= 1.05e-4).all()
