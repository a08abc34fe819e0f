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
    got = O.sinkhorn(
        C.to(DEVICE), eps=0.1, n_sizes=ns.to(DEVICE), m_sizes=ms.to(DEVICE), backend="triton", scores=True, **kw
    )
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
    got = O.sinkhorn(C.to(DEVICE), eps=0.2, n_iters=30, n_sizes=ns.to(DEVICE), m_sizes=ms.to(DEVICE), backend="triton")
    assert got.n_iters.tolist() == [30, 0, 30] and float(got.err[1]) == 0
    w_a, w_b = torch.full((20,), 1 / 20, dtype=torch.float64), torch.full((18,), 1 / 18, dtype=torch.float64)
    for p in (0, 2):
        _, log = pot_sinkhorn_log(
            w_a.numpy(), w_b.numpy(), C[p].numpy(), 0.2, numItermax=30, stopThr=0.0, log=True, warn=False
        )
        torch.testing.assert_close(got.f[p].cpu(), torch.from_numpy(0.2 * log["log_u"]), **TOL[torch.float64])


def test_sinkhorn_triton_envelope_gradient_is_the_plan():
    C = torch.rand(2, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = O.sinkhorn(C, eps=0.3, n_iters=500, tol=1e-12, backend="triton", return_plan=True)
    ((out.f / 6).sum() + (out.g / 5).sum()).backward()
    torch.testing.assert_close(C.grad, out.plan.detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalize_triton_matches_native(dtype):
    S = 3 * torch.randn(2, 41, 37, dtype=dtype)
    ref = O.sinkhorn_normalize(S, n_iters=4, temperature=0.5, backend="native")
    got = O.sinkhorn_normalize(S.to(DEVICE), n_iters=4, temperature=0.5, backend="triton")
    torch.testing.assert_close(got.row_bias.cpu(), ref.row_bias, **TOL[dtype])
    torch.testing.assert_close(got.col_bias.cpu(), ref.col_bias, **TOL[dtype])


# As for the other families: in the interpreter wrap_triton hands back the plain interpreted kernel, so the
# fake-tensor and AOT-dispatch checks need a GPU.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def test_triton_opcheck_and_bad_input():
    C = torch.rand(2, 5, 6, device=DEVICE)
    args = (
        C,
        torch.full((2, 5), 0.2, device=DEVICE),
        torch.full((2, 6), 1 / 6, device=DEVICE),
        torch.tensor([5, 3], device=DEVICE),
        torch.tensor([6, 6], device=DEVICE),
        [1.0],
        0.3,
        10,
        -1.0,
        False,
    )
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
    ref = O.sinkhorn_distance(x, y, eps=0.05, p=p, n_iters=30, backend="native")
    got = O.sinkhorn_distance(x.to(DEVICE), y.to(DEVICE), eps=0.05, p=p, n_iters=30, backend="triton")
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


# ---- issue 13: the convergence check after a full update, on every Triton path; bad and infinite inputs ----


def _trap_batch(B, N, M, C0, a0, b0):
    """A batch whose problem 0 is the small problem (C0, a0, b0), ragged in an N x M block, the others uniform
    problems that converge at once: B = 3 with N, M > 16 runs the tiled path in the interpreter, B = 2 the split
    path, N, M <= 16 the single tile."""
    n, m = C0.shape
    C = torch.zeros(B, N, M)
    C[0, :n, :m] = C0
    a, b = torch.full((B, N), 1 / N), torch.full((B, M), 1 / M)
    a[0], b[0] = 0, 0
    a[0, :n], b[0, :m] = a0, b0
    ns, ms = torch.tensor([n] + [N] * (B - 1)), torch.tensor([m] + [M] * (B - 1))
    return C, a, b, ns, ms


@pytest.mark.parametrize("shape", [(1, 7, 9), (3, 37, 21), (2, 37, 21)])
def test_sinkhorn_triton_checks_convergence_after_a_full_update(shape):
    # The column sums of exp(-C / eps) already equal b: a check before the first f update stopped at
    # iteration 0 with the rows never fitted. Expected: the closed form (M = 1: P = a) and POT's plan.
    B, N, M = shape
    cases = [(torch.tensor([[8.336076], [0.0]]), torch.tensor([0.9881461, 0.01185385]), torch.tensor([1.0]), 0.01)]
    C0 = torch.tensor([[5.0, 0.0], [0.0, 5.0], [3.0, 3.0]])
    b0 = torch.exp(-C0).sum(0)
    cases.append((C0, torch.full((3,), float(b0.sum()) / 3), b0, 1.0))
    for C0, a0, b0, eps in cases:
        C, a, b, ns, ms = _trap_batch(B, N, M, C0, a0, b0)
        out = O.sinkhorn(
            C.to(DEVICE),
            a.to(DEVICE),
            b.to(DEVICE),
            eps=eps,
            n_sizes=ns.to(DEVICE),
            m_sizes=ms.to(DEVICE),
            return_plan=True,
            backend="triton",
        )
        P, _ = pot_sinkhorn_log(
            a0.double().numpy(),
            b0.double().numpy(),
            C0.double().numpy(),
            eps,
            numItermax=3000,
            stopThr=1e-12,
            log=True,
            warn=False,
        )
        n, m = C0.shape
        assert out.n_iters[0] >= 1
        torch.testing.assert_close(out.plan[0, :n, :m].cpu().double(), torch.from_numpy(P), rtol=0, atol=5e-5)
        torch.testing.assert_close(out.plan[0, :n, :m].sum(1).cpu().double(), a0.double(), rtol=0, atol=5e-5)


def test_sinkhorn_distance_triton_with_one_target_point_is_the_transport_cost():
    # M = 1: OT_eps = <a, C> = 0.3 * 3^2 = 2.7 (was 0.0061)
    got = O.sinkhorn_distance(
        torch.tensor([[0.0], [3.0]], device=DEVICE),
        torch.tensor([[0.0]], device=DEVICE),
        eps=0.01,
        a=torch.tensor([0.7, 0.3], device=DEVICE),
        b=torch.tensor([1.0], device=DEVICE),
        debias=False,
        backend="triton",
    )
    torch.testing.assert_close(got.value.cpu(), torch.tensor(2.7), rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps_scaling", [0.9, 0.5])
def test_sinkhorn_triton_newton_step_stays_finite(eps_scaling):
    C = torch.tensor([[0.0834], [0.001]], device=DEVICE)
    a, b = torch.tensor([0.9881461, 0.01185385], device=DEVICE), torch.tensor([1.0], device=DEVICE)
    out = O.sinkhorn(
        C, a, b, eps=1e-4, tol=1e-6, eps_scaling=eps_scaling, newton_steps=1, return_plan=True, backend="triton"
    )
    assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all() and torch.isfinite(out.err)
    torch.testing.assert_close(out.plan[:, 0].cpu().double(), a.cpu().double(), rtol=0, atol=5e-4)


def test_sinkhorn_triton_bad_and_infinite_inputs():
    with pytest.raises(ValueError, match="a and b must have a positive total mass"):
        O.sinkhorn(
            torch.rand(5, 6, device=DEVICE),
            torch.zeros(5, device=DEVICE),
            torch.zeros(6, device=DEVICE),
            eps=0.1,
            backend="triton",
        )
    C = torch.rand(4, 5, device=DEVICE)
    C[1, 2] = -float("inf")
    with pytest.raises(ValueError, match="cost contains -inf costs"):
        O.sinkhorn(C, eps=0.1, n_iters=5, backend="triton")
    with pytest.raises(ValueError, match=r"cost contains \+inf scores"):
        O.sinkhorn(-C, eps=0.1, n_iters=5, scores=True, backend="triton")
    C[1, 2] = float("nan")
    with pytest.raises(ValueError, match="cost contains NaN"):
        O.sinkhorn(C, eps=0.1, n_iters=5, backend="triton")
    x = torch.rand(5, 2, device=DEVICE)
    x[3, 1] = float("inf")
    with pytest.raises(ValueError, match="x and y must not contain NaN or inf"):
        O.sinkhorn_distance(x, torch.rand(4, 2, device=DEVICE), eps=0.1, backend="triton")


def test_normalize_triton_lines_of_only_minus_inf_carry_no_mass():
    # a dead column (level 0) and a dead row (level 1): bias -inf, the others those of the matrix without them
    S = torch.randn(2, 7, 5, dtype=torch.float64)
    S[0, :, 1] = -float("inf")
    S[1, 3, :] = -float("inf")
    out = O.sinkhorn_normalize(S.to(DEVICE), n_iters=4, backend="triton")
    keep_c, keep_r = [0, 2, 3, 4], [0, 1, 2, 4, 5, 6]
    for level, sub in ((0, S[0][:, keep_c]), (1, S[1][keep_r])):
        K = torch.exp(sub - sub.max())  # UCoFiA's probability-domain procedure in float64
        bw = 1 / K.sum(0)
        for _ in range(4):
            aw = 1 / (K @ bw)
            bw = 1 / (aw @ K)
        row, col = torch.log_softmax(aw.log(), 0), torch.log_softmax(bw.log(), 0)
        got_r, got_c = out.row_bias[level].cpu(), out.col_bias[level].cpu()
        if level == 0:
            got_c, dead = got_c[keep_c], got_c[1]
        else:
            got_r, dead = got_r[keep_r], got_r[3]
        torch.testing.assert_close(got_r, row, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got_c, col, rtol=1e-9, atol=1e-10)
        assert dead == -float("inf")
