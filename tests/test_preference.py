"""preference family, native CPU kernels and the torch backend: vs the reference, vs Liger-Kernel and
torch, opcheck, gradcheck, torch.compile, bad input. Triton kernels: tests/test_preference_triton.py."""

import math
import os
import subprocess
import sys

import pytest
import torch

import alignops
from alignops.reference import preference as ref

# Per-dtype tolerances (rtol, atol) against the reference computed on the same input values.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}

SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}  # types that need / accept a label_smoothing


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    """Both compiled copies of the vectorised CPU kernel (AVX2+FMA and portable)."""
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


def make_logps(B, dtype, requires_grad=False, scale=1.0):
    """Log-probs shaped like real per-sequence sums: around -60, policy and reference close."""
    base = -60 + 10 * torch.randn(B, dtype=torch.float64)
    out = []
    for off in (0.0, -3.0, 0.5, -2.0):
        t = (base + off + scale * torch.randn(B, dtype=torch.float64)).to(dtype)
        out.append(t.requires_grad_(requires_grad))
    return out


def lengths(B):
    return torch.randint(1, 120, (B,)), torch.randint(0, 120, (B,))  # a zero length is clamped to 1


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# ---- preference_loss vs the reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("loss_type", alignops.LOSS_TYPES)
def test_preference_loss_matches_reference(cpu_capability, loss_type, dtype):
    B = 67  # not a multiple of the vector width: the tail lanes are exercised
    inputs = make_logps(B, dtype, requires_grad=True)
    lc, lr = lengths(B)
    kw = dict(
        loss_type=loss_type,
        beta=0.2,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
        chosen_lengths=lc,
        rejected_lengths=lr,
        reduction="none",
    )
    out = alignops.preference_loss(*inputs, **kw, backend="native")
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    exp_loss, exp_cr, exp_rj = ref.preference_loss(*ref_inputs, **kw)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.loss, exp_loss, dtype)
    assert_close(out.chosen_rewards, exp_cr, dtype)
    assert_close(out.rejected_rewards, exp_rj, dtype)

    w = torch.rand(B, dtype=torch.float64)
    (out.loss * w.to(out.loss.dtype)).sum().backward()
    (exp_loss * w.to(exp_loss.dtype)).sum().backward()
    for got, exp in zip(inputs, ref_inputs):
        assert got.grad.dtype == dtype
        rtol, atol = TOL[dtype]
        if dtype == torch.bfloat16:  # the gradient itself is rounded to bf16
            rtol, atol = 1e-2, 1e-5
        exp_grad = torch.zeros_like(got) if exp.grad is None else exp.grad  # reference-free types
        torch.testing.assert_close(got.grad.double(), exp_grad.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_backends_agree(backend, reduction):
    inputs = make_logps(33, torch.float32)
    out = alignops.preference_loss(*inputs, reduction=reduction, backend=backend)
    exp = ref.preference_loss(*inputs, reduction=reduction)[0]
    torch.testing.assert_close(out.loss, exp)
    assert out.loss.shape == ((33,) if reduction == "none" else ())


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences(loss_type, fdiv):
    inputs = make_logps(41, torch.float64, requires_grad=True, scale=0.3)
    lc, lr = lengths(41)
    kw = dict(
        loss_type=loss_type,
        beta=0.5,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
        chosen_lengths=lc,
        rejected_lengths=lr,
        f_divergence_type=fdiv,
        f_alpha_divergence_coef=0.3,
        reduction="sum",
    )
    out = alignops.preference_loss(*inputs, **kw)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    exp = ref.preference_loss(*ref_inputs, **kw)[0]
    torch.testing.assert_close(out.loss, exp, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    exp.backward()
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-10)


def trl_scores(x, fdiv, alpha):
    """TRL 1.16 DPOTrainer._compute_loss, written out: f'(t) with its additive constants (TRL 1.0 - 1.9
    dropped them: -exp(-x), logsig(x), exp((a-1)x)/(a-1); they cancel in s(xc) - s(xr) but not after
    dividing by unequal lengths)."""
    if fdiv == "forward_kl":
        return 1 - torch.exp(-x)
    if fdiv == "js_divergence":
        return math.log(2) + torch.nn.functional.logsigmoid(x)
    return (torch.exp(torch.clamp((alpha - 1) * x, max=80.0)) - 1) / (alpha - 1)


PREF_BACKENDS = ["native", "torch"] + (["triton"] if alignops._backend.triton_available() else [])


@pytest.mark.parametrize("backend", PREF_BACKENDS)
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "ln_dpo", "sigmoid"])
def test_f_divergence_length_normalised_matches_trl(backend, loss_type, fdiv):
    logsig = torch.nn.functional.logsigmoid
    pc, pr, rc, rr = make_logps(23, torch.float64, scale=0.3)
    lc, lr = torch.randint(1, 60, (23,)), torch.randint(1, 60, (23,))
    beta, alpha = 0.3, 0.4
    sc, sr = trl_scores(pc - rc, fdiv, alpha), trl_scores(pr - rr, fdiv, alpha)
    if loss_type == "ipo":
        exp = (sc / lc - sr / lr - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        exp = -logsig(beta * (sc - sr))
    else:
        exp = -logsig(beta * (sc / lc - sr / lr))
    got = alignops.preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=beta,
        chosen_lengths=lc,
        rejected_lengths=lr,
        f_divergence_type=fdiv,
        f_alpha_divergence_coef=alpha,
        reduction="none",
        backend=backend,
    )
    torch.testing.assert_close(got.loss, exp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", PREF_BACKENDS)
def test_sigmoid_label_smoothing_is_cdpo(backend):
    # TRL 1.16 ignores label_smoothing for "sigmoid" (only robust / exo_pair read it); alignops applies cDPO,
    # as Liger-Kernel and TRL < 1.0 do, so a value the caller sets is never silently dropped; 0 gives TRL's.
    logsig = torch.nn.functional.logsigmoid
    pc, pr, rc, rr = make_logps(17, torch.float64)
    d = (pc - rc) - (pr - rr)
    for eps in (0.0, 0.2):
        got = alignops.preference_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps, reduction="none", backend=backend)
        torch.testing.assert_close(
            got.loss, -(1 - eps) * logsig(0.1 * d) - eps * logsig(-0.1 * d), rtol=1e-10, atol=1e-12
        )


def test_combined_loss_types_with_weights_and_aot():
    inputs = make_logps(29, torch.float64, requires_grad=True)
    kw = dict(
        loss_type=["sigmoid", "aot", "sppo_hard", "aot_unpaired"],
        loss_weights=[1.0, 0.5, 0.01, 2.0],
        beta=0.1,
        label_smoothing=0.05,
    )
    out = alignops.preference_loss(*inputs, **kw)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    exp = ref.preference_loss(*ref_inputs, **kw)[0]
    torch.testing.assert_close(out.loss, exp, rtol=1e-12, atol=1e-12)
    out.loss.backward()
    exp.backward()
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_weights_scale_each_term():
    inputs = make_logps(16, torch.float64)
    a = alignops.preference_loss(*inputs, loss_type="sigmoid", reduction="none").loss
    b = alignops.preference_loss(*inputs, loss_type="hinge", reduction="none").loss
    both = alignops.preference_loss(
        *inputs, loss_type=["sigmoid", "hinge"], loss_weights=[0.25, 3.0], reduction="none"
    ).loss
    torch.testing.assert_close(both, 0.25 * a + 3.0 * b, rtol=1e-12, atol=1e-12)


def test_per_sample_beta():
    inputs = make_logps(50, torch.float64, requires_grad=True)
    beta = torch.rand(50, dtype=torch.float64) + 0.05
    out = alignops.preference_loss(*inputs, beta=beta, reduction="none")
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    exp, cr, _ = ref.preference_loss(*ref_inputs, beta=beta, reduction="none")
    torch.testing.assert_close(out.loss, exp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, cr, rtol=1e-12, atol=1e-12)
    # Per pair: pair i's loss equals a scalar-beta call with beta[i].
    i = 7
    single = alignops.preference_loss(*[t[i : i + 1] for t in inputs], beta=float(beta[i]), reduction="none").loss
    torch.testing.assert_close(out.loss[i : i + 1], single, rtol=1e-12, atol=1e-12)


def test_simpo_cpo_ignore_the_reference():
    pc, pr, rc, rr = make_logps(20, torch.float64)
    for t in ("simpo", "cpo"):
        with_ref = alignops.preference_loss(pc, pr, rc, rr, loss_type=t, reduction="none").loss
        without = alignops.preference_loss(pc, pr, loss_type=t, reduction="none").loss
        torch.testing.assert_close(with_ref, without, rtol=0, atol=0)


def test_policy_equal_reference_gives_log2():
    pc, pr, _, _ = make_logps(10, torch.float32)
    out = alignops.preference_loss(pc, pr, pc, pr, reduction="none")
    torch.testing.assert_close(out.loss, torch.full((10,), math.log(2.0)), rtol=1e-7, atol=1e-7)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_margins_and_accuracy():
    pc = torch.tensor([-1.0, -5.0, -2.0])
    pr = torch.tensor([-3.0, -1.0, -2.0])
    out = alignops.preference_loss(pc, pr, torch.zeros(3), torch.zeros(3), beta=0.5, reduction="none")
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -2.0, 0.0]))
    torch.testing.assert_close(out.accuracy, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("loss_type", alignops.LOSS_TYPES)
def test_stable_for_huge_margins(loss_type):
    # |beta * delta| ~ 1e4: naive exp/log forms overflow; the kernels must stay finite.
    pc = torch.tensor([0.0, -1e5, -3.0, -1e5], dtype=torch.float32, requires_grad=True)
    pr = torch.tensor([-1e5, 0.0, -3.0, -2e5], dtype=torch.float32, requires_grad=True)
    zeros = torch.zeros(4)
    out = alignops.preference_loss(
        pc,
        pr,
        zeros,
        zeros,
        loss_type=loss_type,
        beta=0.1,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
        chosen_lengths=torch.ones(4),
        rejected_lengths=torch.ones(4),
        reduction="sum",
    )
    out.loss.backward()
    assert torch.isfinite(out.loss), out.loss
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_discopop_finite_where_the_naive_form_is_nan():
    # z = beta * margin = -90: exp(-z) overflows fp32, and TRL's form gives inf * 0 = NaN. The exact loss
    # is -logsig(z) (1 - m) + exp(-z) m with m = sig(z / 0.05) ~ e^-1800, i.e. 90 to fp32 precision.
    pc, pr, z = torch.tensor([-1000.0]), torch.tensor([-100.0]), torch.zeros(1)
    assert torch.isnan(ref.preference_loss(pc, pr, z, z, "discopop", beta=0.1)[0])
    torch.testing.assert_close(
        alignops.preference_loss(pc, pr, z, z, loss_type="discopop", beta=0.1).loss, torch.tensor(90.0)
    )


def test_empty_batch():
    inputs = [torch.zeros(0, requires_grad=True) for _ in range(4)]
    out = alignops.preference_loss(*inputs, reduction="sum")
    out.loss.backward()
    assert out.loss.item() == 0.0 and inputs[0].grad.shape == (0,)
    assert alignops.preference_loss(*inputs, reduction="none").loss.shape == (0,)


def test_no_grad_path_skips_gradient_buffer():
    inputs = make_logps(8, torch.float32)
    res = torch.ops.alignops.preference_loss(*inputs, None, None, None, [0], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, False)
    assert res[3].numel() == 0


# ---- peers: Liger-Kernel's loss functions (TRL's formulas) -----------------------------------------

LIGER_DPO_TYPES = [
    "sigmoid",
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
]


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
def test_dpo_types_match_liger(loss_type):
    dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")
    B = 32
    pc, pr, rc, rr = make_logps(B, torch.float32)
    eps = SMOOTHING.get(loss_type, 0.0)
    target = torch.zeros(2 * B, 4)  # Liger divides the summed loss by full_target.shape[0] // 2 pairs
    exp_loss, exp_cr, exp_rj = dpo.LigerFusedLinearDPOFunction.preference_loss_fn(
        pc, pr, target, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps, discopop_tau=0.05
    )
    out = alignops.preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=0.1, label_smoothing=eps, discopop_tau=0.05, reduction="mean"
    )
    torch.testing.assert_close(out.loss, exp_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, exp_cr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, exp_rj, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_and_cpo_match_liger(eps):
    simpo = pytest.importorskip("liger_kernel.chunked_loss.simpo_loss")
    cpo = pytest.importorskip("liger_kernel.chunked_loss.cpo_loss")
    B = 24
    # Liger's SimPO takes already-averaged log-probs: pass those, no lengths.
    pc, pr = -torch.rand(B) * 3, -torch.rand(B) * 3
    target = torch.zeros(2 * B, 4)
    exp = simpo.LigerFusedLinearSimPOFunction.preference_loss_fn(
        pc, pr, target, beta=2.0, gamma=0.5, label_smoothing=eps
    )[0]
    out = alignops.preference_loss(pc, pr, loss_type="simpo", beta=2.0, gamma=0.5, label_smoothing=eps)
    torch.testing.assert_close(out.loss, exp, rtol=1e-5, atol=1e-6)
    exp = cpo.LigerFusedLinearCPOFunction.preference_loss_fn(pc, pr, target, beta=0.1, label_smoothing=eps)[0]
    out = alignops.preference_loss(pc, pr, loss_type="cpo", beta=0.1, label_smoothing=eps)
    torch.testing.assert_close(out.loss, exp, rtol=1e-5, atol=1e-6)


# ---- op machinery ----------------------------------------------------------------------------------


def _op_args(B, dtype, compute_grad=True, **over):
    pc, pr, rc, rr = make_logps(B, dtype, requires_grad=compute_grad)
    lc, lr = lengths(B)
    args = dict(
        beta=None,
        lc=lc.to(dtype),
        lr=lr.to(dtype),
        types=[0, 2, 5, 11, 13],
        weights=[1.0, 0.1, 0.5, 0.2, 0.3],
        beta_value=0.3,
        ls=0.1,
        gamma=0.5,
        tau=0.05,
        fdiv=0,
        alpha=0.5,
    )
    args.update(over)
    return (
        pc,
        pr,
        rc,
        rr,
        args["beta"],
        args["lc"],
        args["lr"],
        args["types"],
        args["weights"],
        args["beta_value"],
        args["ls"],
        args["gamma"],
        args["tau"],
        args["fdiv"],
        args["alpha"],
        compute_grad,
    )


@pytest.mark.parametrize("fdiv", [0, 2])
def test_opcheck_preference_loss(fdiv):
    torch.library.opcheck(torch.ops.alignops.preference_loss.default, _op_args(9, torch.float32, fdiv=fdiv))
    torch.library.opcheck(torch.ops.alignops.preference_loss.default, _op_args(9, torch.float32, False))
    torch.library.opcheck(
        torch.ops.alignops.preference_loss.default,
        _op_args(5, torch.float64, beta=torch.rand(5, dtype=torch.float64) + 0.1),
    )


@pytest.mark.parametrize("loss_type", alignops.LOSS_TYPES)
def test_gradcheck(loss_type):
    inputs = make_logps(6, torch.float64, requires_grad=True, scale=0.3)
    lc, lr = lengths(6)

    def fn(*x):
        return alignops.preference_loss(
            *x,
            loss_type=loss_type,
            beta=0.7,
            label_smoothing=SMOOTHING.get(loss_type, 0.0),
            chosen_lengths=lc,
            rejected_lengths=lr,
            reduction="none",
        ).loss

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph():
    inputs = make_logps(16, torch.float32, requires_grad=True)
    lc, lr = lengths(16)

    def step(pc, pr, rc, rr):
        out = alignops.preference_loss(
            pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], beta=0.1, chosen_lengths=lc, rejected_lengths=lr
        )
        return out.loss, out.margins

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, margins = compiled(*inputs)
    loss.backward()
    exp_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    exp_loss, exp_margins = step(*exp_inputs)
    exp_loss.backward()
    torch.testing.assert_close(loss, exp_loss)
    torch.testing.assert_close(margins, exp_margins)
    for a, b in zip(inputs, exp_inputs):
        torch.testing.assert_close(a.grad, b.grad)


def test_module_wrapper():
    inputs = make_logps(12, torch.float32)
    module = alignops.nn.PreferenceLoss(loss_type="robust", beta=0.2, label_smoothing=0.1)
    assert "robust" in repr(module)
    torch.testing.assert_close(
        module(*inputs).loss, alignops.preference_loss(*inputs, loss_type="robust", beta=0.2, label_smoothing=0.1).loss
    )
    with pytest.raises(ValueError, match="label_smoothing must lie in \\[0, 0.5\\) for loss_type='robust'"):
        alignops.nn.PreferenceLoss(loss_type="robust", label_smoothing=0.6)


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_input_messages(backend):
    pc, pr, rc, rr = make_logps(8, torch.float32)

    def call(*args, **kw):
        return alignops.preference_loss(*args, backend=backend, **kw)

    with pytest.raises(
        ValueError, match=r"policy_rejected_logps must have the shape of policy_chosen_logps \[8\], got \[5\]"
    ):
        call(pc, pr[:5], rc, rr)
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be a 1-D tensor of shape \[B\]"):
        call(pc.view(2, 4), pr.view(2, 4))
    with pytest.raises(ValueError, match="ref_chosen_logps must have the dtype of policy_chosen_logps"):
        call(pc, pr, rc.double(), rr)
    with pytest.raises(ValueError, match="must be float32, float64, float16 or bfloat16, got torch.int64"):
        call(pc.long(), pr.long())
    with pytest.raises(ValueError, match="beta must be > 0 and finite, got 0.0"):
        call(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match=r"beta must be > 0 and finite for every pair, got beta\[7\] = -1.0"):
        call(pc, pr, rc, rr, beta=torch.tensor([0.1] * 7 + [-1.0]))
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'; valid loss types: sigmoid, hinge, ipo"):
        call(pc, pr, rc, rr, loss_type="dpo")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\), got 1.5"):
        call(pc, pr, rc, rr, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\) for loss_type='robust'"):
        call(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing must be > 0 for loss_type='exo_pair'"):
        call(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="loss_type 'sigmoid_norm' normalises by completion length"):
        call(pc, pr, rc, rr, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="loss_weights must have one weight per loss type: got 1 weights for 2"):
        call(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="f_divergence_type='forward_kl' applies only to loss types"):
        call(pc, pr, rc, rr, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type must be one of reverse_kl, forward_kl"):
        call(pc, pr, rc, rr, f_divergence_type="kl")
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(pc, pr, rc, rr, reduction="avg")
    with pytest.raises(ValueError, match="a per-pair beta tensor is not defined for aot"):
        call(pc, pr, rc, rr, loss_type="aot", beta=torch.full((8,), 0.1))
    with pytest.raises(ValueError, match=r"chosen_lengths must have the shape of policy_chosen_logps \[8\], got \[3\]"):
        call(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(8))
    with pytest.raises(ValueError, match="backend must be one of"):
        alignops.preference_loss(pc, pr, backend="cuda")


def test_raw_op_checks_its_arguments():
    pc, pr, rc, rr = make_logps(8, torch.float32)
    op = torch.ops.alignops.preference_loss
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have the shape of policy_chosen_logps"):
        op(pc, pr, rc, rr[:3], None, None, None, [0], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, False)
    with pytest.raises(ValueError, match=r"loss type code must be in \[0, 15\), got 99"):
        op(pc, pr, rc, rr, None, None, None, [99], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, False)
    with pytest.raises(ValueError, match="loss_weights must have one weight per loss type"):
        op(pc, pr, rc, rr, None, None, None, [0, 1], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, False)
    with pytest.raises(ValueError, match=r"beta must have the shape of policy_chosen_logps"):
        op(pc, pr, rc, rr, torch.ones(2), None, None, [0], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, False)


# ---- selective_logprobs ------------------------------------------------------------------------------


def make_logits(N, V, dtype):
    return (3 * torch.randn(N, V, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 47), (7, 1000), (5, 4099), (2, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logprobs_matches_reference(cpu_capability, shape, dtype, temperature):
    N, V = shape
    logits = make_logits(N, V, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,))
    targets[N // 2] = -100
    got = alignops.selective_logprobs(logits, targets, temperature=temperature, backend="native")
    ref_logits = logits.detach().clone().requires_grad_(True)
    exp = ref.selective_logprobs(ref_logits, targets, temperature=temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 2e-5)
    torch.testing.assert_close(got, exp, rtol=rtol, atol=atol)
    assert got[N // 2] == 0
    g = torch.randn(N, dtype=got.dtype)
    (got * g).sum().backward()
    (exp * g).sum().backward()
    gtol = {
        torch.float64: (1e-12, 1e-12),
        torch.float32: (1e-5, 1e-6),
        torch.bfloat16: (1e-2, 1e-5),
        torch.float16: (1e-3, 1e-6),
    }[dtype]
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad.double(), rtol=gtol[0], atol=gtol[1])
    assert torch.all(logits.grad[N // 2] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_logprobs_low_precision_beats_torch_in_that_dtype(dtype):
    logits = make_logits(64, 32000, dtype)
    targets = torch.randint(0, 32000, (64,))
    exact = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ours = (alignops.selective_logprobs(logits, targets).double() - exact).abs().max()
    torch_same_dtype = (
        (torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1).double() - exact).abs().max()
    )
    assert ours <= 2 * torch_same_dtype
    assert ours < 1e-4


def test_selective_logprobs_matches_log_softmax_gather_at_vocab_scale(cpu_capability):
    logits = torch.randn(16, 32000) * 4
    targets = torch.randint(0, 32000, (16,))
    exp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(alignops.selective_logprobs(logits, targets), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("V, hot", [(11, None), (70, 69), (200, 130)])
def test_selective_logprobs_tiny_temperature_stays_finite(cpu_capability, V, hot):
    # At T = 1e-10, z / T ~ 1e10: an exponent formed as fma(z, 1/T, -max) was the product's rounding
    # error (hundreds), so lse overflowed or underflowed (logp -inf, or +inf with the row max in the
    # scalar tail of the vector loop: V = 70, max at column 69). Expected: torch in float64.
    logits = torch.randn(5, V)
    if hot is not None:
        logits[:, hot] = 5.0
    targets = torch.randint(0, V, (5,))
    targets[0] = V - 1 if hot is None else hot
    T = 1e-10
    x64 = logits.double().requires_grad_(True)
    exp = torch.log_softmax(x64 / T, -1).gather(-1, targets[:, None]).squeeze(-1)
    exp.sum().backward()
    x = logits.clone().requires_grad_(True)
    got = alignops.selective_logprobs(x, targets, temperature=T, backend="native")
    torch.testing.assert_close(got.double(), exp.detach(), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1.0)


def test_selective_logprobs_masked_vocab(cpu_capability):
    # -inf logits (a masked vocabulary) give exactly zero probability and never a NaN.
    logits = torch.randn(4, 300)
    logits[:, :150] = float("-inf")
    targets = torch.tensor([160, 200, 299, -100])
    logits.requires_grad_(True)
    got = alignops.selective_logprobs(logits, targets)
    exp = ref.selective_logprobs(logits.detach(), targets)
    torch.testing.assert_close(got, exp)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, :150] == 0)


def test_selective_logprobs_non_contiguous_and_int32():
    base = torch.randn(10, 64)
    logits = base.t().contiguous().t()  # same values, column-major
    targets = torch.randint(0, 64, (10,), dtype=torch.int32)
    torch.testing.assert_close(
        alignops.selective_logprobs(logits, targets), ref.selective_logprobs(base, targets.long())
    )


def test_selective_logprobs_empty():
    out = alignops.selective_logprobs(torch.zeros(0, 10, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


def test_selective_logprobs_gradcheck_and_opcheck():
    logits = torch.randn(4, 19, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 18, 0])
    assert torch.autograd.gradcheck(lambda x: alignops.selective_logprobs(x, targets, temperature=0.8), (logits,))
    torch.library.opcheck(torch.ops.alignops.selective_logprobs.default, (logits, targets, -100, 0.8))
    torch.library.opcheck(
        torch.ops.alignops.selective_logprobs.default,
        (torch.randn(6, 33, requires_grad=True), torch.randint(0, 33, (6,)), -100, 1.0),
    )
    lse = torch.logsumexp(logits.detach() / 0.8, -1)
    torch.library.opcheck(
        torch.ops.alignops.selective_logprobs_backward.default,
        (torch.randn(4, dtype=torch.float64), logits.detach(), targets, lse, -100, 0.8),
    )


def test_selective_logprobs_compile():
    logits = torch.randn(8, 77, requires_grad=True)
    targets = torch.randint(0, 77, (8,))
    fn = torch.compile(lambda x, y: alignops.selective_logprobs(x, y).sum(), fullgraph=True, backend="aot_eager")
    fn(logits, targets).backward()
    exp_logits = logits.detach().clone().requires_grad_(True)
    ref.selective_logprobs(exp_logits, targets).sum().backward()
    torch.testing.assert_close(logits.grad, exp_logits.grad)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_selective_logprobs_bad_input(backend):
    logits = torch.randn(4, 10)
    call = lambda x, y, **kw: alignops.selective_logprobs(x, y, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"targets\[2\] = 10 is out of range: targets must lie in \[0, 10\)"):
        call(logits, torch.tensor([0, 1, 10, 3]))
    with pytest.raises(ValueError, match=r"targets\[1\] = -5 is out of range"):
        call(logits, torch.tensor([0, -5, 1, 3]))
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor of shape \[N, V\]"):
        call(logits[0], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"targets must have one entry per row of logits \[N=4\], got 3"):
        call(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets must be int64 or int32, got torch.float32"):
        call(logits, torch.zeros(4))
    # dtypes named as Python prints them (c10's names: torch.int16, not torch.Short)
    with pytest.raises(ValueError, match=r"targets must be int64 or int32, got torch\.int16$"):
        call(logits, torch.zeros(4, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"logits must be float32, float64, float16 or bfloat16, got torch\.uint8$"):
        call(logits.to(torch.uint8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="temperature must be a finite value > 0, got 0"):
        call(logits, torch.tensor([0, 1, 2, 3]), temperature=0.0)
    with pytest.raises(ValueError, match="logits must be float32, float64, float16 or bfloat16"):
        call(logits.long(), torch.tensor([0, 1, 2, 3]))


def test_raw_selective_logprobs_op_checks_targets():
    # The raw op (no Python wrapper) must refuse an out-of-range target, never read out of bounds.
    with pytest.raises(ValueError, match=r"targets\[0\] = 99 is out of range"):
        torch.ops.alignops.selective_logprobs(torch.randn(2, 10), torch.tensor([99, 1]), -100, 1.0)
    with pytest.raises(ValueError, match=r"lse must be torch.float32 for torch.float32 logits, got torch.float64"):
        torch.ops.alignops.selective_logprobs_backward(
            torch.zeros(2), torch.randn(2, 10), torch.tensor([1, 1]), torch.zeros(2, dtype=torch.float64), -100, 1.0
        )


# ---- sequence_logprobs -------------------------------------------------------------------------------


def test_sequence_logprobs_padded_with_mask():
    B, T, V = 3, 11, 50
    logits = torch.randn(B, T, V, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    mask[2] = False  # an empty completion: sum 0, mean 0, 0 tokens
    out = alignops.sequence_logprobs(logits, targets, completion_mask=mask)
    per_token = ref.selective_logprobs(logits.detach().reshape(-1, V), targets.reshape(-1)).reshape(B, T)
    exp_sum, exp_mean, exp_count = ref.sequence_logprobs(per_token, completion_mask=mask)
    torch.testing.assert_close(out.sum, exp_sum)
    torch.testing.assert_close(out.mean, exp_mean)
    assert torch.equal(out.num_tokens, exp_count) and out.num_tokens[2] == 0 and out.sum[2] == 0
    out.sum.sum().backward()
    assert torch.all(logits.grad[~mask] == 0)


def test_sequence_logprobs_packed_cu_seqlens():
    lens = [5, 0, 9, 3]
    N, V = sum(lens), 40
    cu = torch.tensor([0, 5, 5, 14, 17])
    logits = torch.randn(N, V)
    targets = torch.randint(0, V, (N,))
    targets[6] = -100  # a prompt token inside a segment is skipped
    out = alignops.sequence_logprobs(logits, targets, cu_seqlens=cu)
    exp_sum, _, _ = ref.sequence_logprobs(ref.selective_logprobs(logits, targets), cu_seqlens=cu)
    torch.testing.assert_close(out.sum, exp_sum)
    assert out.num_tokens.tolist() == [5, 0, 8, 3]
    torch.testing.assert_close(out.mean, exp_sum / torch.tensor([5.0, 1.0, 8.0, 3.0]))


def test_sequence_logprobs_bad_input():
    logits = torch.randn(6, 10)
    targets = torch.randint(0, 10, (6,))
    with pytest.raises(ValueError, match=r"packed \[N, V\] logits need cu_seqlens"):
        alignops.sequence_logprobs(logits, targets)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at N=6 and be non-decreasing"):
        alignops.sequence_logprobs(logits, targets, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must be int64 or int32"):
        alignops.sequence_logprobs(logits, targets, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match=r"completion_mask must have shape \[B, T\]"):
        alignops.sequence_logprobs(logits.view(2, 3, 10), targets.view(2, 3), completion_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] \(padded\) or \[N, V\] \(packed\)"):
        alignops.sequence_logprobs(logits.view(-1), targets)


# ---- the command line --------------------------------------------------------------------------------


def test_cli_info():
    res = subprocess.run(
        [sys.executable, "-m", "alignops.cli", "info"], capture_output=True, text=True, env={**os.environ}, check=True
    )
    assert "CPU kernels" in res.stdout and "CUDA kernels" in res.stdout
    archs = torch.ops.alignops.cuda_archs()
    assert (f"sm_{archs[0]}" in res.stdout) if archs else ("not built" in res.stdout)


def test_cli_bench_quick_writes_table_and_csv(tmp_path):
    # The main job end to end on small shapes: table on stdout, CSV rows, ratios against the reference.
    res = subprocess.run(
        [sys.executable, "-m", "alignops.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "selective_logprobs" in res.stdout and "torch log_softmax+gather" in res.stdout
    rows = (tmp_path / "preference_cpu_quick.csv").read_text().splitlines()
    assert rows[0].startswith("date,device,torch,git_sha,family,op,shape")
    assert len(rows) > 10
