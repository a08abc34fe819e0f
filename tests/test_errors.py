"""Bad input across the families: one exception class, messages that name the argument and the value,
non-finite hyper-parameters and NaN data handled on purpose (issue 13)."""

import math

import pytest
import torch

import alignops
from alignops import AlignopsError


def test_error_class_is_both_value_and_runtime_error():
    assert issubclass(AlignopsError, ValueError) and issubclass(AlignopsError, RuntimeError)


@pytest.mark.parametrize(
    "call",
    [
        lambda: alignops.preference_loss(*torch.randn(4, 3), beta=-1.0),
        lambda: alignops.selective_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0),
        lambda: alignops.skip_ffn(torch.randn(2, 3, 4), torch.randn(8, 3), torch.randn(4, 4)),
        lambda: alignops.ctc.forced_align(torch.randn(1, 4, 3), torch.zeros(3)),
    ],
    ids=["preference", "selective_logprobs", "skip_ffn", "forced_align"],
)
def test_argument_errors_caught_as_runtime_error(call):
    # torch's / torchaudio's TORCH_CHECK argument errors are RuntimeErrors; code that catches them keeps working.
    with pytest.raises(RuntimeError, match="must") as info:
        call()
    assert isinstance(info.value, AlignopsError)


# ---- non-finite hyper-parameters -------------------------------------------------------------------------


def _pairs():
    return torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)


@pytest.mark.parametrize("beta", [float("inf"), float("nan")])
def test_preference_loss_refuses_a_non_finite_beta(beta):
    with pytest.raises(ValueError, match=f"beta must be > 0 and finite, got {beta}"):
        alignops.preference_loss(*_pairs(), beta=beta)


def test_preference_loss_refuses_a_nan_in_a_beta_tensor():
    with pytest.raises(ValueError, match=r"beta must be > 0 and finite for every pair, got beta\[1\] = nan"):
        alignops.preference_loss(*_pairs(), beta=torch.tensor([0.1, float("nan"), 0.1, 0.1]))


def test_preference_loss_refuses_nan_loss_weights():
    with pytest.raises(ValueError, match=r"loss_weights must be finite, got loss_weights\[1\] = nan"):
        alignops.preference_loss(*_pairs(), loss_type=["sigmoid", "hinge"], loss_weights=[1.0, float("nan")])


def test_fused_linear_refuses_an_infinite_softcap():
    h, w, t = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 4])
    with pytest.raises(ValueError, match="softcap must be > 0 and finite .*got inf"):
        alignops.fused_linear_logprobs(h, w, t, softcap=float("inf"))


# ---- NaN data: a documented value or an error -----------------------------------------------------------


def test_best_and_worst_of_n_pick_the_nan_as_torch_max_does():
    r = torch.tensor([[1.0, float("nan"), 3.0], [0.0, 2.0, 1.0]])
    best, worst = alignops.rewards.best_of_n(r), alignops.rewards.worst_of_n(r)
    assert best.indices.tolist() == [1, 1] and worst.indices.tolist() == [1, 0]
    assert best.values[0].isnan() and best.values[1] == 2.0 and worst.values[0].isnan()


def test_calibrate_gives_nan_for_a_nan_reward_or_reference():
    out = alignops.rewards.calibrate(
        torch.tensor([[float("nan"), 0.5], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [0.0, float("nan")]])
    )
    assert out[0, 0].isnan() and out[0, 1] == 0.5 and out[1].isnan().all()


def test_win_rate_is_nan_with_a_nan_score():
    r = alignops.metrics.win_rate(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]), torch.zeros(2, 2))
    assert r.value[0].isnan() and r.value[1] == 1.0


def test_benjamini_hochberg_refuses_nan_pvalues():
    with pytest.raises(ValueError, match=r"pvalues must lie in \[0, 1\], got nan"):
        alignops.metrics.benjamini_hochberg(torch.tensor([0.01, float("nan"), 0.5]), q=0.1)


def test_rrhf_loss_is_nan_for_a_prompt_with_a_nan_reward():
    out = alignops.rrhf_loss(
        torch.tensor([[-1.0, -2.0, -3.0]] * 2),
        torch.tensor([[1.0, float("nan"), 0.0], [1.0, 2.0, 3.0]]),
        torch.ones(2, 3),
    )
    assert out.loss.isnan() and out.rank_loss[0].isnan() and out.nll_loss[0].isnan()
    # the finite prompt is untouched: best = candidate 2, hinge over (0 < 2), (1 < 2), (0 < 1) pairs
    assert out.nll_loss[1] == 3.0 and out.rank_loss[1] == 1.0 + 1.0 + 2.0


def test_curry_pairs_refuses_a_nan_rating():
    with pytest.raises(ValueError, match=r"got NaN at rewards\[0, 1\]"):
        alignops.curry_pairs(torch.tensor([[1.0, float("nan"), 0.0]]))


def test_log1mexp_of_a_positive_argument_is_nan():
    x = torch.tensor([0.5, -1.0, float("nan")], requires_grad=True)
    y = alignops.log1mexp(x)
    assert y[0].isnan() and y[2].isnan()
    torch.testing.assert_close(y[1], torch.tensor(math.log(1 - math.exp(-1.0))))
    y[1].backward()
    assert x.grad[0] == 0 and x.grad[2] == 0


def test_kto_refuses_labels_other_than_0_and_1():
    p = torch.randn(3)
    with pytest.raises(ValueError, match="is_desirable must hold 0 / 1 labels, got 2"):
        alignops.kto_loss(p, torch.randn(3), torch.tensor([1, 0, 2]), kl=0.0)


def test_pearson_is_scale_free_up_to_1e30():
    # r([1, 2, 3], [1, 2, 4]) = 3 / sqrt(2 * 42 / 9); fp32 squares of 1e30 overflow without rescaling
    expected = 9 / math.sqrt(84)
    for s in (1e30, 1e-30):
        r = alignops.metrics.pearson(torch.tensor([1.0, 2.0, 3.0]) * s, torch.tensor([1.0, 2.0, 4.0]))
        assert abs(float(r.value) - expected) < 1e-6


def test_weighted_majority_vote_on_an_empty_batch():
    with pytest.raises(ValueError, match=r"answers is empty \(shape \[0, 3\]\): pass num_classes"):
        alignops.rewards.weighted_majority_vote(torch.zeros(0, 3, dtype=torch.long))
    out = alignops.rewards.weighted_majority_vote(torch.zeros(0, 3, dtype=torch.long), num_classes=4)
    assert out.values.shape == (0,) and out.indices.shape == (0,)


def test_gaussian_w2_refuses_an_indefinite_covariance():
    with pytest.raises(ValueError, match="S1 must be positive semi-definite .*got an eigenvalue -1"):
        alignops.gaussian_w2(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.zeros(2), torch.eye(2))
    # a singular (rank-deficient) covariance is PSD: W2^2 between N(0, diag(1, 0)) and N(0, I) = (1 - 1)^2 + 1
    out = alignops.gaussian_w2(torch.zeros(2), torch.diag(torch.tensor([1.0, 0.0])), torch.zeros(2), torch.eye(2))
    torch.testing.assert_close(out, torch.tensor(1.0))


def test_cca_names_a_nan_view():
    with pytest.raises(ValueError, match="H1 must be finite, got NaN or inf entries"):
        alignops.cca(torch.full((10, 3), float("nan")), torch.randn(10, 3))


def test_prepack_names_an_impossible_batch_size():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="batch_size=1099511627776: oneDNN found no weight layout"):
        alignops.skip.prepack(w, batch_size=2**40)


def test_skip_ffn_refuses_a_zero_hidden_size():
    with pytest.raises(ValueError, match=r"x must have a hidden size H >= 1, got shape \(2, 3, 0\)"):
        alignops.skip_ffn(torch.randn(2, 3, 0), torch.randn(8, 0), torch.randn(0, 4))
