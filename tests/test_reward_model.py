"""Reward-model objectives: against alignops.reference, hand-computed closed forms, TRL 1.16's RewardTrainer
loss (its own compute_loss, called on a stand-in trainer), gradcheck in fp64 and bad inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import alignops
import alignops.objectives as obj
from alignops.reference import objectives as ref

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def rewards(B, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, generator=g, dtype=torch.float64) * scale).to(dtype)


def ratings_case(N=7, A=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(N, A, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, 5, (N, A), generator=g)
    mask = torch.rand(N, A, generator=g) < 0.7
    return pred, y, mask


def tol(dtype):
    # Inputs are exactly representable after the upcast and everything accumulates in fp32 / fp64.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)


# ---- against the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 47])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01])
def test_bradley_terry_matches_reference(dtype, B, with_margin, coef):
    rc, rr = rewards(B, 0, dtype), rewards(B, 1, dtype)
    m = rewards(B, 2, dtype, scale=1.0).abs() if with_margin else None
    exp = ref.bradley_terry_loss(rc, rr, m, coef)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for red, want in (("none", exp), ("mean", exp.mean()), ("sum", exp.sum())):
        out = obj.bradley_terry_loss(rc, rr, m, center_rewards_coefficient=coef, reduction=red)
        assert out.loss.dtype == acc
        torch.testing.assert_close(out.loss.double(), want, **tol(dtype))
    assert torch.equal(out.accuracy, (rc.to(acc) > rr.to(acc)).to(acc))
    torch.testing.assert_close(out.margins, rc.to(acc) - rr.to(acc))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rating_regression_matches_reference(dtype):
    pred, y, mask = ratings_case(dtype=dtype)
    mean, total = ref.rating_regression_loss(pred, y, mask)
    out = obj.rating_regression_loss(pred, y, mask)
    torch.testing.assert_close(out.loss.double(), mean, **tol(dtype))
    torch.testing.assert_close(
        obj.rating_regression_loss(pred, y, mask, reduction="sum").loss.double(), total, **tol(dtype)
    )
    none = obj.rating_regression_loss(pred, y, mask, reduction="none").loss
    assert none.shape == pred.shape and bool((none[~mask] == 0).all())
    assert int(out.num_rated) == int(mask.sum())
    mean_all, _ = ref.rating_regression_loss(pred, y)
    torch.testing.assert_close(obj.rating_regression_loss(pred, y).loss.double(), mean_all, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_helpsteer2_preference_matches_reference(dtype):
    B = 13
    rc, rr = rewards(B, 3, dtype), rewards(B, 4, dtype)
    strength = torch.randint(1, 4, (B,), generator=torch.Generator().manual_seed(5))
    pred, y, mask = ratings_case(dtype=dtype)
    pref = ref.scaled_bradley_terry_loss(rc, rr, strength)
    reg, reg_sum = ref.rating_regression_loss(pred, y, mask)
    out = obj.helpsteer2_preference_loss(rc, rr, strength, pred, y, mask, regression_weight=0.5)
    torch.testing.assert_close(out.loss.double(), pref.mean() + 0.5 * reg, **tol(dtype))
    torch.testing.assert_close(out.preference_loss.double(), pref.mean(), **tol(dtype))
    out = obj.helpsteer2_preference_loss(rc, rr, strength, pred, y, mask, regression_weight=2.0, reduction="sum")
    torch.testing.assert_close(out.loss.double(), pref.sum() + 2.0 * reg_sum, **tol(dtype))
    none = obj.helpsteer2_preference_loss(rc, rr, strength, reduction="none")
    torch.testing.assert_close(none.loss.double(), pref, **tol(dtype))


# ---- closed forms computed by hand --------------------------------------------------------------------


def test_closed_forms_by_hand():
    rc, rr = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])
    # -log sigmoid(z) = log(1 + e^-z): pair 0 has z = 1 - 0 - 0.5, pair 1 has z = 2 - 3 - 0.
    bt = obj.bradley_terry_loss(rc, rr, torch.tensor([0.5, 0.0]), center_rewards_coefficient=0.01, reduction="none")
    want = [math.log1p(math.exp(-0.5)) + 0.01 * 1.0, math.log1p(math.exp(1.0)) + 0.01 * 25.0]
    assert bt.loss.tolist() == pytest.approx(want, rel=1e-6)
    assert bt.centering_loss.tolist() == pytest.approx([0.01, 0.25], rel=1e-6)
    assert bt.accuracy.tolist() == [1.0, 0.0] and bt.margins.tolist() == [1.0, -1.0]
    # Large margins stay finite: log(1 + e^100) = 100 (+ e^-100).
    far = obj.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([100.0]), reduction="sum").loss
    assert float(far) == pytest.approx(100.0, rel=1e-7)

    centre = obj.reward_centering_loss(rc, rr, center_rewards_coefficient=0.1)
    assert float(centre.loss) == pytest.approx(0.1 * (1.0 + 25.0) / 2, rel=1e-6)
    assert centre.reward_sums.tolist() == [1.0, 5.0]

    # (1 - 1.5)^2 + (0 - 1)^2 + (0 - 1)^2 over 3 rated entries; the NaN sits at an unrated entry.
    nan = float("nan")
    reg = obj.rating_regression_loss(
        torch.tensor([[1.0, 2.0], [0.0, 0.0]]),
        torch.tensor([[1.5, nan], [1.0, 1.0]]),
        torch.tensor([[True, False], [True, True]]),
    )
    assert float(reg.loss) == pytest.approx(2.25 / 3, rel=1e-6) and int(reg.num_rated) == 3

    hs = obj.helpsteer2_preference_loss(rc, rr, torch.tensor([3, 1]))
    assert float(hs.loss) == pytest.approx((3 * math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2, rel=1e-6)
    assert float(hs.regression_loss) == 0.0


def test_unrated_entries_get_no_gradient_even_when_nan():
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    obj.rating_regression_loss(pred, torch.tensor([[0.0, float("nan")]]), torch.tensor([[True, False]])).loss.backward()
    assert pred.grad.tolist() == [[2.0, 0.0]]


# ---- against TRL ---------------------------------------------------------------------------------------


class _RewardHead(torch.nn.Module):
    """Stands in for the sequence-classification model: returns the given rewards as logits [2B, 1]."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits.unsqueeze(-1))


def _trl_compute_loss(trainer_mod, rc, rr, margin, coef):
    """TRL 1.16's own RewardTrainer.compute_loss on a stand-in trainer (eval mode: no token counting, the
    accelerator's gathers are the identity on one process). Returns (loss, grad of [rc; rr], logged metrics)."""
    head = _RewardHead(torch.cat([rc, rr]).clone()).eval()
    identity = SimpleNamespace(gather_for_metrics=lambda t: t, gather=lambda t: t)
    stub = SimpleNamespace(
        model=head,
        args=SimpleNamespace(center_rewards_coefficient=coef),
        accelerator=identity,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {} if margin is None else {"margin": margin}
    loss = trainer_mod.RewardTrainer.compute_loss(stub, head, inputs)
    loss.backward()
    return loss.detach(), head.logits.grad, stub._metrics["eval"]


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01])
def test_equals_trl_reward_trainer_loss(with_margin, coef, import_peer):
    B = 9
    rc, rr = rewards(B, 6), rewards(B, 7)
    m = rewards(B, 8, scale=1.0).abs() if with_margin else None
    trainer_mod = import_peer("trl.trainer.reward_trainer")
    trl_loss, trl_grad, metrics = _trl_compute_loss(trainer_mod, rc, rr, m, coef)
    x = torch.cat([rc, rr]).requires_grad_()
    out = obj.bradley_terry_loss(*x.chunk(2), m, center_rewards_coefficient=coef)
    out.loss.backward()
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, trl_grad, rtol=1e-6, atol=1e-7)
    assert float(out.accuracy.mean()) == pytest.approx(metrics["accuracy"][0])
    assert float(out.margins.mean()) == pytest.approx(metrics["margin"][0], rel=1e-6)


# ---- autograd --------------------------------------------------------------------------------------------


def test_gradcheck_fp64():
    B = 5
    rc = rewards(B, 9, torch.float64).requires_grad_()
    rr = rewards(B, 10, torch.float64).requires_grad_()
    m = rewards(B, 11, torch.float64, scale=1.0).requires_grad_()
    s = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    pred, y, mask = ratings_case(4, 3, seed=12, dtype=torch.float64)
    pred.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: obj.bradley_terry_loss(a, b, c, center_rewards_coefficient=0.05, reduction="none").loss,
        (rc, rr, m),
    )
    assert torch.autograd.gradcheck(lambda a, b: obj.reward_centering_loss(a, b).loss, (rc, rr))
    assert torch.autograd.gradcheck(lambda p: obj.rating_regression_loss(p, y, mask).loss, (pred,))
    assert torch.autograd.gradcheck(
        lambda a, b, p: obj.helpsteer2_preference_loss(a, b, s, p, y, mask, regression_weight=0.3).loss, (rc, rr, pred)
    )


def test_metrics_are_detached_and_exported():
    rc = torch.randn(3, requires_grad=True)
    out = alignops.bradley_terry_loss(rc, torch.zeros(3))
    assert out.loss.requires_grad and not out.chosen_rewards.requires_grad and not out.centering_loss.requires_grad
    for name in ("bradley_terry_loss", "reward_centering_loss", "rating_regression_loss", "helpsteer2_preference_loss"):
        assert getattr(alignops, name) is getattr(obj, name)


def test_empty_batch():
    e = torch.empty(0)
    assert obj.bradley_terry_loss(e, e, reduction="none").loss.shape == (0,)
    assert float(obj.bradley_terry_loss(e, e, reduction="sum").loss) == 0.0
    assert float(obj.rating_regression_loss(torch.empty(0, 3), torch.empty(0, 3)).loss) == 0.0
    assert float(obj.helpsteer2_preference_loss(e, e, reduction="sum").loss) == 0.0


# ---- bad inputs ----------------------------------------------------------------------------------------


def test_bad_inputs():
    rc, rr = rewards(4, 0), rewards(4, 1)
    pred, y, mask = ratings_case(3, 2)
    with pytest.raises(ValueError, match=r"rejected_rewards must have the shape of chosen_rewards \(4,\), got \(3,\)"):
        obj.bradley_terry_loss(rc, rr[:3])
    with pytest.raises(ValueError, match=r"chosen_rewards must be a 1-D tensor of shape \[B\], got shape \(2, 2\)"):
        obj.bradley_terry_loss(rc.view(2, 2), rr.view(2, 2))
    with pytest.raises(ValueError, match=r"margin must have the shape of chosen_rewards \(4,\)"):
        obj.bradley_terry_loss(rc, rr, torch.zeros(5))
    with pytest.raises(ValueError, match="margin must be on the device of chosen_rewards"):
        obj.bradley_terry_loss(rc, rr, torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="rejected_rewards must be on the device of chosen_rewards"):
        obj.reward_centering_loss(rc, rr.to("meta"))
    with pytest.raises(ValueError, match="center_rewards_coefficient must be finite, got nan"):
        obj.bradley_terry_loss(rc, rr, center_rewards_coefficient=float("nan"))
    with pytest.raises(ValueError, match="center_rewards_coefficient must be a finite float >= 0, got -0.1"):
        obj.reward_centering_loss(rc, rr, center_rewards_coefficient=-0.1)
    with pytest.raises(ValueError, match=r"chosen_rewards must be float32, .* got torch.int64"):
        obj.bradley_terry_loss(rc.long(), rr.long())
    with pytest.raises(ValueError, match="reduction must be one of"):
        obj.bradley_terry_loss(rc, rr, reduction="avg")
    with pytest.raises(ValueError, match=r"ratings must not be NaN where rated, got NaN at ratings\[1, 0\]"):
        obj.rating_regression_loss(torch.zeros(2, 2), torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"ratings must have the shape of predicted \(3, 2\)"):
        obj.rating_regression_loss(pred, y[:2])
    with pytest.raises(ValueError, match="rating_mask must be a bool tensor"):
        obj.rating_regression_loss(pred, y, mask.float())
    with pytest.raises(ValueError, match="rating_mask must be on the device of predicted"):
        obj.rating_regression_loss(pred, y, mask.to("meta"))
    with pytest.raises(ValueError, match="ratings must be a float or integer tensor, got torch.bool"):
        obj.rating_regression_loss(pred, mask)
    with pytest.raises(ValueError, match="preference_strength must be >= 0"):
        obj.helpsteer2_preference_loss(rc, rr, torch.tensor([1, -1, 2, 3]))
    with pytest.raises(ValueError, match="predicted and ratings go together"):
        obj.helpsteer2_preference_loss(rc, rr, None, pred)
    with pytest.raises(ValueError, match="reduction='none' has no per-pair form with ratings"):
        obj.helpsteer2_preference_loss(rc, rr, None, pred, y, reduction="none")
    with pytest.raises(ValueError, match="predicted must be on the device of chosen_rewards"):
        obj.helpsteer2_preference_loss(rc, rr, None, pred.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="regression_weight must be finite, got inf"):
        obj.helpsteer2_preference_loss(rc, rr, regression_weight=float("inf"))


def test_compiles_fullgraph():
    a, b, s = rewards(5, 20), rewards(5, 21), torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0])
    pred, y, mask = ratings_case(4, 3, seed=22)

    def step(a, b, s, pred, y, mask):
        return (
            obj.bradley_terry_loss(a, b, s, center_rewards_coefficient=0.01).loss
            + obj.helpsteer2_preference_loss(a, b, s, pred, y, mask, regression_weight=0.5).loss
        )

    args = (a, b, s, pred, y, mask)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(*args), step(*args))
