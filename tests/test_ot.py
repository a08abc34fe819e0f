"""ot family: batched log-domain Sinkhorn vs POT (sinkhorn_log / sinkhorn / emd2) and the PyTorch reference,
UCoFiA's normalisation vs its probability-domain procedure, the peers' column normalisers vs their formulas;
opcheck, gradcheck, torch.compile, bad input. Triton kernels: tests/test_ot_triton.py."""

import math

import numpy as np
import pytest
import torch

from alignops import ot as O
from alignops.reference import ot as R

ot = pytest.importorskip("ot")
from ot.bregman import sinkhorn_log as pot_sinkhorn_log  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    """Both compiled copies of the vectorised CPU kernel (AVX2+FMA and portable)."""
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


def pot_potentials(C, a, b, eps, n_iters):
    """POT's sinkhorn_log on one matrix in fp64, fixed iterations: (f, g) = eps * (log_u, log_v)."""
    _, log = pot_sinkhorn_log(
        a.double().numpy(),
        b.double().numpy(),
        C.double().numpy(),
        eps,
        numItermax=n_iters,
        stopThr=0.0,
        log=True,
        warn=False,
    )
    return torch.from_numpy(eps * log["log_u"]), torch.from_numpy(eps * log["log_v"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 47, 123), (1, 130, 5)])
def test_sinkhorn_matches_pot_sinkhorn_log(cpu_capability, dtype, backend, shape):
    B, N, M = shape
    C = torch.rand(B, N, M, dtype=torch.float64) * 3
    a = torch.rand(B, N, dtype=torch.float64) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = torch.rand(B, M, dtype=torch.float64) + 0.1
    b = b / b.sum(-1, keepdim=True)
    eps = 0.2
    out = O.sinkhorn(C.to(dtype), a.to(dtype), b.to(dtype), eps=eps, n_iters=40, backend=backend, return_plan=True)
    for p in range(B):
        f, g = pot_potentials(C[p], a[p], b[p], eps, 40)
        torch.testing.assert_close(out.f[p].double(), f, **TOL[dtype])
        torch.testing.assert_close(out.g[p].double(), g, **TOL[dtype])
        P = ot.sinkhorn(
            a[p].numpy(), b[p].numpy(), C[p].numpy(), eps, method="sinkhorn_log", numItermax=40, stopThr=0.0, warn=False
        )
        torch.testing.assert_close(out.plan[p].double(), torch.from_numpy(P), **TOL[dtype])
        # the reported error is the L1 column violation of the returned plan
        col = out.plan[p].double().sum(0)
        torch.testing.assert_close(out.err[p].double(), (col - b[p]).abs().sum(), rtol=1e-3, atol=1e-6)
    assert (out.n_iters == 40).all()


def test_native_matches_reference_with_scores_and_ragged(cpu_capability):
    B, N, M = 5, 33, 21
    S = torch.randn(B, N, M, dtype=torch.float64)
    ns = torch.tensor([33, 1, 17, 0, 30])
    ms = torch.tensor([21, 21, 3, 4, 1])
    got = O.sinkhorn(S, eps=0.1, n_iters=500, tol=1e-9, scores=True, n_sizes=ns, m_sizes=ms, return_plan=True)
    ref = R.sinkhorn(
        S,
        *[O.solver._weights(None, s, B, K, S, n) for s, K, n in ((ns, N, "a"), (ms, M, "b"))],
        ns,
        ms,
        [],
        0.1,
        500,
        1e-9,
        True,
    )
    torch.testing.assert_close(got.f, ref[0], **TOL[torch.float64])
    torch.testing.assert_close(got.g, ref[1], **TOL[torch.float64])
    assert torch.equal(got.n_iters, ref[2])
    for p in range(B):
        n, m = int(ns[p]), int(ms[p])
        assert (got.f[p, n:] == 0).all() and (got.g[p, m:] == 0).all() and (got.plan[p, n:] == 0).all()
        if n == 0 or m == 0:
            assert got.n_iters[p] == 0
            continue
        # each ragged problem is POT's problem on its own block (cost = -scores)
        f, g = pot_potentials(
            -S[p, :n, :m],
            torch.full((n,), 1 / n, dtype=torch.float64),
            torch.full((m,), 1 / m, dtype=torch.float64),
            0.1,
            int(got.n_iters[p]),
        )
        torch.testing.assert_close(got.f[p, :n], f, **TOL[torch.float64])
        torch.testing.assert_close(got.g[p, :m], g, **TOL[torch.float64])
        assert got.err[p] <= 1e-9


def test_per_problem_convergence_stops_each_problem():
    # an easy and a hard problem in one batch: the easy one stops first, each meets tol on its own
    C = torch.stack([torch.rand(40, 40), 3 * torch.rand(40, 40)]).double()
    out = O.sinkhorn(C, eps=0.05, n_iters=20000, tol=1e-7)
    assert out.n_iters[0] < out.n_iters[1] < 20000
    assert (out.err <= 1e-7).all()
    P = O.sinkhorn(C, eps=0.05, n_iters=20000, tol=1e-7, return_plan=True).plan
    torch.testing.assert_close(P.sum(1), torch.full((2, 40), 1 / 40, dtype=torch.float64), rtol=0, atol=1e-7)


def test_small_eps_approaches_emd2():
    x, y = torch.rand(30, 2, dtype=torch.float64), torch.rand(30, 2, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    w = torch.full((30,), 1 / 30, dtype=torch.float64)
    out = O.sinkhorn(C, eps=1e-3, n_iters=20000, tol=1e-9, eps_scaling=0.7, return_plan=True)
    exact = ot.emd2(w.numpy(), w.numpy(), C.numpy())
    assert abs(float((out.plan * C).sum()) - exact) < 5e-3 * max(exact, 1e-3)


@pytest.mark.parametrize("eps", [1, 1e-1, 1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("scale", [1e-2, 1, 1e2])
def test_fp32_stays_finite(eps, scale):
    C = torch.rand(4, 24, 31) * scale
    for scaling in (None, 0.5):
        out = O.sinkhorn(C, eps=eps, n_iters=100, eps_scaling=scaling, return_plan=True)
        assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all() and torch.isfinite(out.plan).all()
        assert torch.isfinite(out.err).all()
        # the rows are exact after the f update, up to the fp32 rounding of f / eps (f ~ scale)
        torch.testing.assert_close(
            out.plan.sum(-1), torch.full((4, 24), 1 / 24), rtol=1e-3 + 1e-7 * scale / eps, atol=1e-5
        )


def test_pot_exp_domain_underflows_where_log_domain_does_not():
    C = torch.rand(20, 20, dtype=torch.float32) * 1.0
    w = np.full(20, 1 / 20, dtype=np.float32)
    with np.errstate(all="ignore"), pytest.warns(UserWarning):
        P = ot.sinkhorn(w, w, C.numpy(), 1e-3, numItermax=50)
    # POT's plan silently loses its mass (or turns non-finite): K = exp(-C / eps) underflows
    assert not np.isfinite(P).all() or abs(P.sum() - 1) > 0.5
    out = O.sinkhorn(C, eps=1e-3, n_iters=50, return_plan=True)
    assert torch.isfinite(out.plan).all() and out.plan.sum() > 0.99


def test_log_domain_false_is_the_classical_iteration():
    C = torch.rand(2, 6, 8, dtype=torch.float64)
    got = O.sinkhorn(C, eps=0.5, n_iters=30, log_domain=False)
    ref = O.sinkhorn(C, eps=0.5, n_iters=30)
    torch.testing.assert_close(got.f, ref.f)
    torch.testing.assert_close(got.g, ref.g)


def test_eps_scaling_reaches_tolerance_faster():
    x, y = torch.rand(4, 48, 2, dtype=torch.float64), torch.rand(4, 48, 2, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    plain = O.sinkhorn(C, eps=1e-2, n_iters=5000, tol=1e-6)
    scaled = O.sinkhorn(C, eps=1e-2, n_iters=5000, tol=1e-6, eps_scaling=0.5)
    assert (scaled.err <= 1e-6).all() and (plain.err <= 1e-6).all()
    assert scaled.n_iters.sum() < plain.n_iters.sum()
    torch.testing.assert_close(
        scaled.f - scaled.f.mean(-1, keepdim=True), plain.f - plain.f.mean(-1, keepdim=True), rtol=0, atol=1e-4
    )


# ---- gradients -------------------------------------------------------------------------------------


def _value(out, a, b):
    return (a * out.f).sum() + (b * out.g).sum()


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_envelope_gradient_of_the_dual_value_is_the_plan(backend):
    C = torch.rand(3, 9, 11, dtype=torch.float64, requires_grad=True)
    a = torch.full((9,), 1 / 9, dtype=torch.float64)
    b = torch.full((11,), 1 / 11, dtype=torch.float64)
    out = O.sinkhorn(C, eps=0.1, n_iters=3000, tol=1e-12, backend=backend)
    _value(out, a, b).backward()
    for p in range(3):
        P = ot.sinkhorn(
            a.numpy(), b.numpy(), C[p].detach().numpy(), 0.1, method="sinkhorn_log", numItermax=3000, stopThr=1e-13
        )
        torch.testing.assert_close(C.grad[p], torch.from_numpy(P), rtol=1e-6, atol=1e-9)


def test_envelope_gradient_on_a_ragged_batch_with_large_padding():
    # padding is never read by the solver; its (huge negative) costs must not leak into the gradient
    C = torch.rand(2, 6, 7, dtype=torch.float64)
    C[1, 4:, :] = -1e4
    C[1, :, 5:] = -1e4
    C.requires_grad_(True)
    ns, ms = torch.tensor([6, 4]), torch.tensor([7, 5])
    out = O.sinkhorn(C, eps=0.1, n_iters=2000, tol=1e-12, n_sizes=ns, m_sizes=ms, return_plan=True)
    a = torch.tensor([[1 / 6] * 6, [0.25] * 4 + [0, 0]], dtype=torch.float64)
    b = torch.tensor([[1 / 7] * 7, [0.2] * 5 + [0, 0]], dtype=torch.float64)
    ((a * out.f).sum() + (b * out.g).sum()).backward()
    assert torch.isfinite(C.grad).all()
    torch.testing.assert_close(C.grad, out.plan.detach(), rtol=1e-8, atol=1e-12)


def test_envelope_gradient_with_scores_is_minus_the_plan():
    S = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    out = O.sinkhorn(S, eps=0.2, n_iters=2000, tol=1e-12, scores=True, return_plan=True)
    ((out.f / 5).sum() + (out.g / 8).sum()).backward()
    torch.testing.assert_close(S.grad, -out.plan.detach(), rtol=1e-8, atol=1e-12)


def test_envelope_value_gradcheck():
    a = torch.full((2, 5), 0.2, dtype=torch.float64)
    b = torch.full((2, 6), 1 / 6, dtype=torch.float64)

    def value(C):
        return _value(O.sinkhorn(C, eps=0.3, n_iters=5000, tol=1e-13), a, b)

    C = torch.rand(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(value, (C,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("scores", [False, True])
def test_implicit_gradient_gradcheck_on_the_plan(scores):
    w = torch.randn(2, 5, 7, dtype=torch.float64)

    def loss(C):
        out = O.sinkhorn(C, eps=0.3, n_iters=5000, tol=1e-13, grad="implicit", scores=scores, return_plan=True)
        return (out.plan * w).sum() + (out.f[:, :, None] + out.g[:, None, :]).pow(2).sum()

    C = torch.rand(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (C,), eps=1e-6, atol=1e-6)


def test_implicit_gradient_through_the_marginals():
    # a = softmax(theta), b = softmax(phi) keep the masses equal under gradcheck's perturbations
    C = torch.rand(2, 5, 6, dtype=torch.float64)
    w = torch.randn(2, 5, 6, dtype=torch.float64)

    def loss(theta, phi):
        out = O.sinkhorn(
            C,
            torch.softmax(theta, -1),
            torch.softmax(phi, -1),
            eps=0.3,
            n_iters=5000,
            tol=1e-13,
            grad="implicit",
            return_plan=True,
        )
        return (out.plan * w).sum()

    theta = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (theta, phi), eps=1e-6, atol=1e-6)


def test_implicit_matches_unrolled_at_convergence():
    C = torch.rand(2, 6, 5, dtype=torch.float64)
    w = torch.randn(2, 6, 5, dtype=torch.float64)
    grads = []
    for grad in ("implicit", "unrolled"):
        x = C.clone().requires_grad_(True)
        out = O.sinkhorn(x, eps=0.5, n_iters=400, grad=grad, return_plan=True)
        (out.plan * w).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


def test_unrolled_gradcheck():
    def loss(C):
        out = O.sinkhorn(C, eps=0.5, n_iters=7, grad="unrolled", return_plan=True)
        return out.f.sum() + (out.plan**2).sum()

    C = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (C,))


# ---- op-level checks -------------------------------------------------------------------------------


def _op_args(dtype=torch.float32, tol=1e-6):
    B, N, M = 3, 6, 5
    C = torch.rand(B, N, M, dtype=dtype)
    return (
        C,
        torch.full((B, N), 1 / N, dtype=dtype),
        torch.full((B, M), 1 / M, dtype=dtype),
        torch.tensor([6, 4, 6]),
        torch.tensor([5, 5, 2]),
        [1.0, 0.5],
        0.2,
        50,
        tol,
        False,
    )


def test_opcheck():
    torch.library.opcheck(torch.ops.alignops.sinkhorn.default, _op_args())
    args = list(_op_args(torch.float64))
    args[0] = args[0].requires_grad_(True)
    torch.library.opcheck(torch.ops.alignops.sinkhorn.default, tuple(args))
    S = torch.randn(2, 9, 4)
    torch.library.opcheck(torch.ops.alignops.sinkhorn_normalize_pass.default, (S, torch.randn(2, 4), 0.5, True))
    torch.library.opcheck(torch.ops.alignops.sinkhorn_normalize_pass.default, (S, torch.zeros(2, 4), 1.0, False))


def test_torch_compile_fullgraph():
    def fn(C):
        out = O.sinkhorn(C, eps=0.2, n_iters=30)
        return out.f, out.g

    C = torch.rand(4, 8, 9)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(C)
    exp = fn(C)
    torch.testing.assert_close(got[0], exp[0])
    torch.testing.assert_close(got[1], exp[1])


def test_bad_input():
    C = torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match="eps must be a finite value > 0"):
        O.sinkhorn(C, eps=-0.1)
    with pytest.raises(ValueError, match=r"eps must be a Python float, got a tensor tensor\(0.1000\)"):
        O.sinkhorn(C, eps=torch.tensor(0.1))
    with pytest.raises(ValueError, match="same total mass"):
        O.sinkhorn(C, torch.full((4,), 0.25), torch.full((5,), 0.5), eps=0.1)
    with pytest.raises(ValueError, match=r"b must have shape \[B, M\]"):
        O.sinkhorn(C, None, torch.full((6,), 1 / 6), eps=0.1)
    with pytest.raises(ValueError, match="shape \\[B, N, M\\]"):
        O.sinkhorn(torch.rand(2, 3, 4, 5), eps=0.1)
    bad = C.clone()
    bad[1, 2, 3] = float("nan")
    for backend in ("native", "torch"):
        with pytest.raises(ValueError, match="cost contains NaN"):
            O.sinkhorn(bad, eps=0.1, n_iters=3, backend=backend)
    with pytest.raises(ValueError, match="non-negative"):
        O.sinkhorn(C, torch.tensor([0.5, 0.5, 0.5, -0.5]), None, eps=0.1)
    for backend in ("native", "torch"):  # the op's size check, before the masses are read
        with pytest.raises(ValueError, match=r"n_sizes\[1\] = 9 must lie in \[0, 4\]"):
            O.sinkhorn(C, eps=0.1, n_sizes=torch.tensor([4, 9]), backend=backend)
        with pytest.raises(ValueError, match="n_iters must be >= 0, got -1"):
            O.sinkhorn(C, eps=0.1, n_iters=-1, backend=backend)
        with pytest.raises(ValueError, match=r"a must be a 2-D tensor of shape \[B, N\], got shape \[2, 1, 4\]"):
            O.sinkhorn(C, torch.full((2, 1, 4), 0.25), eps=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"a must have shape \[B, N\] = \[2, 4\] \(or \[4\]\), got \[6\]"):
        O.sinkhorn(C, torch.full((6,), 1 / 6), eps=0.1)
    with pytest.raises(ValueError, match="grad must be one of"):
        O.sinkhorn(C, eps=0.1, grad="magic")
    with pytest.raises(ValueError, match="eps_scaling must lie in"):
        O.sinkhorn(C, eps=0.1, eps_scaling=2.0)
    with pytest.raises(ValueError, match="unrolled"):
        O.sinkhorn(C, eps=0.1, grad="unrolled", backend="native")
    args = list(_op_args())
    args[6] = 0.0
    with pytest.raises(ValueError, match="eps must be a finite value > 0"):
        torch.ops.alignops.sinkhorn(*args)
    args = list(_op_args())
    args[3] = torch.tensor([6, 7, 6])
    with pytest.raises(ValueError, match=r"n_sizes\[1\] = 7 must lie in \[0, 6\]"):
        torch.ops.alignops.sinkhorn(*args)


# ---- UCoFiA normalisation and the peers' column normalisers ----------------------------------------


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_normalize_matches_ucofia(cpu_capability, backend, dtype):
    S = torch.randn(3, 101, 37, dtype=torch.float64) * 2
    got = O.sinkhorn_normalize(S.to(dtype), n_iters=4, temperature=0.7, chunk_size=16, backend=backend)
    for level in range(3):
        ra, rb = R.sinkhorn_normalize_ucofia(S[level], 4, temperature=0.7)
        torch.testing.assert_close(got.row_bias[level].double(), ra, **TOL[dtype])
        torch.testing.assert_close(got.col_bias[level].double(), rb, **TOL[dtype])


def test_sinkhorn_normalize_survives_spread_logits():
    S = torch.randn(500, 40) * 60  # spreads over ~400: the probability domain underflows in fp32
    ra, rb = R.sinkhorn_normalize_ucofia(S, 4)
    assert not torch.isfinite(rb).all()
    got = O.sinkhorn_normalize(S, n_iters=4)
    exp = R.sinkhorn_normalize_ucofia(S.double(), 4)  # fp64 does not underflow at this spread
    torch.testing.assert_close(got.col_bias.double(), exp[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.row_bias.double(), exp[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_column_normalisers_match_their_formulas(backend):
    sim = torch.randn(23, 31, dtype=torch.float64)
    bank = torch.randn(57, 31, dtype=torch.float64)
    kw = dict(chunk_size=10, backend=backend)
    torch.testing.assert_close(O.inverted_softmax(sim, bank, temperature=0.1, **kw), R.inverted_softmax(sim, bank, 0.1))
    # the probability form of Smith et al., where it does not overflow
    prob = torch.exp(sim / 0.5) / torch.exp(bank / 0.5).sum(0)
    torch.testing.assert_close(O.inverted_softmax(sim, bank, temperature=0.5, **kw).exp(), prob)
    got = O.qb_norm(sim, bank, temperature=0.1, k=1, **kw)
    torch.testing.assert_close(got, R.qb_norm(sim, bank, 0.1, 1))
    torch.testing.assert_close(O.dual_softmax(sim, temperature=0.05, **kw), R.dual_softmax(sim, 0.05))
    torch.testing.assert_close(O.nnn(sim, bank, k=5, alpha=0.3, chunk_size=10), R.nnn(sim, bank, 5, 0.3))


def test_qb_norm_keeps_raw_scores_outside_the_activation_set():
    bank = torch.zeros(4, 3, dtype=torch.float64)
    bank[:, 0] = 1.0  # every bank query's top-1 is item 0: the activation set is {0}
    sim = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    got = O.qb_norm(sim, bank, temperature=1.0)
    torch.testing.assert_close(got[1], sim[1])
    torch.testing.assert_close(got[0], sim[0] - torch.logsumexp(bank, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_pass_with_an_arbitrary_column_bias(cpu_capability, dtype):
    # the fused sweep assumes the column bias comes from the previous column step; a bias far from that
    # (column 3 at -200) underflows its column sum, and the level is redone in the log domain
    S = torch.randn(2, 45, 20, dtype=dtype)
    col_bias = torch.randn(2, 20, dtype=dtype)
    col_bias[1, 3] = -200.0
    for row_update in (True, False):
        got = torch.ops.alignops.sinkhorn_normalize_pass(S, col_bias, 0.7, row_update)
        exp = R.sinkhorn_normalize_pass(S.double(), col_bias.double(), 0.7, row_update)
        torch.testing.assert_close(got[0].double(), exp[0], **TOL[dtype])
        torch.testing.assert_close(got[1].double(), exp[1], **TOL[dtype])


def test_value_check_ops_are_the_native_kernels_checks():
    """The checks that read values are written once, in C++: the CPU kernels call them, and the ops
    alignops::<op>_check_values (ATen reductions, so any device) serve the Triton and torch backends."""
    for name in ("sinkhorn", "sinkhorn_points", "sinkhorn_normalize_pass"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"alignops::{name}_check_values", "CompositeImplicitAutograd"
        ), name
    C, _, _, ns, ms = _op_args()[:5]
    check = torch.ops.alignops.sinkhorn_check_values
    check(C, ns, ms, False, True)
    check(C[:0], ns[:0], ms[:0], False, True)  # an empty batch
    with pytest.raises(ValueError, match=r"m_sizes\[2\] = 6 must lie in \[0, 5\]"):
        check(C, ns, torch.tensor([5, 5, 6]), False, False)
    with pytest.raises(ValueError, match=r"n_sizes\[0\] = -1 must lie in \[0, 6\]"):
        check(C, torch.tensor([-1, 4, 9]), ms, False, True)
    bad = C.clone()
    bad[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match="cost contains NaN"):
        check(bad, ns, ms, True, True)
    check(bad, ns, ms, False, False)  # scan_cost=False: the sizes only (the native op scans its cost itself)
    bad[1, 2, 3] = -math.inf
    with pytest.raises(ValueError, match=r"cost contains -inf costs: no finite plan exists \(\+inf costs mark"):
        check(bad, ns, ms, False, True)
    check(bad, ns, ms, True, True)  # a -inf score is a forbidden pair
    with pytest.raises(ValueError, match=r"cost contains \+inf scores: no finite plan exists \(-inf scores mark"):
        check(-bad, ns, ms, True, True)
    x, y = torch.rand(2, 5, 3), torch.rand(2, 4, 3)
    full = lambda K: torch.full((2,), K)  # noqa: E731
    torch.ops.alignops.sinkhorn_points_check_values(x, y, full(5), full(4))
    with pytest.raises(ValueError, match=r"m_sizes\[0\] = 5 must lie in \[0, 4\]"):
        torch.ops.alignops.sinkhorn_points_check_values(x, y, full(5), full(5))
    y[1, 3, 2] = -math.inf
    with pytest.raises(ValueError, match="x and y must not contain NaN or inf"):
        torch.ops.alignops.sinkhorn_points_check_values(x, y, full(5), full(4))
    S = torch.randn(2, 5, 4, dtype=torch.float64)
    S[0, 1, 2] = -math.inf  # a pair that never matches
    torch.ops.alignops.sinkhorn_normalize_pass_check_values(S)
    S[1, 0, 0] = math.inf
    with pytest.raises(ValueError, match=r"sim contains \+inf"):
        torch.ops.alignops.sinkhorn_normalize_pass_check_values(S)
    S[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match="sim contains NaN"):
        torch.ops.alignops.sinkhorn_normalize_pass_check_values(S)


def test_normalize_bad_input():
    with pytest.raises(ValueError, match=r"sim must have shape \[N, M\] or \[L, N, M\]"):
        O.sinkhorn_normalize(torch.randn(5))
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        O.sinkhorn_normalize(torch.randn(5, 4), temperature=0.0)
    S = torch.randn(5, 4)
    S[0, 0] = float("nan")
    with pytest.raises(ValueError, match="sim contains NaN"):
        O.sinkhorn_normalize(S, backend="native")
    with pytest.raises(ValueError, match="share the gallery dimension"):
        O.inverted_softmax(torch.randn(3, 4), torch.randn(5, 6))


# ---- sinkhorn_distance -----------------------------------------------------------------------------


def _geomloss(x, y, eps, debias):
    geomloss = pytest.importorskip("geomloss")
    # GeomLoss's p = 2 cost is |x - y|^2 / 2: scaling the points by sqrt(2) gives ours; blur^2 = eps.
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=eps**0.5, debias=debias, scaling=0.995, backend="tensorized")
    return loss(x * 2**0.5, y * 2**0.5)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("debias", [True, False])
def test_sinkhorn_distance_matches_geomloss(cpu_capability, backend, debias):
    x = torch.rand(2, 30, 3, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(2, 25, 3, dtype=torch.float64) + 0.3).requires_grad_(True)
    got = O.sinkhorn_distance(x, y, eps=0.05, debias=debias, n_iters=5000, tol=1e-12, backend=backend)
    x2, y2 = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    exp = _geomloss(x2, y2, 0.05, debias)
    # GeomLoss stops after its epsilon annealing (scaling 0.995) plus one extrapolation: ~1e-5 from the fixed point
    torch.testing.assert_close(got.value, exp.detach(), rtol=1e-4, atol=1e-7)
    got.value.sum().backward()
    exp.sum().backward()
    # GeomLoss's gradient is that of its last extrapolation step (~5e-4 off the finite differences, which ours
    # match to 1e-10: test_sinkhorn_distance_is_zero_on_identical_clouds_and_gradchecks)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=2e-3)
    torch.testing.assert_close(y.grad, y2.grad, rtol=0, atol=2e-3)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_sinkhorn_points_matches_the_matrix_solver_and_reference(cpu_capability, p):
    x, y = torch.rand(3, 37, 5, dtype=torch.float64), torch.rand(3, 29, 5, dtype=torch.float64)
    C = torch.cdist(x, y) ** p
    out = O.sinkhorn_distance(x, y, eps=0.1, p=p, debias=False, n_iters=60)
    mat = O.sinkhorn(C, eps=0.1, n_iters=60)
    a, b = torch.full((3, 37), 1 / 37, dtype=torch.float64), torch.full((3, 29), 1 / 29, dtype=torch.float64)
    value = (a * (mat.f - 0.1 * a.log())).sum(-1) + (b * (mat.g - 0.1 * b.log())).sum(-1)
    torch.testing.assert_close(out.value, value, rtol=1e-10, atol=1e-12)
    if p == 2.0:
        torch.testing.assert_close(out.value, R.entropic_ot(C, a, b, 0.1, 60), rtol=1e-10, atol=1e-12)
    f32 = O.sinkhorn_distance(x.float(), y.float(), eps=0.1, p=p, debias=False, n_iters=60)
    torch.testing.assert_close(f32.value.double(), value, rtol=1e-4, atol=1e-5)


def test_sinkhorn_distance_is_zero_on_identical_clouds_and_gradchecks():
    x = torch.rand(12, 2, dtype=torch.float64)
    assert abs(float(O.sinkhorn_distance(x, x.clone(), eps=0.1, tol=1e-12).value)) < 1e-10
    y = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)

    def div(u, v):
        return O.sinkhorn_distance(u, v, eps=0.2, p=2, n_iters=5000, tol=1e-13).value

    assert torch.autograd.gradcheck(div, (xr, y), eps=1e-6, atol=1e-6)


def test_sinkhorn_points_opcheck_and_bad_input():
    B, N, M, d = 2, 5, 4, 3
    args = (
        torch.rand(B, N, d),
        torch.rand(B, M, d),
        torch.full((B, N), 1 / N),
        torch.full((B, M), 1 / M),
        torch.tensor([5, 3]),
        torch.tensor([4, 4]),
        2.0,
        [1.0],
        0.2,
        20,
        1e-6,
    )
    torch.library.opcheck(torch.ops.alignops.sinkhorn_points.default, args)
    with pytest.raises(ValueError, match="p must be a finite value >= 1"):
        torch.ops.alignops.sinkhorn_points(*args[:6], 0.5, *args[7:])
    with pytest.raises(ValueError, match=r"y must have shape \[B, M, d\]"):
        torch.ops.alignops.sinkhorn_points(args[0], torch.rand(B, M, d + 1), *args[2:])
    with pytest.raises(ValueError, match=r"x and y must have shapes \[B, N, d\] and \[B, M, d\]"):
        O.sinkhorn_distance(torch.rand(2, 5, 3), torch.rand(4, 2), eps=0.1)
    for backend in ("native", "torch"):  # B and d agree: the op's check, whichever backend runs
        with pytest.raises(ValueError, match=r"y must have shape \[B, M, d\] with B = 2 and d = 3, got \[2, 4, 2\]"):
            O.sinkhorn_distance(torch.rand(2, 5, 3), torch.rand(2, 4, 2), eps=0.1, backend=backend)
        with pytest.raises(ValueError, match=r"y must have shape \[B, M, d\] with B = 2 and d = 3, got \[1, 4, 3\]"):
            O.sinkhorn_distance(torch.rand(2, 5, 3), torch.rand(1, 4, 3), eps=0.1, backend=backend)
    for backend in ("native", "torch"):  # the op's argument checks, whichever backend runs
        with pytest.raises(ValueError, match="eps must be a finite value > 0"):
            O.sinkhorn_distance(torch.rand(5, 3), torch.rand(4, 3), eps=0.0, backend=backend)
        with pytest.raises(ValueError, match="p must be a finite value >= 1, got inf"):
            O.sinkhorn_distance(torch.rand(5, 3), torch.rand(4, 3), eps=0.1, p=math.inf, backend=backend)
        with pytest.raises(ValueError, match="n_iters must be >= 0, got -1"):
            O.sinkhorn_distance(torch.rand(5, 3), torch.rand(4, 3), eps=0.1, n_iters=-1, backend=backend)
    bad = torch.rand(5, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="must not contain NaN"):
        O.sinkhorn_distance(bad, torch.rand(4, 3), eps=0.1, backend="native")


def test_eps_1e_3_reaches_1e_4_within_300_iterations_at_cost_range_0_1():
    # range / eps = 100: met with epsilon scaling in fp32 (at range / eps = 1000 it is not; see the report)
    x, y = torch.rand(8, 64, 2), torch.rand(8, 64, 2)
    for C in (torch.rand(8, 64, 64) * 0.1, 0.1 * torch.cdist(x, y) ** 2):
        out = O.sinkhorn(C, eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.7)
        assert (out.err <= 1e-4).all() and (out.n_iters < 300).all()


def test_half_precision_costs_are_solved_in_float32():
    C = torch.rand(2, 9, 7).to(torch.bfloat16)
    got = O.sinkhorn(C, eps=0.1, n_iters=30)
    exp = O.sinkhorn(C.float(), eps=0.1, n_iters=30)
    assert got.f.dtype == torch.float32
    torch.testing.assert_close(got.f, exp.f, rtol=0, atol=0)


# ---- silent wrong answers found by peers' suites and a fuzz campaign (issue 13, items 1 and 3) -------------


def _pot_plan(C, a, b, eps):
    """POT's sinkhorn_log run to convergence in float64 (3000 iterations at most): (plan, f, g)."""
    P, log = pot_sinkhorn_log(
        a.double().numpy(),
        b.double().numpy(),
        C.double().numpy(),
        eps,
        numItermax=3000,
        stopThr=1e-12,
        log=True,
        warn=False,
    )
    return torch.from_numpy(P), torch.from_numpy(eps * log["log_u"]), torch.from_numpy(eps * log["log_v"])


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_convergence_is_checked_only_after_a_full_update(backend):
    # The column sums of exp(-C / eps) already equal b: a check before the first f update stopped at
    # iteration 0 with f = g = 0 and the rows never fitted (plan [[0], [1]] for a = [0.988, 0.012]).
    C = torch.tensor([[8.336076], [0.0]])
    a, b = torch.tensor([0.9881461, 0.01185385]), torch.tensor([1.0])
    out = O.sinkhorn(C, a, b, eps=0.01, return_plan=True, backend=backend)
    P, _, _ = _pot_plan(C, a, b, 0.01)
    assert out.n_iters >= 1
    # fp32 potentials near 8.3 with eps = 0.01: their rounding moves P by ~1e-5 relative
    torch.testing.assert_close(out.plan.double(), P, rtol=0, atol=5e-5)
    torch.testing.assert_close(out.plan[:, 0].double(), a.double(), rtol=0, atol=5e-5)  # M = 1: P = a
    # the gauge-free closed form of M = 1: f_i + g = C_i + eps log a_i
    torch.testing.assert_close((out.f + out.g).double(), C[:, 0].double() + 0.01 * a.double().log(), rtol=0, atol=2e-6)
    # b = the column sums of exp(-C): the same trap on a 3 x 2 problem (row sums were 1.007, 1.007, 0.0996)
    C = torch.tensor([[5.0, 0.0], [0.0, 5.0], [3.0, 3.0]])
    b = torch.exp(-C).sum(0)
    a = torch.full((3,), float(b.sum()) / 3)
    out = O.sinkhorn(C, a, b, eps=1.0, return_plan=True, backend=backend)
    P, _, _ = _pot_plan(C, a, b, 1.0)
    torch.testing.assert_close(out.plan.sum(1).double(), a.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.plan.double(), P, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_sinkhorn_distance_with_one_target_point_is_the_transport_cost(backend):
    # M = 1: the plan is a, so OT_eps = <a, C> + eps KL(a | a) = 0.3 * 3^2 = 2.7 (was 0.0061: stopped at 0)
    got = O.sinkhorn_distance(
        torch.tensor([[0.0], [3.0]]),
        torch.tensor([[0.0]]),
        eps=0.01,
        a=torch.tensor([0.7, 0.3]),
        b=torch.tensor([1.0]),
        debias=False,
        backend=backend,
    )
    torch.testing.assert_close(got.value, torch.tensor(2.7), rtol=1e-5, atol=0)
    assert got.n_iters >= 1


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_zero_mass_marginals_raise(backend):
    C = torch.rand(5, 6)
    with pytest.raises(ValueError, match="a and b must have a positive total mass"):
        O.sinkhorn(C, torch.zeros(5), torch.zeros(6), eps=0.1, backend=backend)
    with pytest.raises(ValueError, match="a and b must have a positive total mass"):
        O.sinkhorn_distance(
            torch.rand(5, 2), torch.rand(6, 2), eps=0.1, a=torch.zeros(5), b=torch.zeros(6), backend=backend
        )
    # a ragged batch: only the non-empty problems need mass
    C = torch.rand(2, 5, 6, dtype=torch.float64)
    a = torch.tensor([[0.2] * 5, [0.0] * 5], dtype=torch.float64)
    b = torch.tensor([[1 / 6] * 6, [0.0] * 6], dtype=torch.float64)
    out = O.sinkhorn(C, a, b, eps=0.1, n_sizes=torch.tensor([5, 0]), m_sizes=torch.tensor([6, 6]), backend=backend)
    assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all() and out.n_iters[1] == 0


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_infinite_costs_forbidden_pairs_and_points(backend):
    C = torch.rand(4, 5, dtype=torch.float64)
    bad = C.clone()
    bad[1, 2] = -math.inf
    with pytest.raises(ValueError, match="cost contains -inf costs"):
        O.sinkhorn(bad, eps=0.1, n_iters=5, backend=backend)
    with pytest.raises(ValueError, match=r"cost contains \+inf scores"):
        O.sinkhorn(-bad, eps=0.1, n_iters=5, scores=True, backend=backend)
    # +inf costs (-inf scores) are forbidden pairs, as documented: POT's plan, 0 on them
    C[0, :3] = math.inf
    C[2, 4] = math.inf
    P, _, _ = _pot_plan(C, torch.full((4,), 0.25), torch.full((5,), 0.2), 0.1)
    for cost, scores in ((C, False), (-C, True)):
        out = O.sinkhorn(cost, eps=0.1, n_iters=5000, tol=1e-12, scores=scores, return_plan=True, backend=backend)
        torch.testing.assert_close(out.plan, P, rtol=1e-6, atol=1e-10)
        assert (out.plan[0, :3] == 0).all() and out.plan[2, 4] == 0
    x, y = torch.rand(5, 2), torch.rand(4, 2)
    for value in (math.inf, -math.inf, math.nan):
        xb = x.clone()
        xb[3, 1] = value
        with pytest.raises(ValueError, match="x and y must not contain NaN or inf"):
            O.sinkhorn_distance(xb, y, eps=0.1, backend=backend)
        with pytest.raises(ValueError, match="x and y must not contain NaN or inf"):
            O.sinkhorn_distance(y, xb, eps=0.1, backend=backend)


def _ucofia_numpy(S, n_iters):
    """UCoFiA's probability-domain procedure in float64 numpy (independent of alignops)."""
    K = np.exp(S - S.max())
    b = 1 / K.sum(0)
    a = np.ones(S.shape[0])
    for _ in range(n_iters):
        a = 1 / (K @ b)
        b = 1 / (a @ K)
    la, lb = np.log(a), np.log(b)
    return la - np.log(np.exp(la).sum()), lb - np.log(np.exp(lb).sum())


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_sinkhorn_normalize_lines_of_only_minus_inf_carry_no_mass(backend):
    # A column (or row) with no finite similarity made every row bias NaN; it now gets bias -inf and the other
    # biases are UCoFiA's on the matrix without it.
    S = torch.randn(2, 7, 5, dtype=torch.float64)
    S[0, :, 1] = -math.inf  # a dead column
    S[1, 3, :] = -math.inf  # a dead row
    S[1, 0, 2] = -math.inf  # a single forbidden pair: an ordinary entry
    out = O.sinkhorn_normalize(S, n_iters=4, backend=backend)
    keep_c = [0, 2, 3, 4]
    row, col = _ucofia_numpy(S[0][:, keep_c].numpy(), 4)
    torch.testing.assert_close(out.row_bias[0], torch.from_numpy(row), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.col_bias[0, keep_c], torch.from_numpy(col), rtol=1e-9, atol=1e-10)
    assert out.col_bias[0, 1] == -math.inf
    keep_r = [0, 1, 2, 4, 5, 6]
    row, col = _ucofia_numpy(S[1][keep_r].numpy(), 4)
    torch.testing.assert_close(out.row_bias[1, keep_r], torch.from_numpy(row), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.col_bias[1], torch.from_numpy(col), rtol=1e-9, atol=1e-10)
    assert out.row_bias[1, 3] == -math.inf
    assert (O.sinkhorn_normalize(torch.full((3, 4), -math.inf), backend=backend).row_bias == -math.inf).all()
    bad = torch.randn(5, 4)
    bad[2, 1] = math.inf
    with pytest.raises(ValueError, match=r"sim contains \+inf"):
        O.sinkhorn_normalize(bad, backend=backend)
