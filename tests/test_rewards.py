"""rewards family: Bradley-Terry transform vs its closed form, combination over properties, InfAlign calibration
vs scipy.stats.percentileofscore, CTRL transforms, best/worst-of-n, weighted majority vote, bad input."""

import numpy as np
import pytest
import scipy.stats
import torch

from alignops import rewards as Rw


def test_bt_transform_matches_closed_form_and_is_stable():
    r = torch.randn(4, 7, dtype=torch.float64) * 5
    r_ref = torch.randn(4, 1, dtype=torch.float64)
    exp = -np.log1p(np.exp(-(r.numpy() - r_ref.numpy())))
    np.testing.assert_allclose(Rw.bt_transform(r, r_ref).numpy(), exp, rtol=1e-12)
    big = Rw.bt_transform(torch.tensor([1000.0, -1000.0]), torch.tensor(0.0))
    assert big.tolist() == [0.0, -1000.0]
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: Rw.bt_transform(x, torch.zeros(())), (x,))


def test_combine_rewards_sums_log_probabilities():
    r = torch.randn(6, 2, dtype=torch.float64)
    ref = torch.randn(6, 2, dtype=torch.float64)
    u = Rw.combine_rewards(r, ref)
    exp = np.log(scipy.special.expit(r.numpy() - ref.numpy())).sum(-1)
    np.testing.assert_allclose(u.numpy(), exp, rtol=1e-12)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    np.testing.assert_allclose(
        Rw.combine_rewards(r, ref, w).numpy(),
        (np.log(scipy.special.expit(r.numpy() - ref.numpy())) * [1.0, 0.5]).sum(-1),
        rtol=1e-12,
    )


def test_calibrate_is_midrank_percentile():
    ref = torch.randint(0, 10, (3, 50)).double()  # ties
    r = torch.randint(-1, 12, (3, 8)).double()
    c = Rw.calibrate(r, ref)
    for i in range(3):
        exp = [scipy.stats.percentileofscore(ref[i].numpy(), v, kind="mean") / 100 for v in r[i].tolist()]
        np.testing.assert_allclose(c[i].numpy(), exp, rtol=0, atol=1e-12)
    assert Rw.calibrate(torch.tensor([[100.0, -100.0]]), torch.tensor([[0.0, 1.0]])).tolist() == [[1.0, 0.0]]


def test_ctrl_transform_monotone_and_signs():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    for t in (-3.0, 0.0, 2.0):
        y = Rw.ctrl_transform(u, t=t)
        assert (y[1:] > y[:-1]).all()
    assert torch.allclose(Rw.ctrl_transform(u, t=2.0), torch.exp(2 * u))
    assert torch.allclose(Rw.ctrl_transform(u, t=-3.0), -torch.exp(-3 * u))
    x = torch.rand(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: Rw.ctrl_transform(x, t=1.5), (x,))


def test_best_and_worst_of_n():
    r = torch.tensor([[0.1, 0.9, 0.9, -1.0], [3.0, 2.0, 1.0, 0.0]])
    b, w = Rw.best_of_n(r), Rw.worst_of_n(r)
    assert b.indices.tolist() == [1, 0] and b.values.tolist() == pytest.approx([0.9, 3.0])
    assert w.indices.tolist() == [3, 3] and w.values.tolist() == pytest.approx([-1.0, 0.0])


def test_weighted_majority_vote_vs_loop():
    answers = torch.randint(0, 4, (20, 9))
    weights = torch.rand(20, 9, dtype=torch.float64)
    res = Rw.weighted_majority_vote(answers, weights, 4)
    for i in range(20):
        totals = np.zeros(4)
        for a, w in zip(answers[i].tolist(), weights[i].tolist()):
            totals[a] += w
        assert res.indices[i].item() == int(np.argmax(totals))
        assert res.values[i].item() == pytest.approx(totals.max())
    plain = Rw.weighted_majority_vote(torch.tensor([[2, 1, 1, 2, 0]]))
    assert plain.indices.tolist() == [1] and plain.values.tolist() == [2.0]  # tie between 1 and 2 -> 1


def test_bad_input_messages():
    with pytest.raises(ValueError, match="must broadcast against rewards"):
        Rw.bt_transform(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"weights must have shape \[K\] = \[2\]"):
        Rw.combine_rewards(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="must share their leading shape"):
        Rw.calibrate(torch.zeros(3, 2), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="M >= 1 reference samples"):
        Rw.calibrate(torch.zeros(3, 2), torch.zeros(3, 0))
    with pytest.raises(ValueError, match="n >= 1"):
        Rw.best_of_n(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"answers must be labels in \[0, num_classes\)"):
        Rw.weighted_majority_vote(torch.tensor([[0, 5]]), num_classes=3)
    with pytest.raises(ValueError, match="answers must be an integer tensor"):
        Rw.weighted_majority_vote(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="weights must have the shape of answers"):
        Rw.weighted_majority_vote(torch.tensor([[0, 1]]), torch.ones(3))
