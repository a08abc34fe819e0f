"""objectives family (ORPO, KTO, BCO, CPO, TPO, RRHF, PRO, Curry-DPO pairs, LD-DPO, WPO, Diffusion-DPO,
DRO): vs the fp64 reference, vs Liger-Kernel's loss functions and TRL's formulas, gradcheck, stability at
extreme inputs, bad input. Distributed KTO / BCO: tests/test_objectives_distributed.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import alignops.objectives as obj
from alignops.reference import objectives as ref

# (rtol, atol) against the fp64 reference on the same input values; fp32 / bf16 inputs accumulate in fp32.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-5, 2e-6)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def seq_logps(B, dtype, requires_grad=False, center=-60.0, scale=10.0):
    t = (center + scale * torch.randn(B, dtype=torch.float64)).clamp(max=-0.5).to(dtype)
    return t.requires_grad_(requires_grad)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def grads_of(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# ---- ORPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_lengths", [True, False])
def test_orpo_matches_reference(dtype, with_lengths):
    B = 37
    if with_lengths:
        nc, nr = torch.randint(1, 80, (B,)), torch.randint(0, 80, (B,))
        pc, pr = seq_logps(B, dtype, True), seq_logps(B, dtype, True)
    else:
        nc = nr = None
        pc = (-torch.rand(B, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
        pr = (-torch.rand(B, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    out = obj.orpo_loss(pc, pr, beta=0.25, chosen_lengths=nc, rejected_lengths=nr)
    rc, rr = leaf(pc), leaf(pr)
    exp, exp_or, exp_log_odds, exp_cr, exp_rr = ref.orpo_loss(rc, rr, 0.25, nc, nr)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.loss, exp, dtype)
    assert_close(out.log_odds_chosen, exp_log_odds, dtype)
    assert_close(out.log_odds_ratio, -exp_or / 0.25, dtype)
    assert_close(out.chosen_rewards, exp_cr, dtype)
    assert_close(out.rejected_rewards, exp_rr, dtype)
    # the per-pair terms sum to B times the mean: NLL is spread token-weighted over the pairs
    none = obj.orpo_loss(pc, pr, beta=0.25, chosen_lengths=nc, rejected_lengths=nr, reduction="none").loss
    assert_close(none.mean(), exp, dtype)
    assert_close(
        obj.orpo_loss(pc, pr, beta=0.25, chosen_lengths=nc, rejected_lengths=nr, reduction="sum").loss, exp * B, dtype
    )
    got = grads_of(out.loss, (pc, pr))
    want = grads_of(exp, (rc, rr))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        if dtype == torch.bfloat16:
            torch.testing.assert_close(g.double(), w.to(dtype).double(), rtol=1e-2, atol=1e-6)
        else:
            assert_close(g, w, dtype)


def test_orpo_matches_liger_preference_loss_fn():
    orpo = pytest.importorskip("liger_kernel.chunked_loss.orpo_loss")
    B = 24
    a, b = -torch.rand(B) * 3, -torch.rand(B) * 3  # Liger takes per-token mean log-probs
    target = torch.zeros(2 * B, 4)  # Liger divides by full_target.shape[0] // 2 pairs
    loss, cr, rr, lor, loc = orpo.LigerFusedLinearORPOFunction.preference_loss_fn(a, b, target, beta=0.3)
    out = obj.orpo_loss(a, b, beta=0.3, compute_nll_loss=False)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, cr)
    torch.testing.assert_close(out.rejected_rewards, rr)
    torch.testing.assert_close(out.log_odds_ratio.mean(), lor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_odds_chosen.mean(), loc, rtol=1e-5, atol=1e-6)


def test_orpo_with_nll_matches_liger_fused_linear_orpo():
    """End to end: Liger's fused ORPO (token-mean NLL + odds ratio) from hidden states, and ours from the
    per-sequence sums and lengths of the same per-token log-probs."""
    orpo = pytest.importorskip("liger_kernel.chunked_loss.orpo_loss")
    B, T, H, V = 3, 7, 16, 29
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.3
    target = torch.randint(0, V, (2 * B, T))
    target[torch.rand(2 * B, T) < 0.3] = -100
    target[:, 0] = 3  # every sequence keeps a token
    liger = orpo.LigerFusedLinearORPOLoss(beta=0.2, compiled=False)(weight, hidden, target)
    liger = liger[0] if isinstance(liger, tuple) else liger

    logp = torch.log_softmax(hidden @ weight.T, -1)
    keep = target != -100
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    sums, lens = tok.sum(1), keep.sum(1)
    out = obj.orpo_loss(sums[:B], sums[B:], beta=0.2, chosen_lengths=lens[:B], rejected_lengths=lens[B:])
    torch.testing.assert_close(out.loss, liger.to(out.loss.dtype), rtol=1e-6, atol=1e-8)


def test_log1mexp_is_accurate_and_has_finite_gradients():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 480  # 1 - exp(x) must resolve exp(-1000) ~ 1e-435 and x = -1e-30
    x64 = -torch.logspace(-30, 3, 400, dtype=torch.float64)
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x64.tolist()], dtype=torch.float64)
    torch.testing.assert_close(obj.log1mexp(x64), exact, rtol=4e-16, atol=0)
    x32 = leaf(x64.float())
    y = obj.log1mexp(x32)
    torch.testing.assert_close(y.double(), obj.log1mexp(x32.detach().double()), rtol=2e-7, atol=1e-37)
    y.sum().backward()
    assert torch.isfinite(x32.grad).all()
    z = leaf(torch.tensor([0.0, -1e-45, -1e-30, -0.5, -0.7, -50.0]))
    y = obj.log1mexp(z)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(z.grad).all()
    assert y[0] == math.log(torch.finfo(torch.float32).tiny)


def test_orpo_finite_where_liger_and_the_naive_forms_are_not():
    """Mean log-probs within 6e-8 of 0 (a sure completion) in fp32: 1 - exp(x) rounds to 0."""
    orpo = pytest.importorskip("liger_kernel.chunked_loss.orpo_loss")
    a = torch.tensor([-1e-9, -3e-8, -1e-12, -2.0, -1e-9])
    b = torch.tensor([-1.5, -2.0, -1e-10, -1e-9, -1e-12])
    liger = orpo.LigerFusedLinearORPOFunction.preference_loss_fn(a, b, torch.zeros(10, 1), beta=0.1)[0]
    assert not torch.isfinite(liger)
    naive_log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
    assert not torch.isfinite(naive_log_odds).all()

    # a two-branch torch.where that evaluates both branches on every lane: its gradient is NaN
    xa = leaf(a)
    both = torch.where(xa < -0.6931471805599453, torch.log1p(-torch.exp(xa)), torch.log(-torch.expm1(xa)))
    both.sum().backward()
    assert torch.isnan(xa.grad).any()

    ca, cb = leaf(a), leaf(b)
    out = obj.orpo_loss(ca, cb, beta=0.1, reduction="none")
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(ca.grad).all() and torch.isfinite(cb.grad).all()
    exp = ref.orpo_loss(a.double(), b.double(), 0.1)[1] - a.double()  # odds-ratio term + NLL (no lengths)
    torch.testing.assert_close(out.loss.double(), exp, rtol=2e-6, atol=1e-6)

    near = torch.tensor([-5e-8])  # exp rounds to 1 - 6e-8: the naive form loses 0.18 nat, ours is exact
    assert abs(float(torch.log1p(-torch.exp(near))) - math.log(5e-8)) > 0.1
    assert float(obj.log1mexp(near)) == pytest.approx(math.log(5e-8), rel=1e-6)

    exact_zero = obj.orpo_loss(torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0]), reduction="none")
    assert torch.isfinite(exact_zero.loss).all()


def test_orpo_gradcheck():
    B = 6
    nc, nr = torch.randint(1, 20, (B,)), torch.randint(1, 20, (B,))
    pc = leaf(-torch.rand(B, dtype=torch.float64) * 20 - 0.01)
    pr = leaf(-torch.rand(B, dtype=torch.float64) * 20 - 0.01)
    nll = leaf(torch.rand(B, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda c, r: obj.orpo_loss(c, r, beta=0.7, chosen_lengths=nc, rejected_lengths=nr).loss, (pc, pr)
    )
    assert torch.autograd.gradcheck(
        lambda c, r, n: obj.orpo_loss(c, r, n, reduction="none").loss, (pc / 20, pr / 20, nll)
    )


# ---- KTO ---------------------------------------------------------------------------------------------


def kto_inputs(B, dtype, requires_grad=True):
    policy, refp = seq_logps(B, dtype, requires_grad), seq_logps(B, dtype)
    refp = (policy.detach().double() + torch.randn(B, dtype=torch.float64) * 3).to(dtype)
    desirable = torch.rand(B) < 0.6
    kl_policy = (policy.detach().double() + torch.randn(B, dtype=torch.float64)).to(dtype)
    kl_ref = (kl_policy.double() - 0.5 + torch.randn(B, dtype=torch.float64)).to(dtype)
    return policy, refp, desirable, kl_policy, kl_ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_matches_reference(dtype):
    B = 41
    policy, refp, desirable, klp, klr = kto_inputs(B, dtype)
    kw = dict(beta=0.2, desirable_weight=1.33, undesirable_weight=0.7)
    out = obj.kto_loss(policy, refp, desirable, policy_kl_logps=klp, ref_kl_logps=klr, reduction="none", **kw)
    z0 = ref.kto_kl(klp, klr)
    assert_close(out.kl, z0, dtype)
    exp, rewards = ref.kto_loss(leaf(policy), refp, desirable, kl=z0, **kw)
    assert_close(out.loss, exp, dtype)
    assert_close(out.rewards, rewards, dtype)
    assert_close(out.chosen_rewards_sum, rewards[desirable].sum(), dtype)
    assert_close(out.rejected_rewards_sum, rewards[~desirable].sum(), dtype)
    assert int(out.num_chosen) == int(desirable.sum()) and int(out.num_rejected) == int((~desirable).sum())
    torch.testing.assert_close(
        out.margins.double(), rewards[desirable].mean() - rewards[~desirable].mean(), rtol=1e-4, atol=1e-6
    )
    mean = obj.kto_loss(policy, refp, desirable, policy_kl_logps=klp, ref_kl_logps=klr, **kw).loss
    assert_close(mean, exp.mean(), dtype)


def test_kto_matches_trl_formula_and_liger():
    """TRL's KTOTrainer: chosen / rejected split, kl = clamp(mean(KL_logps - ref_KL_logps), 0), losses
    concatenated and nanmean'ed; Liger's KTO preference_loss_fn with the same kl."""
    kto = pytest.importorskip("liger_kernel.chunked_loss.kto_loss")
    B = 32
    policy, refp, desirable, klp, klr = kto_inputs(B, torch.float32, requires_grad=False)
    beta, dw, uw = 0.1, 1.0, 1.0
    kl = (klp - klr).mean().detach().clamp(min=0)
    ci, ri = torch.nonzero(desirable).view(-1), torch.nonzero(~desirable).view(-1)
    chosen_lr = policy.index_select(0, ci) - refp.index_select(0, ci)
    rejected_lr = policy.index_select(0, ri) - refp.index_select(0, ri)
    trl = torch.cat(
        (dw * (1 - F.sigmoid(beta * (chosen_lr - kl))), uw * (1 - F.sigmoid(beta * (kl - rejected_lr)))), 0
    ).nanmean()
    out = obj.kto_loss(policy, refp, desirable, beta=beta, policy_kl_logps=klp, ref_kl_logps=klr)
    torch.testing.assert_close(out.loss, trl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.kl, kl)

    liger_loss, liger_cr, liger_rr = kto.LigerFusedLinearKTOFunction.preference_loss_fn(
        policy, desirable, torch.zeros(B, 3), refp, beta=beta, kl=kl
    )
    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards_sum, liger_cr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards_sum, liger_rr, rtol=1e-6, atol=1e-6)
    # precomputed kl, and the reference-free form (Liger's ref_log_prob_chunk=None)
    torch.testing.assert_close(obj.kto_loss(policy, refp, desirable, beta=beta, kl=kl).loss, trl)
    liger_free = kto.LigerFusedLinearKTOFunction.preference_loss_fn(
        policy / 50, desirable, torch.zeros(B, 3), None, beta=beta
    )[0]
    torch.testing.assert_close(obj.kto_loss(policy / 50, None, desirable, beta=beta).loss, liger_free)


def test_kto_kl_is_clamped_detached_and_apo_variant():
    B = 10
    policy, refp, desirable, klp, klr = kto_inputs(B, torch.float64)
    klp = leaf(klp - 100)  # mean KL far below 0: clamped to 0
    out = obj.kto_loss(policy, refp, desirable, policy_kl_logps=klp, ref_kl_logps=klr)
    assert float(out.kl) == 0.0
    assert not out.kl.requires_grad
    out.loss.backward()
    assert klp.grad is None and policy.grad is not None
    no_kl = obj.kto_loss(policy, refp, desirable, reduction="none").loss
    apo = obj.kto_loss(policy, refp, desirable, loss_type="apo_zero_unpaired", reduction="none").loss
    x = (policy - refp).detach()
    torch.testing.assert_close(apo, torch.where(desirable, 1 - torch.sigmoid(0.1 * x), torch.sigmoid(0.1 * x)))
    torch.testing.assert_close(no_kl, apo)


def test_kto_gradcheck_and_extremes():
    B = 8
    policy, refp, desirable, klp, klr = kto_inputs(B, torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, r: (
            obj.kto_loss(
                p, r, desirable, beta=0.3, desirable_weight=2.0, policy_kl_logps=klp, ref_kl_logps=klr, reduction="none"
            ).loss
        ),
        (leaf(policy), leaf(refp)),
    )
    huge = leaf(torch.tensor([1e30, -1e30, 3e38, -3e38]))
    out = obj.kto_loss(huge, None, torch.tensor([True, False, False, True]), beta=10.0, reduction="sum")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(huge.grad).all()


# ---- BCO ---------------------------------------------------------------------------------------------


def test_running_moments_matches_the_moments_of_everything_seen():
    batches = [torch.randn(n, dtype=torch.float64) * s + m for n, s, m in [(7, 2.0, 1.0), (13, 0.5, -3.0), (1, 1, 4)]]
    rm = obj.RunningMoments()
    for i in range(len(batches)):
        bm, bs = rm.update(batches[i])
        torch.testing.assert_close(bm, batches[i].mean())
        mean, var, std = ref.running_moments(batches[: i + 1])
        torch.testing.assert_close(rm.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rm.var, var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rm.std, std, rtol=1e-12, atol=1e-12)
    state = rm.state_dict()
    rm2 = obj.RunningMoments()
    rm2.load_state_dict(state)
    assert rm2.state_dict() == state
    rm2.update(torch.empty(0))  # an empty batch leaves the state as it was
    assert rm2.state_dict() == state


@pytest.mark.parametrize("dtype", DTYPES)
def test_bco_matches_reference(dtype):
    B = 29
    policy, refp, desirable, _, _ = kto_inputs(B, dtype)
    udm = torch.rand(B, dtype=torch.float64).to(dtype) + 0.5
    rm = obj.RunningMoments()
    history = []
    for step in range(3):
        p = (policy.detach().double() + step).to(dtype).requires_grad_(True)
        out = obj.bco_loss(p, refp, desirable, beta=0.2, running=rm, udm_weights=udm, reduction="none")
        history.append(0.2 * (p.detach().double() - refp.double()))
        delta = ref.running_moments(history)[0]
        assert_close(out.delta, delta, dtype)
        exp, rewards = ref.bco_loss(leaf(p), refp, desirable, 0.2, delta, udm)
        assert_close(out.loss, exp, dtype)
        assert_close(out.rewards, rewards, dtype)
    frozen = obj.bco_loss(p, refp, desirable, beta=0.2, running=rm, update_running=False).delta
    assert_close(frozen, delta, dtype)
    fixed = obj.bco_loss(p, refp, desirable, beta=0.2, delta=0.3, reduction="sum").loss
    assert_close(fixed, ref.bco_loss(p, refp, desirable, 0.2, 0.3)[0].sum(), dtype)


def test_bco_gradcheck_and_extremes():
    B = 7
    policy, refp, desirable, _, _ = kto_inputs(B, torch.float64)
    assert torch.autograd.gradcheck(lambda p: obj.bco_loss(p, refp, desirable, delta=0.1).loss, (leaf(policy),))
    huge = leaf(torch.tensor([1e30, -1e30, 3e38, -3e38]))
    out = obj.bco_loss(huge, None, torch.tensor([True, False, False, True]), delta=0.0, reduction="sum")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(huge.grad).all()


# ---- CPO / TPO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "loss_type,alphapo",
    [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.3), ("sigmoid", -0.2)],
)
def test_cpo_matches_reference(dtype, loss_type, alphapo):
    B = 23
    nc, nr = torch.randint(1, 60, (B,)), torch.randint(1, 60, (B,))
    pc, pr = seq_logps(B, dtype, True, scale=5), seq_logps(B, dtype, True, scale=5)
    if alphapo and loss_type == "sigmoid":  # AlphaPO on summed log-probs: keep p^-alpha in range
        pc, pr = leaf(pc.detach() / 10), leaf(pr.detach() / 10)
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=eps)
    out = obj.cpo_loss(
        pc, pr, alpha=0.7, gamma=0.4, alphapo_alpha=alphapo, chosen_lengths=nc, rejected_lengths=nr, **kw
    )
    rc, rr = leaf(pc), leaf(pr)
    exp, _, cr, rj = ref.cpo_loss(
        rc, rr, cpo_alpha=0.7, simpo_gamma=0.4, alpha=alphapo, chosen_lengths=nc, rejected_lengths=nr, **kw
    )
    assert_close(out.loss, exp, dtype)
    assert_close(out.chosen_rewards, cr, dtype)
    assert_close(out.rejected_rewards, rj, dtype)
    for g, w in zip(grads_of(out.loss, (pc, pr)), grads_of(exp, (rc, rr))):
        assert_close(g, w, dtype)


def test_cpo_and_simpo_match_liger():
    cpo = pytest.importorskip("liger_kernel.chunked_loss.cpo_loss")
    simpo = pytest.importorskip("liger_kernel.chunked_loss.simpo_loss")
    B = 24
    a, b = -torch.rand(B) * 3, -torch.rand(B) * 3  # mean log-probs, as Liger takes them
    target = torch.zeros(2 * B, 4)
    for eps in (0.0, 0.1):
        loss, cr, rr = cpo.LigerFusedLinearCPOFunction.preference_loss_fn(a, b, target, beta=0.3, label_smoothing=eps)
        out = obj.cpo_loss(a, b, beta=0.3, alpha=0.0, label_smoothing=eps)
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.chosen_rewards, cr)
        torch.testing.assert_close(out.rejected_rewards, rr)
        loss = simpo.LigerFusedLinearSimPOFunction.preference_loss_fn(
            a, b, target, beta=2.0, gamma=0.5, label_smoothing=eps
        )[0]
        out = obj.cpo_loss(a, b, beta=2.0, alpha=0.0, loss_type="simpo", gamma=0.5, label_smoothing=eps)
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def test_cpo_nll_forms():
    B = 9
    pc, pr = seq_logps(B, torch.float64), seq_logps(B, torch.float64)
    nc = torch.randint(1, 50, (B,))
    base = obj.cpo_loss(pc, pr, alpha=0.0).loss
    derived = obj.cpo_loss(pc, pr, alpha=0.5, chosen_lengths=nc).loss
    torch.testing.assert_close(derived, base + 0.5 * (-pc.sum() / nc.sum()))
    batch = obj.cpo_loss(pc, pr, torch.tensor(2.0, dtype=torch.float64), alpha=0.5).loss
    torch.testing.assert_close(batch, base + 1.0)
    per_pair = torch.rand(B, dtype=torch.float64)
    none = obj.cpo_loss(pc, pr, per_pair, alpha=0.5, reduction="none")
    torch.testing.assert_close(none.loss, obj.cpo_loss(pc, pr, alpha=0.0, reduction="none").loss + 0.5 * per_pair)
    torch.testing.assert_close(none.nll_loss, per_pair)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "tpo-l"])
def test_tpo_matches_reference(loss_type):
    B = 19
    nc, nr, ng = (torch.randint(1, 60, (B,)) for _ in range(3))
    pc, pr, gold = (seq_logps(B, torch.float64, True) for _ in range(3))
    kw = dict(
        beta=0.05,
        loss_type=loss_type,
        label_smoothing=0.05 if loss_type in ("sigmoid", "tpo-l") else 0.0,
        chosen_lengths=nc,
        rejected_lengths=nr,
        gold_lengths=ng,
    )
    out = obj.tpo_loss(pc, pr, gold, alpha=0.8, gamma=0.3, **kw)
    rin = [leaf(t) for t in (pc, pr, gold)]
    exp, _ = ref.tpo_loss(*rin, tpo_alpha=0.8, tpo_l_gamma=0.3, **kw)
    torch.testing.assert_close(out.loss, exp, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads_of(out.loss, (pc, pr, gold)), grads_of(exp, rin)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert obj.tpo_loss(pc, pr, alpha=0.0, loss_type=loss_type, chosen_lengths=nc, rejected_lengths=nr).loss.isfinite()


def test_cpo_tpo_gradcheck():
    B = 5
    nc, nr = torch.randint(1, 9, (B,)), torch.randint(1, 9, (B,))
    pc, pr, gold = (leaf(-torch.rand(B, dtype=torch.float64) * 10) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda c, r: (
            obj.cpo_loss(
                c, r, loss_type="simpo", alphapo_alpha=0.2, chosen_lengths=nc, rejected_lengths=nr, reduction="none"
            ).loss
        ),
        (pc, pr),
    )
    assert torch.autograd.gradcheck(lambda c, r, g: obj.tpo_loss(c, r, g, beta=0.5).loss, (pc, pr, gold))


# ---- RRHF / PRO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rrhf_matches_reference(dtype):
    B, K = 6, 5
    logps = (-torch.rand(B, K, dtype=torch.float64) * 80).to(dtype).requires_grad_(True)
    rewards = torch.randint(0, 4, (B, K)).double()  # ties: no pair, first max is the best
    lengths = torch.randint(0, 40, (B, K))
    out = obj.rrhf_loss(logps, rewards, lengths, rank_weight=3.0, length_penalty=0.8, reduction="none")
    rl = leaf(logps)
    exp = ref.rrhf_loss(rl, rewards, lengths, 3.0, 0.8)
    assert_close(out.loss, exp, dtype)
    torch.testing.assert_close(out.best, rewards.argmax(1))
    (g,) = grads_of(out.loss.sum(), (logps,))
    (w,) = grads_of(exp.sum(), (rl,))
    if dtype == torch.bfloat16:
        torch.testing.assert_close(g.double(), w.to(dtype).double(), rtol=1e-2, atol=1e-6)
    else:
        assert_close(g, w, dtype)


def test_rrhf_gradcheck():
    B, K = 3, 4
    logps = leaf(-torch.rand(B, K, dtype=torch.float64) * 30)
    rewards = torch.randn(B, K, dtype=torch.float64)
    lengths = torch.randint(1, 20, (B, K))
    assert torch.autograd.gradcheck(lambda lp: obj.rrhf_loss(lp, rewards, lengths).loss, (logps,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pro_matches_reference(dtype):
    scores = (torch.randn(7, 6, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    out = obj.pro_loss(scores, reduction="none")
    rs = leaf(scores)
    exp = ref.pro_loss(rs)
    assert_close(out.loss, exp, dtype)
    (g,) = grads_of(out.loss.sum(), (scores,))
    (w,) = grads_of(exp.sum(), (rs,))
    if dtype == torch.bfloat16:
        torch.testing.assert_close(g.double(), w.to(dtype).double(), rtol=1e-2, atol=1e-6)
    else:
        assert_close(g, w, dtype)
    assert obj.pro_loss(scores[:, :1]).loss == 0  # one candidate: nothing to rank


def test_pro_gradcheck_and_extremes():
    assert torch.autograd.gradcheck(lambda s: obj.pro_loss(s).loss, (leaf(torch.randn(3, 5, dtype=torch.float64)),))
    s = leaf(torch.tensor([[1e4, -1e4, 0.0, 3e4], [-8e3, 8e3, 1e3, -1e3]]))
    out = obj.pro_loss(s, reduction="sum")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(out.loss.double(), ref.pro_loss(s.detach()).sum(), rtol=1e-6, atol=1e-3)


# ---- Curry-DPO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["best_vs_rest", "all_pairs"])
def test_curry_pairs_match_reference(mode):
    rewards = torch.tensor([[1.0, 4.0, 2.0, 4.0], [3.0, 3.0, 3.0, 1.0], [0.5, 9.0, 7.5, 2.0]])
    out = obj.curry_pairs(rewards, mode=mode)
    P = 3 if mode == "best_vs_rest" else 6
    assert out.chosen.shape == out.rejected.shape == out.gap.shape == out.valid.shape == (3, P)
    for b, row in enumerate(ref.curry_pairs(rewards, mode)):
        assert [(int(c), int(r)) for c, r in zip(out.chosen[b], out.rejected[b])] == [(c, r) for c, r, _ in row]
        assert out.gap[b].tolist() == [g for _, _, g in row]
    assert torch.equal(out.valid, out.gap > 0)
    flat = out.gap.reshape(-1)[out.order]
    assert bool((flat[:-1] >= flat[1:]).all())
    assert sorted(out.order.tolist()) == list(range(3 * P))
    ints = obj.curry_pairs(torch.tensor([[1, 5, 3]]))
    assert ints.chosen.tolist() == [[1, 1]] and ints.rejected.tolist() == [[0, 2]] and ints.gap.tolist() == [[4, 2]]


# ---- LD-DPO / WPO ------------------------------------------------------------------------------------


def padded_pair_batch(B, T, dtype=torch.float64, left=False):
    lens = torch.randint(0, T + 1, (2 * B,))
    pos = torch.arange(T).expand(2 * B, T)
    mask = pos >= (T - lens[:, None]) if left else pos < lens[:, None]
    per_token = -torch.rand(2 * B, T, dtype=torch.float64) * 4
    per_token = torch.where(mask, per_token, torch.full_like(per_token, -7.0))  # junk outside the mask
    return per_token.to(dtype), mask


@pytest.mark.parametrize("left", [False, True])
def test_ld_logps_matches_reference_and_trl(left):
    per_token, mask = padded_pair_batch(5, 11, left=left)
    per_token.requires_grad_(True)
    out = obj.ld_logps(per_token, mask, ld_alpha=0.3)
    rp = leaf(per_token)
    ec, er = ref.ld_logps(rp, mask, 0.3)
    torch.testing.assert_close(out.chosen, ec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rejected, er, rtol=1e-12, atol=1e-12)
    got = grads_of(out.chosen.sum() + 2 * out.rejected.sum(), (per_token,))[0]
    want = grads_of(ec.sum() + 2 * er.sum(), (rp,))[0]
    torch.testing.assert_close(got, want)
    # TRL's cumsum formula, on log-probs that are 0 outside the mask as its model outputs are
    lp = per_token.detach() * mask
    comp_pos = mask.cumsum(1)
    lens = mask.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2)[:, None]
    trl = (lp * ((comp_pos > 0) & (comp_pos <= shared))).sum(1) + 0.3 * (lp * (comp_pos > shared)).sum(1)
    torch.testing.assert_close(torch.cat([out.chosen, out.rejected]), trl)
    full = obj.ld_logps(per_token, mask, ld_alpha=1.0)
    torch.testing.assert_close(torch.cat([full.chosen, full.rejected]), lp.sum(1))


def test_wpo_weights_match_reference_and_trl():
    per_token, mask = padded_pair_batch(4, 9)
    lss = -torch.rand_like(per_token) * 2
    w = obj.wpo_weights(per_token, lss, mask)
    ec, er = ref.wpo_weights(per_token, lss, mask)
    torch.testing.assert_close(w.chosen, ec)
    torch.testing.assert_close(w.rejected, er)
    torch.testing.assert_close(w.pair, ec * er)
    aligned = (per_token - lss) * mask  # TRL: junk is multiplied by the mask
    torch.testing.assert_close(torch.cat([w.chosen, w.rejected]), torch.exp(aligned.sum(1) / mask.sum(1).clamp_min(1)))
    assert not w.chosen.requires_grad


# ---- Diffusion-DPO / DRO -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_dpo_matches_reference(dtype):
    B = 16
    mse = [(torch.rand(B, dtype=torch.float64) * 0.2).to(dtype).requires_grad_(True) for _ in range(4)]
    out = obj.diffusion_dpo_loss(*mse, beta=2500.0, reduction="none")
    rin = [leaf(t) for t in mse]
    exp, inside = ref.diffusion_dpo_loss(*rin, 2500.0)
    assert_close(out.loss, exp, dtype)
    assert_close(out.inside, inside, dtype)
    assert torch.equal(out.implicit_accuracy.bool(), inside > 0)
    if dtype != torch.bfloat16:
        for g, w in zip(grads_of(out.loss.sum(), mse), grads_of(exp.sum(), rin)):
            assert_close(g, w, dtype)
    huge = obj.diffusion_dpo_loss(
        torch.tensor([1e6]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=5000.0
    )
    assert torch.isfinite(huge.loss)


def test_diffusion_dpo_gradcheck():
    mse = [leaf(torch.rand(5, dtype=torch.float64) * 1e-3) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *m: obj.diffusion_dpo_loss(*m, beta=1000.0).loss, mse)


def test_dro_matches_the_authors_code():
    B = 12
    win, lose = leaf(torch.rand(B, dtype=torch.float64)), leaf(torch.rand(B, dtype=torch.float64))
    mse = torch.cat([win, lose])
    reward = torch.cat([torch.ones(B), -torch.ones(B)])
    out = obj.dro_loss(mse, None, reward)
    exp = ref.dro_loss_paired(win, lose)
    torch.testing.assert_close(2 * out.loss, exp)
    torch.testing.assert_close(obj.dro_loss(mse, None, reward, reduction="sum").loss / B, exp)
    ref_mse = torch.rand(2 * B, dtype=torch.float64)
    shifted = obj.dro_loss(mse, ref_mse, reward, beta=3.0, reduction="none")
    torch.testing.assert_close(shifted.loss, 3.0 * reward.double() * (mse - ref_mse))
    torch.testing.assert_close(shifted.advantage, (mse - ref_mse).detach())
    g = grads_of(shifted.loss.sum(), (win,))[0]
    torch.testing.assert_close(g, torch.full((B,), 3.0, dtype=torch.float64))
    assert obj.dro_loss(mse.float(), None, reward.long()).loss.dtype == torch.float32


# ---- torch.compile ----------------------------------------------------------------------------------


def test_compile_fullgraph_traces_without_breaks():
    """Dynamo traces each objective into one graph (the eager backend keeps this fast; inductor was checked
    by hand)."""
    pc, pr = -torch.rand(8) * 3, -torch.rand(8) * 3
    lab = torch.rand(8) < 0.5
    calls = {
        "orpo": lambda a, b: obj.orpo_loss(a, b).loss,
        "kto": lambda a, b: obj.kto_loss(a, b, lab, policy_kl_logps=a, ref_kl_logps=b).loss,
        "bco": lambda a, b: obj.bco_loss(a, b, lab, delta=0.1).loss,
        "cpo": lambda a, b: obj.cpo_loss(a, b).loss,
        "pro": lambda a, b: obj.pro_loss(torch.stack([a, b], 1)).loss,
        "rrhf": lambda a, b: obj.rrhf_loss(torch.stack([a, b], 1), torch.stack([b, a], 1), torch.ones(8, 2)).loss,
    }
    for name, fn in calls.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(pc, pr), fn(pc, pr), msg=name)


# ---- empty batches, reductions, bad input ------------------------------------------------------------


def test_empty_batches():
    e = torch.empty(0)
    assert obj.orpo_loss(e, e, reduction="sum").loss == 0
    assert obj.kto_loss(e, e, e.bool(), reduction="sum").loss == 0
    assert obj.bco_loss(e, e, e.bool(), running=obj.RunningMoments(), reduction="sum").loss == 0
    assert obj.cpo_loss(e, e, reduction="none").loss.shape == (0,)
    assert obj.rrhf_loss(torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 3), reduction="sum").loss == 0
    assert obj.pro_loss(torch.empty(0, 3), reduction="none").loss.shape == (0,)


def test_bad_input_messages():
    pc, pr = seq_logps(8, torch.float32), seq_logps(8, torch.float32)
    lab = torch.rand(8) < 0.5
    with pytest.raises(ValueError, match=r"policy_rejected_logps must have the shape of policy_chosen_logps \(8,\)"):
        obj.orpo_loss(pc, pr[:5])
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be a 1-D tensor of shape \[B\], got shape \(2,"):
        obj.orpo_loss(pc.view(2, 4), pr.view(2, 4))
    with pytest.raises(ValueError, match="must be float32, float64, float16 or bfloat16, got torch.int64"):
        obj.cpo_loss(pc.long(), pr.long())
    with pytest.raises(ValueError, match="beta must be a finite float > 0, got 0.0"):
        obj.orpo_loss(pc / 100, pr / 100, beta=0.0)
    with pytest.raises(ValueError, match="the mean log-probs must be <= 0"):
        obj.orpo_loss(-pc, pr)
    with pytest.raises(ValueError, match=r"chosen_nll must be \[B\] = \(8,\) or 0-d"):
        obj.orpo_loss(pc / 100, pr / 100, torch.ones(3))
    with pytest.raises(ValueError, match=r"chosen_lengths must have the shape of policy_chosen_logps"):
        obj.orpo_loss(pc, pr, chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        obj.kto_loss(pc, pr, lab, reduction="avg")
    with pytest.raises(ValueError, match=r"is_desirable must be a bool \(or integer 0/1\) tensor, got torch.float32"):
        obj.kto_loss(pc, pr, lab.float())
    with pytest.raises(ValueError, match=r"is_desirable must have the shape of policy_logps \(8,\)"):
        obj.kto_loss(pc, pr, lab[:3])
    with pytest.raises(ValueError, match="pass either kl or policy_kl_logps / ref_kl_logps, not both"):
        obj.kto_loss(pc, pr, lab, kl=0.1, policy_kl_logps=pc, ref_kl_logps=pr)
    with pytest.raises(ValueError, match="policy_kl_logps and ref_kl_logps go together"):
        obj.kto_loss(pc, pr, lab, policy_kl_logps=pc)
    with pytest.raises(ValueError, match="loss_type='apo_zero_unpaired' uses no KL estimate"):
        obj.kto_loss(pc, pr, lab, loss_type="apo_zero_unpaired", kl=0.1)
    with pytest.raises(ValueError, match="loss_type must be 'kto' or 'apo_zero_unpaired', got 'sigmoid'"):
        obj.kto_loss(pc, pr, lab, loss_type="sigmoid")
    with pytest.raises(ValueError, match="undesirable_weight must be a finite float >= 0, got -1.0"):
        obj.kto_loss(pc, pr, lab, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="kl must be a number or a one-element tensor"):
        obj.kto_loss(pc, pr, lab, kl=torch.zeros(2))
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        obj.kto_loss(pc, pr, lab, policy_kl_logps=pc, ref_kl_logps=pr, process_group=object())
    with pytest.raises(ValueError, match="bco_loss needs exactly one of running"):
        obj.bco_loss(pc, pr, lab)
    with pytest.raises(ValueError, match="bco_loss needs exactly one of running"):
        obj.bco_loss(pc, pr, lab, running=obj.RunningMoments(), delta=0.0)
    with pytest.raises(ValueError, match="running must be an alignops.objectives.RunningMoments"):
        obj.bco_loss(pc, pr, lab, running={"mean": 0.0})
    with pytest.raises(ValueError, match="cpo_loss: loss_type must be one of sigmoid, hinge, ipo, simpo"):
        obj.cpo_loss(pc, pr, loss_type="tpo-l")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\), got 1.0"):
        obj.cpo_loss(pc, pr, label_smoothing=1.0)
    with pytest.raises(ValueError, match="tpo_loss needs gold_logps for its NLL term"):
        obj.tpo_loss(pc, pr)
    with pytest.raises(ValueError, match=r"logps must be a 2-D tensor of shape \[B, K\]"):
        obj.rrhf_loss(pc, pc, pc)
    with pytest.raises(ValueError, match=r"lengths must have the shape of logps \(2, 4\)"):
        obj.rrhf_loss(pc.view(2, 4), pc.view(2, 4), torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"scores must be a 2-D tensor of shape \[B, K\] \(best candidate first\)"):
        obj.pro_loss(pc)
    with pytest.raises(ValueError, match="rewards needs K >= 2 candidates"):
        obj.curry_pairs(torch.ones(3, 1))
    with pytest.raises(ValueError, match="mode must be 'best_vs_rest' or 'all_pairs'"):
        obj.curry_pairs(torch.ones(3, 2), mode="ladder")
    with pytest.raises(ValueError, match=r"per_token_logps must hold 2B rows"):
        obj.ld_logps(torch.zeros(3, 4), torch.ones(3, 4), ld_alpha=0.5)
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\], got 1.5"):
        obj.ld_logps(torch.zeros(2, 4), torch.ones(2, 4), ld_alpha=1.5)
    with pytest.raises(ValueError, match=r"completion_mask must have the shape of per_token_logps \(2, 4\)"):
        obj.wpo_weights(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"ref_mse_l must have the shape of model_mse_w \(8,\)"):
        obj.diffusion_dpo_loss(pc, pc, pc, pc[:2], beta=100.0)
    with pytest.raises(ValueError, match="reward must be a float or integer tensor"):
        obj.dro_loss(pc, None, lab)
