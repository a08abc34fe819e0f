"""Sinkhorn-Newton steps of alignops.ot.sinkhorn (newton_steps=): the eps = 1e-3 target on costs over [0, 1),
agreement with POT run to convergence, ragged batches, both orientations, gradients, bad input."""

import pytest
import torch

from alignops import ot as O

ot = pytest.importorskip("ot")


def _marginal_errors(P, a, b):
    return (P.sum(2) - a).abs().sum(-1), (P.sum(1) - b).abs().sum(-1)


@pytest.mark.parametrize("shape", [(32, 64, 64), (4, 256, 256), (16, 33, 129), (16, 129, 33)])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_eps_1e_3_reaches_1e_4_within_300_iterations_on_costs_over_0_1(shape, backend):
    # The target: cost / eps up to 1000, fp32, epsilon scaling; Sinkhorn alone stalls at 1e-3 here.
    torch.manual_seed(0)
    B, N, M = shape
    C = torch.rand(B, N, M)
    out = O.sinkhorn(
        C, eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.9, newton_steps=10, return_plan=True, backend=backend
    )
    assert (out.n_iters <= 300).all()
    # the error measured here from the returned plan, not the solver's own figure
    rows, cols = _marginal_errors(
        out.plan.double(),
        torch.full((B, N), 1 / N, dtype=torch.float64),
        torch.full((B, M), 1 / M, dtype=torch.float64),
    )
    assert cols.max() <= 1.05e-4 and rows.max() <= 1.05e-4, (rows.max(), cols.max())
    torch.testing.assert_close(out.err.double(), cols, rtol=1e-3, atol=1e-6)
    plain = O.sinkhorn(C, eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.9, backend=backend)
    assert (plain.err > 1e-4).any()  # what the Newton steps are for


def test_squared_euclidean_costs_and_given_marginals():
    torch.manual_seed(1)
    x, y = torch.rand(8, 64, 2), torch.rand(8, 48, 2)
    C = torch.cdist(x, y) ** 2
    a = torch.softmax(torch.randn(8, 64), -1)
    b = torch.softmax(torch.randn(8, 48), -1)
    out = O.sinkhorn(C, a, b, eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.9, newton_steps=10, return_plan=True)
    rows, cols = _marginal_errors(out.plan.double(), a.double(), b.double())
    assert cols.max() <= 1.05e-4 and rows.max() <= 1.05e-4


@pytest.mark.parametrize("shape", [(3, 20, 30), (3, 30, 20)])
def test_newton_converges_to_pots_solution(shape):
    # fp64: POT's sinkhorn_log run to convergence (many iterations) and ours with a few Newton steps agree
    torch.manual_seed(2)
    B, N, M = shape
    C = torch.rand(B, N, M, dtype=torch.float64)
    a, b = torch.full((N,), 1 / N, dtype=torch.float64), torch.full((M,), 1 / M, dtype=torch.float64)
    out = O.sinkhorn(C, eps=0.02, n_iters=60, tol=1e-12, newton_steps=20, return_plan=True)
    assert (out.err <= 1e-12).all() and (out.n_iters <= 60).all()
    for p in range(B):
        P = ot.sinkhorn(
            a.numpy(), b.numpy(), C[p].numpy(), 0.02, method="sinkhorn_log", numItermax=200_000, stopThr=1e-14
        )
        torch.testing.assert_close(out.plan[p], torch.from_numpy(P), rtol=1e-7, atol=1e-12)


def test_ragged_batch_equals_each_problem_alone():
    torch.manual_seed(3)
    C = torch.rand(3, 40, 50, dtype=torch.float64)
    C[1, 25:] = 1e4  # padding values must not matter
    C[2, :, 17:] = -1e4
    ns, ms = torch.tensor([40, 25, 40]), torch.tensor([50, 50, 17])
    kw = dict(eps=1e-2, n_iters=100, tol=1e-9, newton_steps=15)
    got = O.sinkhorn(C, n_sizes=ns, m_sizes=ms, **kw)
    for p in range(3):
        n, m = int(ns[p]), int(ms[p])
        alone = O.sinkhorn(C[p : p + 1, :n, :m], **kw)
        # both stop once their error is <= 1e-9; rounding (padded vs not) moves the last step a little
        assert got.err[p] <= 1e-9 and got.n_iters[p] == alone.n_iters[0]
        torch.testing.assert_close(got.f[p, :n], alone.f[0], rtol=0, atol=1e-8)
        torch.testing.assert_close(got.g[p, :m], alone.g[0], rtol=0, atol=1e-8)
        assert (got.f[p, n:] == 0).all() and (got.g[p, m:] == 0).all()
    # forbidden pairs (+inf costs) inside the blocks do not set the schedule either
    forbidden = C.clone()
    forbidden[0, 0, 0] = float("inf")
    kw = dict(eps=1e-3, scaling=0.9, n_sizes=ns, m_sizes=ms)
    assert O.eps_schedule(forbidden, **kw) == O.eps_schedule(C.clamp(max=1), **kw)
    # epsilon scaling ignores the padding: the batch with its huge padded costs gives the same as without
    kw = dict(eps=1e-3, n_iters=200, tol=1e-9, eps_scaling=0.9, newton_steps=15)
    got = O.sinkhorn(C, n_sizes=ns, m_sizes=ms, **kw)
    assert (got.err <= 1e-9).all()
    clean = O.sinkhorn(torch.where(C.abs() < 1e3, C, 0), n_sizes=ns, m_sizes=ms, **kw)
    assert torch.equal(clean.f, got.f) and torch.equal(clean.n_iters, got.n_iters)


def test_scores_are_negated_costs():
    S = torch.randn(4, 30, 30, dtype=torch.float64)
    kw = dict(eps=1e-3, n_iters=200, tol=1e-10, eps_scaling=0.9, newton_steps=15)
    got = O.sinkhorn(S, scores=True, **kw)
    exp = O.sinkhorn(-S, **kw)
    torch.testing.assert_close(got.f, exp.f, rtol=0, atol=1e-12)


def test_problems_already_converged_take_no_step():
    C = torch.rand(2, 10, 12, dtype=torch.float64)
    C[1] *= 1e-3  # range / eps = 1: Sinkhorn converges in a few iterations
    out = O.sinkhorn(C, eps=1e-3, n_iters=100, tol=1e-8, newton_steps=5)
    plain = O.sinkhorn(C, eps=1e-3, n_iters=95, tol=1e-8)
    assert out.n_iters[1] == plain.n_iters[1] < 95
    torch.testing.assert_close(out.f[1], plain.f[1], rtol=0, atol=0)


def test_zero_mass_entries_and_empty_problems():
    # a zero weight has a -inf potential: Newton must still converge on the rest (0 * -inf is not a value)
    torch.manual_seed(4)
    C = torch.rand(3, 12, 10, dtype=torch.float64)
    a = torch.full((3, 12), 1 / 11, dtype=torch.float64)
    a[:, 3] = 0
    b = torch.full((3, 10), 1 / 10, dtype=torch.float64)
    ns, ms = torch.tensor([12, 0, 12]), torch.tensor([10, 10, 10])
    kw = dict(eps=1e-2, n_iters=60, tol=1e-10, newton_steps=15, n_sizes=ns, m_sizes=ms, return_plan=True)
    out = O.sinkhorn(C, a * (ns > 0)[:, None], b * (ns > 0)[:, None], **kw)
    plain = O.sinkhorn(C, a * (ns > 0)[:, None], b * (ns > 0)[:, None], **dict(kw, newton_steps=0, n_iters=45))
    assert (plain.err[[0, 2]] > 1e-6).all()  # Sinkhorn alone is far from the tolerance here
    assert (out.err[[0, 2]] <= 1e-10).all() and (out.n_iters[[0, 2]] > plain.n_iters[[0, 2]]).all()
    assert out.err[1] == plain.err[1] == 0 and out.n_iters[1] == 0  # the empty problem: untouched
    assert (out.plan[[0, 2], 3] == 0).all() and torch.isfinite(out.g).all()
    rows, cols = _marginal_errors(out.plan[[0, 2]], a[[0, 2]], b[[0, 2]])
    assert rows.max() <= 1e-9 and cols.max() <= 1e-9


def test_empty_batch_and_nothing_to_do():
    empty = O.sinkhorn(torch.rand(0, 4, 5), eps=0.1, n_iters=10, newton_steps=3)
    assert empty.f.shape == (0, 4) and empty.n_iters.shape == (0,)
    C = torch.rand(2, 6, 5, dtype=torch.float64)
    got = O.sinkhorn(C, eps=0.5, n_iters=500, tol=1e-6, newton_steps=3)
    exp = O.sinkhorn(C, eps=0.5, n_iters=497, tol=1e-6)
    assert torch.equal(got.f, exp.f) and torch.equal(got.err, exp.err) and torch.equal(got.n_iters, exp.n_iters)


def test_envelope_gradient_of_the_dual_value_is_the_plan():
    C = torch.rand(3, 24, 20, dtype=torch.float64, requires_grad=True)
    a, b = torch.full((24,), 1 / 24, dtype=torch.float64), torch.full((20,), 1 / 20, dtype=torch.float64)
    out = O.sinkhorn(C, eps=1e-2, n_iters=100, tol=1e-12, eps_scaling=0.8, newton_steps=10, return_plan=True)
    ((a * out.f).sum() + (b * out.g).sum()).backward()
    torch.testing.assert_close(C.grad, out.plan.detach(), rtol=1e-8, atol=1e-12)


def test_implicit_gradient_gradcheck():
    w = torch.randn(2, 6, 5, dtype=torch.float64)

    def loss(C):
        out = O.sinkhorn(C, eps=0.05, n_iters=80, tol=1e-13, newton_steps=20, grad="implicit", return_plan=True)
        return (out.plan * w).sum()

    C = torch.rand(2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (C,), eps=1e-6, atol=1e-6)


def test_fp32_stays_finite_at_extreme_ratios():
    for scale in (1e-2, 1.0, 1e2):
        for eps in (1e-3, 1e-4):
            out = O.sinkhorn(
                torch.rand(4, 24, 24) * scale,
                eps=eps,
                n_iters=100,
                tol=1e-6,
                eps_scaling=0.8,
                newton_steps=10,
                return_plan=True,
            )
            assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all() and torch.isfinite(out.plan).all()
            assert torch.isfinite(out.err).all()


def test_bad_input():
    C = torch.rand(2, 5, 6)
    with pytest.raises(ValueError, match=r"newton_steps must be an int in \[0, n_iters = 10\], got 11"):
        O.sinkhorn(C, eps=0.1, n_iters=10, newton_steps=11)
    with pytest.raises(ValueError, match=r"newton_steps must be an int in \[0, n_iters = 10\], got -1"):
        O.sinkhorn(C, eps=0.1, n_iters=10, newton_steps=-1)
    with pytest.raises(ValueError, match=r"newton_steps must be an int in \[0, n_iters = 10\], got True"):
        O.sinkhorn(C, eps=0.1, n_iters=10, newton_steps=True)
    with pytest.raises(ValueError, match="no unrolled gradient"):
        O.sinkhorn(C, eps=0.1, n_iters=10, newton_steps=2, grad="unrolled")
    with pytest.raises(ValueError, match="no unrolled gradient"):
        O.sinkhorn(C, eps=0.1, n_iters=10, newton_steps=2, log_domain=False)
    with pytest.raises(ValueError, match=r"min\(N, M\) must be <= 4096, got 4097"):
        O.sinkhorn(torch.zeros(1, 4097, 4097), eps=0.1, n_iters=10, newton_steps=2)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("eps_scaling", [0.9, 0.5])
def test_newton_step_stays_finite_when_one_column_leaves_only_the_gauge(backend, eps_scaling):
    # issue 13: M = 1 leaves the Schur complement only its gauge, scaled by a degree of 0; the fp32 rounding of
    # the masses (a sums to 1 - 5e-8) became a step of 1e296 along it: f = -inf, g = +inf, NaN plan and error.
    C = torch.tensor([[0.0834], [0.001]])
    a, b = torch.tensor([0.9881461, 0.01185385]), torch.tensor([1.0])
    out = O.sinkhorn(
        C, a, b, eps=1e-4, tol=1e-6, eps_scaling=eps_scaling, newton_steps=1, return_plan=True, backend=backend
    )
    assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all() and torch.isfinite(out.err)
    # M = 1: the plan is a (closed form); fp32 potentials near 0.1 at eps = 1e-4 round P by ~1e-4 relative
    torch.testing.assert_close(out.plan[:, 0].double(), a.double(), rtol=0, atol=5e-4)
    assert out.err <= 1e-4  # the rounding of fp32 potentials with f / eps ~ 1000
