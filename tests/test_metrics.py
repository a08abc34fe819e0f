"""metrics family on the CPU: bootstrap_confusion (native C++ vs the torch reference), Cohen's kappa / agreement
vs scikit-learn, Spearman / Pearson vs scipy.stats, ECE vs scikit-learn's calibration_curve, ranking metrics,
Elo / Bradley-Terry, conformal p-values + BH vs brute force and scipy, bootstrap semantics, bad input."""

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import cohen_kappa_score

from alignops import metrics as M
from alignops.reference import metrics as ref


def labels(shape, C, skew=None):
    if skew is None:
        return torch.randint(0, C, shape)
    return torch.multinomial(torch.tensor(skew), math.prod(shape), replacement=True).view(shape)


# ---- the hash and the bootstrap_confusion op ----------------------------------------------------------------


def test_hash_matches_known_lowbias32_values():
    # lowbias32 of 1 and 0xdeadbeef as published (C. Wellons, hash-prospector) computed independently in Python ints.
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = torch.tensor([0, 1, 2**31, 0xDEADBEEF, 0xFFFFFFFF], dtype=torch.int64)
    assert ref.mix32(xs).tolist() == [lowbias32(int(x)) for x in xs]


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


# C <= 4 with N < 2^16 takes the vectorised per-code path, the others the scalar histogram.
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "P,N,C,R,shared",
    [
        (3, 47, 2, 17, False),
        (5, 123, 5, 9, True),
        (1, 1, 1, 3, False),
        (40, 31, 3, 4, True),
        (35, 200, 4, 3, False),
        (2, 70000, 2, 2, True),
    ],
)
def test_bootstrap_confusion_native_matches_reference(cpu_capability, dtype, P, N, C, R, shared):
    a = labels((P, N), C).to(dtype)
    b = labels((1 if shared else P, N), C).to(dtype)
    out = torch.ops.alignops.bootstrap_confusion(a, b, C, R, 1234)
    exp = ref.bootstrap_confusion(a, b, C, R, 1234)
    assert out.dtype == torch.int32 and out.shape == (P, R + 1, C, C)
    assert torch.equal(out, exp)
    assert (out.sum((-1, -2)) == N).all()


def test_bootstrap_confusion_sample_row_is_the_plain_confusion_matrix():
    a, b = labels((2, 200), 4), labels((2, 200), 4)
    out = torch.ops.alignops.bootstrap_confusion(a, b, 4, 0, 0)
    for p in range(2):
        exp = np.zeros((4, 4), dtype=np.int64)
        np.add.at(exp, (a[p].numpy(), b[p].numpy()), 1)
        assert out[p, 0].numpy().tolist() == exp.tolist()


def test_bootstrap_resamples_are_seeded_and_look_uniform():
    idx = ref.bootstrap_indices(7, 200, 50)
    assert torch.equal(idx, ref.bootstrap_indices(7, 200, 50))
    assert not torch.equal(idx[1:], ref.bootstrap_indices(8, 200, 50)[1:])
    assert torch.equal(idx[0], torch.arange(50))
    counts = torch.bincount(idx[1:].flatten(), minlength=50).double()
    # 10000 draws over 50 items: each count ~ Binomial(10000, 1/50), sd 14.
    assert (counts - 200).abs().max() < 70
    # distinct resamples (no two identical rows)
    assert len({tuple(r) for r in idx[1:].tolist()}) == 200


def test_bootstrap_confusion_empty():
    a = torch.zeros(0, 10, dtype=torch.int64)
    assert torch.ops.alignops.bootstrap_confusion(a, a, 3, 2, 0).shape == (0, 3, 3, 3)
    e = torch.zeros(2, 0, dtype=torch.int64)
    zeros = torch.zeros(2, 2, 2, 2, dtype=torch.int32)
    assert torch.equal(torch.ops.alignops.bootstrap_confusion(e, e, 2, 1, 0), zeros)


def test_bootstrap_confusion_opcheck_and_compile():
    a, b = labels((3, 20), 3), labels((3, 20), 3)
    torch.library.opcheck(torch.ops.alignops.bootstrap_confusion.default, (a, b, 3, 5, 11))
    f = torch.compile(lambda a, b: torch.ops.alignops.bootstrap_confusion(a, b, 3, 5, 11), fullgraph=True)
    assert torch.equal(f(a, b), torch.ops.alignops.bootstrap_confusion(a, b, 3, 5, 11))


# ---- kappa and agreement vs scikit-learn -------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("C,skew", [(2, None), (5, None), (4, [0.7, 0.2, 0.05, 0.05])])
def test_kappa_matches_sklearn(weights, backend, C, skew):
    a, b = labels((6, 97), C, skew), labels((97,), C, skew)
    b2 = torch.where(torch.rand(6, 97) < 0.6, a, b)  # correlated judges
    got = M.cohen_kappa(a, b2, C, weights=weights, backend=backend).value
    exp = [cohen_kappa_score(a[i].numpy(), b2[i].numpy(), weights=weights, labels=list(range(C))) for i in range(6)]
    np.testing.assert_allclose(got.numpy(), exp, rtol=1e-12, atol=1e-12)
    agree = M.percent_agreement(a, b2, C, backend=backend).value
    np.testing.assert_allclose(agree.numpy(), (a == b2).double().mean(-1).numpy(), rtol=0, atol=1e-15)


def test_kappa_many_judges_against_one_reference_broadcasts():
    judges, human = labels((4, 3, 60), 3), labels((60,), 3)
    k = M.cohen_kappa(judges, human, 3).value
    assert k.shape == (4, 3)
    assert k[2, 1].item() == pytest.approx(cohen_kappa_score(judges[2, 1].numpy(), human.numpy(), labels=[0, 1, 2]))


def test_kappa_degenerate_cases_are_documented_values():
    ones = torch.ones(30, dtype=torch.int64)
    # both raters use one and the same class: 0 / 0, NaN as scikit-learn (or the chosen value)
    with pytest.warns(Warning):
        assert math.isnan(cohen_kappa_score(ones.numpy(), ones.numpy(), labels=[0, 1]))
    assert math.isnan(M.cohen_kappa(ones, ones, 2).value.item())
    assert M.cohen_kappa(ones, ones, 2, undefined=1.0).value.item() == 1.0
    # one constant rater, the other varied: expected = observed disagreement, kappa 0 (scikit-learn too)
    other = labels((30,), 2)
    other[0], other[1] = 0, 1
    assert M.cohen_kappa(ones, other, 2).value.item() == pytest.approx(
        cohen_kappa_score(ones.numpy(), other.numpy(), labels=[0, 1]), abs=1e-15
    )
    assert M.cohen_kappa(ones, other, 2).value.item() == pytest.approx(0.0, abs=1e-15)
    # perfect disagreement on two balanced classes
    a = torch.tensor([0, 1] * 10)
    assert M.cohen_kappa(a, 1 - a, 2).value.item() == pytest.approx(-1.0)
    # no items: undefined
    e = torch.zeros(0, dtype=torch.int64)
    assert math.isnan(M.cohen_kappa(e, e, 2).value.item())
    assert math.isnan(M.percent_agreement(e, e, 2).value.item())


def test_kappa_bootstrap_resamples_are_sklearn_on_the_resampled_items():
    a, b = labels((2, 80), 3), labels((2, 80), 3)
    res = M.cohen_kappa(a, b, 3, weights="linear", n_bootstrap=50, seed=99)
    idx = ref.bootstrap_indices(99, 50, 80)
    for r in (1, 17, 50):
        exp = cohen_kappa_score(a[1, idx[r]].numpy(), b[1, idx[r]].numpy(), weights="linear", labels=[0, 1, 2])
        assert res.resamples[1, r - 1].item() == pytest.approx(exp, abs=1e-12)
    lo, hi = np.percentile(res.resamples.numpy(), [2.5, 97.5], axis=-1)
    np.testing.assert_allclose(res.low.numpy(), lo, rtol=1e-12)
    np.testing.assert_allclose(res.high.numpy(), hi, rtol=1e-12)
    assert (res.low <= res.value).all() and (res.value <= res.high).all()
    same = M.cohen_kappa(a, b, 3, weights="linear", n_bootstrap=50, seed=99, backend="torch")
    assert torch.equal(same.resamples, res.resamples)
    other = M.cohen_kappa(a, b, 3, weights="linear", n_bootstrap=50, seed=100)
    assert not torch.equal(other.resamples, res.resamples)


def test_kappa_ci_covers_truth_in_simulation():
    # judges agreeing with the reference w.p. 0.8 on balanced binary labels: true kappa = 0.6
    truth = labels((400,), 2)
    judges = torch.where(torch.rand(40, 400) < 0.8, truth, 1 - truth)
    res = M.cohen_kappa(judges, truth, 2, n_bootstrap=300, seed=1)
    covered = ((res.low <= 0.6) & (0.6 <= res.high)).double().mean().item()
    assert covered >= 0.8  # nominal 0.95; 40 judges


# ---- correlation, calibration, pairwise ---------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_pearson_match_scipy(ties):
    x = torch.randint(0, 5, (4, 53)).double() if ties else torch.randn(4, 53, dtype=torch.float64)
    y = x + (torch.randint(0, 5, (4, 53)).double() if ties else torch.randn(4, 53, dtype=torch.float64))
    s = M.spearman(x, y).value
    p = M.pearson(x, y).value
    for i in range(4):
        assert s[i].item() == pytest.approx(scipy.stats.spearmanr(x[i], y[i]).statistic, abs=1e-12)
        assert p[i].item() == pytest.approx(scipy.stats.pearsonr(x[i], y[i]).statistic, abs=1e-12)


def test_correlation_fp32_and_constant_input():
    x, y = torch.randn(3, 40), torch.randn(3, 40)
    assert M.pearson(x, y).value.dtype == torch.float32
    np.testing.assert_allclose(
        M.pearson(x, y).value.numpy(), [scipy.stats.pearsonr(x[i], y[i]).statistic for i in range(3)], atol=1e-6
    )
    const = torch.ones(40)
    assert math.isnan(M.pearson(const, y[0]).value.item())
    assert math.isnan(M.spearman(const, y[0]).value.item())
    with pytest.warns(Warning):
        assert math.isnan(scipy.stats.spearmanr(const, y[0]).statistic)


def test_correlation_bootstrap_is_scipy_on_resamples():
    x, y = torch.randn(60, dtype=torch.float64), torch.randn(60, dtype=torch.float64)
    res = M.spearman(x, y, n_bootstrap=20, seed=3)
    idx = ref.bootstrap_indices(3, 20, 60)
    assert res.resamples[4].item() == pytest.approx(scipy.stats.spearmanr(x[idx[5]], y[idx[5]]).statistic, abs=1e-12)


@pytest.mark.parametrize("n_bins", [10, 7])
def test_ece_matches_sklearn_calibration_curve(n_bins):
    p = torch.rand(500, dtype=torch.float64)
    p[:20] = torch.tensor([0.0, 1.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9] * 2 + [0.4] * 4, dtype=torch.float64)
    y = torch.rand(500, dtype=torch.float64) < p * 0.9
    prob_true, prob_pred = calibration_curve(y.numpy(), p.numpy(), n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p.numpy()), minlength=n_bins)
    counts = counts[counts > 0]
    exp = float(np.sum(counts / 500 * np.abs(prob_true - prob_pred)))
    assert M.expected_calibration_error(p, y, n_bins=n_bins).value.item() == pytest.approx(exp, abs=1e-12)


def test_ece_perfect_and_worst():
    p = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert M.expected_calibration_error(p, torch.tensor([True, True, False, False])).value.item() == 0.0
    assert M.expected_calibration_error(p, torch.tensor([False, False, True, True])).value.item() == 1.0


def test_win_rate_reward_and_ranking_accuracy():
    a = torch.tensor([[1.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert M.win_rate(a, b).value.tolist() == [(1 + 0.5 + 0 + 1) / 4, 0.5]
    assert M.reward_accuracy(a, b).value.tolist() == [0.5, 0.0]
    assert M.ranking_accuracy(a, b).value.tolist() == [0.5, 0.0]
    res = M.win_rate(torch.randn(100), torch.randn(100), n_bootstrap=30, seed=2)
    assert res.resamples.shape == (30,) and res.low <= res.value <= res.high


def test_idealized_ranking_accuracy_and_gap():
    ref_c = torch.tensor([-10.0, -10.0, -10.0, -12.0], dtype=torch.float64)
    ref_r = torch.tensor([-11.0, -9.0, -9.0, -10.0], dtype=torch.float64)
    alpha = torch.tensor([0.5, 1.0, 0.51, 0.9], dtype=torch.float64)
    beta = 0.1
    # written out: log-ratio + log(alpha / (1 - alpha)) / beta > 0
    exp = np.mean(
        [
            (c - r + (np.inf if a == 1 else np.log(a / (1 - a)) / beta)) > 0
            for c, r, a in zip(ref_c.tolist(), ref_r.tolist(), alpha.tolist())
        ]
    )
    assert exp == 0.75
    assert M.idealized_ranking_accuracy(ref_c, ref_r, alpha, beta=beta).value.item() == pytest.approx(exp)
    pol_c, pol_r = torch.tensor([-5.0, -6.0, -7.0, -8.0]), torch.tensor([-6.0, -5.0, -8.0, -7.0])
    gap = M.alignment_gap(pol_c, pol_r, ref_c, ref_r, alpha, beta=beta).value.item()
    assert gap == pytest.approx(0.75 - 0.5)


# ---- ratings ------------------------------------------------------------------------------------------------


def test_elo_by_hand():
    w, l = torch.tensor([0, 1]), torch.tensor([1, 0])
    r = M.elo_ratings(w, l, 2, k=32).value
    # game 1: equal ratings, E = 0.5 -> +16 / -16; game 2: player 1 at 984 beats player 0 at 1016
    e = 1 / (1 + 10 ** ((1016 - 984) / 400))
    assert r.tolist() == pytest.approx([1016 - 32 * (1 - e), 984 + 32 * (1 - e)])
    assert r.sum().item() == pytest.approx(2000)


def test_bradley_terry_two_players_closed_form_and_scipy_mle():
    w = torch.tensor([0] * 7 + [1] * 3)
    l = 1 - w
    theta = M.bradley_terry(w, l, 2).value
    assert (theta[0] - theta[1]).item() == pytest.approx(math.log(7 / 3), abs=1e-8)
    g = 300
    strengths = torch.tensor([0.0, 0.5, -1.0, 1.5])
    i, j = torch.randint(0, 4, (g,)), torch.randint(0, 4, (g,))
    keep = i != j
    i, j = i[keep], j[keep]
    i_wins = torch.rand(i.shape) < torch.sigmoid(strengths[i] - strengths[j])
    winners, losers = torch.where(i_wins, i, j), torch.where(i_wins, j, i)
    theta = M.bradley_terry(winners, losers, 4).value.numpy()

    def nll(t):
        t = np.concatenate([[0.0], t])
        d = t[winners.numpy()] - t[losers.numpy()]
        return np.sum(np.logaddexp(0, -d))

    opt = scipy.optimize.minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    opt = np.concatenate([[0.0], opt])
    np.testing.assert_allclose(theta - theta.mean(), opt - opt.mean(), atol=1e-5)
    res = M.bradley_terry(winners, losers, 4, n_bootstrap=20, seed=4)
    assert res.resamples.shape == (4, 20) and (res.low <= res.high).all()


def test_bradley_terry_never_winning_player_and_pseudo_count():
    w, l = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    theta = M.bradley_terry(w, l, 3).value
    assert theta[2].item() == -math.inf
    theta = M.bradley_terry(w, l, 3, pseudo_count=1.0).value
    assert torch.isfinite(theta).all() and theta[0] > theta[1] > theta[2]


# ---- conformal selection --------------------------------------------------------------------------------------


def test_conformal_pvalues_brute_force_and_bh_vs_scipy():
    n, m, c = 200, 80, 0.5
    s_cal = torch.randn(n, dtype=torch.float64).round(decimals=1)  # ties
    y_cal = s_cal + torch.randn(n, dtype=torch.float64)
    s_test = torch.randn(m, dtype=torch.float64).round(decimals=1)
    p = M.conformal_pvalues(s_cal, y_cal, s_test, threshold=c)
    exp = [
        (1 + sum(1 for si, yi in zip(s_cal.tolist(), y_cal.tolist()) if yi <= c and si >= sj)) / (n + 1)
        for sj in s_test.tolist()
    ]
    np.testing.assert_allclose(p.numpy(), exp, rtol=0, atol=1e-15)
    for q in (0.05, 0.2, 0.5):
        sel = M.benjamini_hochberg(p, q=q)
        assert sel.numpy().tolist() == (scipy.stats.false_discovery_control(p.numpy()) <= q).tolist()
    sel, pv = M.conformal_selection(s_cal, y_cal, s_test, threshold=c, q=0.2)
    assert torch.equal(pv, p)


def test_conformal_selection_controls_fdr_in_simulation():
    fdp = []
    for t in range(40):
        g = torch.Generator().manual_seed(t)
        x_cal, x_test = torch.randn(300, generator=g), torch.randn(100, generator=g)
        y_cal = x_cal + torch.randn(300, generator=g)
        y_test = x_test + torch.randn(100, generator=g)
        sel, _ = M.conformal_selection(x_cal, y_cal, x_test, threshold=1.0, q=0.2)
        fdp.append(((y_test[sel] <= 1.0).sum() / max(int(sel.sum()), 1)).item())
    assert np.mean(fdp) <= 0.2 + 0.05


def test_benjamini_hochberg_batched_and_empty():
    p = torch.tensor([[0.001, 0.04, 0.03, 0.9], [0.5, 0.6, 0.7, 0.8]])
    assert M.benjamini_hochberg(p, q=0.2).tolist() == [[True, True, True, False], [False] * 4]
    assert M.benjamini_hochberg(p, q=0.05).tolist() == [[True, False, False, False], [False] * 4]
    assert M.benjamini_hochberg(torch.zeros(3, 0), q=0.1).shape == (3, 0)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_input_messages():
    a = labels((2, 10), 3)
    with pytest.raises(ValueError, match=r"a must hold class labels in \[0, num_classes\) = \[0, 2\)"):
        torch.ops.alignops.bootstrap_confusion(a + 1, a, 2, 0, 0)
    with pytest.raises(ValueError, match="num_classes must be in"):
        torch.ops.alignops.bootstrap_confusion(a, a, 300, 0, 0)
    with pytest.raises(ValueError, match=r"b must have shape \[P, N\]"):
        torch.ops.alignops.bootstrap_confusion(a, a[:, :5], 3, 0, 0)
    with pytest.raises(ValueError, match="a must be int64 or int32"):
        torch.ops.alignops.bootstrap_confusion(a.float(), a.float(), 3, 0, 0)
    with pytest.raises(ValueError, match="num_resamples must be >= 0"):
        torch.ops.alignops.bootstrap_confusion(a, a, 3, -1, 0)
    with pytest.raises(ValueError, match="integer .* tensor of class labels"):
        M.cohen_kappa(a.float(), a, 3)
    with pytest.raises(ValueError, match="same N items"):
        M.cohen_kappa(a, a[:, :4], 3)
    with pytest.raises(ValueError, match="weights must be one of"):
        M.cohen_kappa(a, a, 3, weights="cubic")
    with pytest.raises(ValueError, match="n_bootstrap must be an int >= 0"):
        M.cohen_kappa(a, a, 3, n_bootstrap=-2)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        M.pearson(torch.randn(5), torch.randn(5), confidence=1.5)
    with pytest.raises(ValueError, match="needs at least 2 items"):
        M.spearman(torch.randn(1), torch.randn(1))
    with pytest.raises(ValueError, match="must have N = 5 items"):
        M.win_rate(torch.randn(5), torch.randn(6))
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        M.expected_calibration_error(torch.tensor([1.5, 0.2]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="preference_prob must hold probabilities"):
        M.idealized_ranking_accuracy(torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 1.2]), beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        M.idealized_ranking_accuracy(torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 0.2]), beta=0.0)
    with pytest.raises(ValueError, match=r"player ids in \[0, num_players\)"):
        M.bradley_terry(torch.tensor([0, 3]), torch.tensor([1, 0]), 3)
    with pytest.raises(ValueError, match=r"q \(the FDR level\) must be in"):
        M.benjamini_hochberg(torch.rand(4), q=0.0)
    with pytest.raises(ValueError, match="calib_labels must have the shape of calib_scores"):
        M.conformal_pvalues(torch.rand(4), torch.rand(5), torch.rand(3), threshold=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        M.cohen_kappa(a, a, 3, backend="cuda")
    # Issue 13 (vague errors): the native op's cast said "Expected 'int' ... found 'int'"; the hash would alias it.
    for call in (
        lambda: M.cohen_kappa(a, a, 3, n_bootstrap=2, seed=2**70),
        lambda: M.win_rate(torch.randn(5), torch.randn(5), n_bootstrap=2, seed=2**70),
    ):
        with pytest.raises(ValueError, match=r"seed must be a Python int that fits in 64 bits.*1180591620717411303424"):
            call()
    with pytest.raises(ValueError, match="scale must be > 0, got 0.0"):
        M.elo_ratings(torch.tensor([0]), torch.tensor([1]), 2, scale=0.0)
