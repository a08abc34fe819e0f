"""The Triton policy_loss op (alignops::policy_loss_triton) against the native C++ op (every output), and
through alignops.policy_loss(backend="triton") against the reference (alignops.reference.policy, TRL 1.16's
GRPOTrainer._compute_loss differentiated by autograd) and TRL's own _compute_loss: every loss type x IS
level x KL / IS ratio / masks, clip-boundary ties, bf16 input, empty batches, opcheck, bad input. Without a
GPU it runs in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1): shapes are
at most 8 x 16, and the interpreter's tile is 4 tokens, so a row spans several tiles and a partial last one."""

import math

import pytest
import torch

import alignops
from alignops import AlignopsError
from alignops._codes import ImportanceSamplingLevel, PolicyLossType
from alignops.policy import policy_loss
from alignops.reference import policy as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSS_TYPES = ref.LOSS_TYPES
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
DEFAULTS = dict(
    old_per_token_logps=None,
    ref_per_token_logps=None,
    importance_sampling_ratio=None,
    sampling_per_token_logps=None,
    entropy_mask=None,
    loss_type="dapo",
    importance_sampling_level="token",
    epsilon_low=0.2,
    epsilon_high=None,
    delta=None,
    beta=0.0,
    use_bias_correction_kl=True,
    off_policy_mask_threshold=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
)


def _batch(B=5, T=14, dtype=torch.float64, adv_shape="rows"):
    """Log-probs around -1 with ratios in ~[0.6, 1.6] (both clip bounds hit), a padded mask with one empty and
    one full row, advantages of both signs (and one exact zero)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lp = (torch.randn(B, T, dtype=torch.float64) * 0.5 - 1.0).clamp(max=-0.01)
    old = lp + 0.25 * torch.randn(B, T, dtype=torch.float64)
    ref_lp = lp + 0.3 * torch.randn(B, T, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(B, T, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0], lengths[1] = T, 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if adv_shape == "tokens":
        adv = torch.randn(B, T, dtype=torch.float64)
    else:
        adv = torch.randn(B, dtype=torch.float64)
        adv[0], adv[2], adv[-1] = adv[0].abs(), -adv[2].abs(), 0.0  # both signs on valid rows, and an exact 0
        if adv_shape == "column":
            adv = adv[:, None]
    isr = torch.rand(B, T, dtype=torch.float64) + 0.5
    entropy_mask = (torch.rand(B, T) > 0.3).to(torch.float64)

    def dev(t, dt=acc):
        return t.to(dt).to(DEVICE)

    return dict(
        per_token_logps=dev(lp, dtype),
        advantages=dev(adv),
        completion_mask=mask.to(DEVICE),
        old_per_token_logps=dev(old),
        ref_per_token_logps=dev(ref_lp),
        sampling_per_token_logps=dev(sampling),
        importance_sampling_ratio=dev(isr),
        entropy_mask=dev(entropy_mask),
    )


def _op_args(inputs, opts, compute_grad=True):
    """The positional arguments of alignops::policy_loss[_triton] for the public keyword options ``opts``."""
    o = {**DEFAULTS, **opts}
    eps_high = o["epsilon_low"] if o["epsilon_high"] is None else o["epsilon_high"]
    return (
        inputs["per_token_logps"],
        inputs["advantages"],
        inputs["completion_mask"],
        o["old_per_token_logps"],
        o["ref_per_token_logps"],
        o["importance_sampling_ratio"],
        o["sampling_per_token_logps"],
        o["entropy_mask"],
        int(PolicyLossType[o["loss_type"].upper()]),
        int(ImportanceSamplingLevel[o["importance_sampling_level"].upper()]),
        o["epsilon_low"],
        eps_high,
        o["delta"],
        o["beta"],
        o["use_bias_correction_kl"],
        o["off_policy_mask_threshold"],
        o["sapo_temperature_pos"],
        o["sapo_temperature_neg"],
        o["vespo_k_pos"],
        o["vespo_lambda_pos"],
        o["vespo_k_neg"],
        o["vespo_lambda_neg"],
        compute_grad,
    )


def _cpu(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _options(inputs, loss_type, level, variant):
    """Option sets: plain (old log-probs only); KL with bias correction + token IS ratio + off-policy mask with
    the sampler's log-probs + entropy mask + delta; KL without bias correction + row IS ratio + off-policy mask
    on old's log-probs, old None."""
    opts = dict(loss_type=loss_type, importance_sampling_level=level)
    if variant == "plain":
        opts.update(old_per_token_logps=inputs["old_per_token_logps"], epsilon_high=0.28)
    elif variant == "all":
        opts.update(
            old_per_token_logps=inputs["old_per_token_logps"],
            ref_per_token_logps=inputs["ref_per_token_logps"],
            beta=0.04,
            importance_sampling_ratio=inputs["importance_sampling_ratio"],
            off_policy_mask_threshold=0.02,
            sampling_per_token_logps=inputs["sampling_per_token_logps"],
            entropy_mask=inputs["entropy_mask"],
            delta=1.3,
        )
    else:
        opts.update(
            ref_per_token_logps=inputs["ref_per_token_logps"],
            beta=0.1,
            use_bias_correction_kl=False,
            importance_sampling_ratio=inputs["importance_sampling_ratio"][:, :1],
            off_policy_mask_threshold=-1.0,
        )
    return opts


def _reference(inputs, opts):
    """(loss, d loss / d lp, metrics) of the reference in fp64 (fp32 for lower-precision input)."""
    lp = inputs["per_token_logps"].detach().cpu().clone().requires_grad_()
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    loss, metrics = ref.policy_loss(lp, inputs["advantages"].cpu(), inputs["completion_mask"].cpu(), **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_native_and_reference(loss_type, level):
    inputs = _batch()
    tol = TOL[torch.float64]
    for variant in ("plain", "all", "old_none"):
        opts = _options(inputs, loss_type, level, variant)
        args = _op_args(inputs, opts)
        got = torch.ops.alignops.policy_loss_triton(*args)
        exp = torch.ops.alignops.policy_loss(*_cpu(args))
        for name, g, e in zip(("loss_sum", "grad", "row_stats"), got, exp):
            torch.testing.assert_close(g.cpu(), e, **tol, msg=lambda m, n=name, v=variant: f"{v} {n}: {m}")

        lp = inputs["per_token_logps"].clone().requires_grad_()
        out = policy_loss(lp, inputs["advantages"], inputs["completion_mask"], backend="triton", **opts)
        (grad,) = torch.autograd.grad(out.loss, lp)
        r_loss, r_grad, r_metrics = _reference(inputs, opts)
        torch.testing.assert_close(out.loss.cpu(), r_loss, **tol)
        torch.testing.assert_close(grad.cpu(), r_grad, **tol)
        for key, value in r_metrics.items():
            torch.testing.assert_close(getattr(out, key).cpu(), value, **tol, equal_nan=True, msg=key)


@pytest.mark.parametrize("adv_shape", ["tokens", "column"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_advantage_shapes(adv_shape, level):
    """[B, T] advantages make the clip flags (and VESPO's phi) token values; [B, 1] ones are row values."""
    inputs = _batch(B=4, T=11, adv_shape=adv_shape)
    for loss_type in ("dapo", "cispo", "vespo", "sapo"):
        opts = _options(inputs, loss_type, level, "plain")
        args = _op_args(inputs, opts)
        got = torch.ops.alignops.policy_loss_triton(*args)
        exp = torch.ops.alignops.policy_loss(*_cpu(args))
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e, **TOL[torch.float64])
        lp = inputs["per_token_logps"].clone().requires_grad_()
        out = policy_loss(lp, inputs["advantages"], inputs["completion_mask"], backend="triton", **opts)
        (grad,) = torch.autograd.grad(out.loss, lp)
        r_loss, r_grad, r_metrics = _reference(inputs, opts)
        torch.testing.assert_close(grad.cpu(), r_grad, **TOL[torch.float64])
        for key, value in r_metrics.items():
            torch.testing.assert_close(getattr(out, key).cpu(), value, **TOL[torch.float64], equal_nan=True, msg=key)


@pytest.mark.parametrize(
    "opts",
    [
        # coef_1 = exp(0) = 1 exactly, on both clip bounds: the min ties (half to each side) and the clamp passes
        # nothing at its bound, so the token gradient is half of -A coef_1
        dict(loss_type="dapo", epsilon_low=0.0, epsilon_high=0.0),
        dict(loss_type="grpo", epsilon_low=0.0, epsilon_high=0.0, importance_sampling_level="sequence"),
        # delta = coef_1: the delta clamp passes nothing at its bound, the tie sends half through clip()
        dict(loss_type="bnpo", delta=1.0),
        dict(loss_type="luspo", delta=1.0, importance_sampling_level="sequence"),
        # cispo at its bound (the clamp is detached: the gradient is -min(coef_1, eps_high) A either way)
        dict(loss_type="cispo", epsilon_high=1.0),
    ],
)
def test_ties_at_clip_boundaries(opts):
    inputs = _batch(B=4, T=9)
    lp = inputs["per_token_logps"]
    inputs["advantages"][0] = 0.0  # A = 0: both min arguments are 0, a tie whatever coef_1
    for old in (lp.detach().to(inputs["advantages"].dtype), None):
        o = {**opts, "old_per_token_logps": old}
        args = _op_args(inputs, o)
        got = torch.ops.alignops.policy_loss_triton(*args)
        exp = torch.ops.alignops.policy_loss(*_cpu(args))
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e, rtol=0, atol=1e-15)
        x = lp.clone().requires_grad_()
        out = policy_loss(x, inputs["advantages"], inputs["completion_mask"], backend="triton", **o)
        (grad,) = torch.autograd.grad(out.loss, x)
        r_loss, r_grad, _ = _reference(inputs, o)
        torch.testing.assert_close(out.loss.cpu(), r_loss, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(grad.cpu(), r_grad, rtol=1e-14, atol=1e-15)
    if opts.get("epsilon_low") == 0.0 and opts.get("importance_sampling_level", "token") == "token":
        # the hand-derived value: half of -A coef_1 / N on valid tokens (dapo: N = the mask count)
        m = inputs["completion_mask"].cpu().double()
        expected = -0.5 * inputs["advantages"].cpu()[:, None] * m / m.sum()
        torch.testing.assert_close(grad.cpu(), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fp32_and_float_mask(level):
    inputs = _batch(B=5, T=13, dtype=torch.float32)
    inputs["completion_mask"] = inputs["completion_mask"].float() * 0.75  # a weight, as TRL's tool_mask product
    for loss_type in ("grpo", "dr_grpo", "sapo", "vespo"):
        opts = _options(inputs, loss_type, level, "all")
        args = _op_args(inputs, opts)
        got = torch.ops.alignops.policy_loss_triton(*args)
        exp = torch.ops.alignops.policy_loss(*_cpu(args))
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e, **TOL[torch.float32])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bf16_input(level):
    """bf16 log-probs, fp32 arithmetic: the gradient is the fp32 reference's rounded to bf16 (one rounding; the
    interpreter's fp32 -> bf16 cast may round a tie the other way: one ulp)."""
    inputs = _batch(B=4, T=12, dtype=torch.bfloat16)
    for loss_type in ("dapo", "grpo", "cispo"):
        opts = _options(inputs, loss_type, level, "all")
        lp = inputs["per_token_logps"].clone().requires_grad_()
        out = policy_loss(lp, inputs["advantages"], inputs["completion_mask"], backend="triton", **opts)
        (grad,) = torch.autograd.grad(out.loss, lp)
        assert out.loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        r_loss, r_grad, _ = _reference(inputs, opts)
        torch.testing.assert_close(out.loss.cpu(), r_loss, rtol=1e-5, atol=1e-6)
        ulp = 2.0**-7 * r_grad.abs().clamp_min(1e-6)
        assert ((grad.cpu().float() - r_grad).abs() <= ulp).all(), loss_type
        args = _op_args(inputs, opts)
        got = torch.ops.alignops.policy_loss_triton(*args)
        exp = torch.ops.alignops.policy_loss(*_cpu(args))
        torch.testing.assert_close(got[0].cpu(), exp[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2].cpu(), exp[2], rtol=1e-5, atol=1e-6)
        # the C++ op rounds the sequence-level gradient twice (direct part, then the chain part): two ulps
        assert ((got[1].cpu().float() - exp[1].float()).abs() <= 2 * 2.0**-7 * exp[1].float().abs()).all()


@pytest.mark.parametrize("B,T", [(0, 7), (3, 0), (0, 0)])
def test_empty(B, T):
    lp = torch.zeros(B, T, dtype=torch.float32, device=DEVICE)
    adv = torch.zeros(B, dtype=torch.float32, device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    for level in ("token", "sequence"):
        args = _op_args(dict(per_token_logps=lp, advantages=adv, completion_mask=mask),
                        dict(loss_type="grpo", importance_sampling_level=level))  # fmt: skip
        got = torch.ops.alignops.policy_loss_triton(*args)
        exp = torch.ops.alignops.policy_loss(*_cpu(args))
        assert got[1].shape == (B, T) and got[2].shape == (B, 8)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e)


def test_no_grad_returns_an_empty_gradient():
    inputs = _batch(B=3, T=8)
    args = _op_args(inputs, dict(loss_type="dapo", old_per_token_logps=inputs["old_per_token_logps"]), False)
    loss_sum, grad, stats = torch.ops.alignops.policy_loss_triton(*args)
    assert grad.shape == (0,) and grad.dtype == torch.float64
    torch.testing.assert_close(loss_sum.cpu(), torch.ops.alignops.policy_loss(*_cpu(args))[0])


def test_opcheck():
    inputs = _batch(B=3, T=6, dtype=torch.float32)
    # In the interpreter, wrap_triton hands back the plain interpreted kernel, which would run on fake tensors:
    # the fake-tensor and AOT-dispatch checks need a GPU, where all of opcheck runs.
    utils = (
        ("test_schema", "test_autograd_registration")
        if DEVICE == "cpu"
        else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    )
    for opts in (dict(loss_type="dapo"), _options(inputs, "grpo", "sequence", "all")):
        args = _op_args(inputs, opts)
        torch.library.opcheck(torch.ops.alignops.policy_loss_triton.default, args, test_utils=utils)


def test_kernel_codes_are_the_enum():
    from alignops.kernels import policy as kernels

    for code in PolicyLossType:
        assert getattr(kernels, code.name).value == int(code), code.name


def test_bad_input_messages():
    inputs = _batch(B=3, T=5)
    base = _op_args(inputs, dict(loss_type="dapo"))
    op = torch.ops.alignops.policy_loss_triton

    def call(**changes):
        args = list(base)
        for index, value in changes.items():
            args[int(index[1:])] = value
        return op(*args)

    with pytest.raises(AlignopsError, match=r"advantages must have shape \[B\], \[B, 1\] or \[B, T\] = \[3, 5\]"):
        call(a1=inputs["advantages"][:2])
    with pytest.raises(AlignopsError, match="advantages must be torch.float64, got torch.float32"):
        call(a1=inputs["advantages"].float())
    with pytest.raises(AlignopsError, match="completion_mask must be bool or torch.float64, got torch.int64"):
        call(a2=inputs["completion_mask"].long())
    with pytest.raises(AlignopsError, match=r"ref_per_token_logps must have the shape of per_token_logps \[3, 5\]"):
        call(a4=inputs["ref_per_token_logps"][:, :4], a13=0.1)
    with pytest.raises(AlignopsError, match="ref_per_token_logps is required when beta != 0"):
        call(a13=0.1)
    with pytest.raises(AlignopsError, match="loss_type must be a PolicyLossType code, got 8"):
        call(a8=8)
    with pytest.raises(AlignopsError, match="importance_sampling_level must be 0 or 1, got 2"):
        call(a9=2)
    with pytest.raises(AlignopsError, match=r"per_token_logps must be a 2-D tensor of shape \[B, T\]"):
        call(a0=inputs["per_token_logps"][0])


@pytest.mark.parametrize(
    "trl_kw",
    [
        dict(loss_type="dapo", beta=0.04, isr=True),
        dict(loss_type="grpo", level="sequence", beta=0.04, opm=0.02),
        dict(loss_type="bnpo", delta=1.3, bias=False, beta=0.04),
        dict(loss_type="dr_grpo", level="sequence", isr=True),
        dict(loss_type="cispo", beta=0.04),
        dict(loss_type="sapo", isr=True, opm=-1.0, beta=0.04),
        dict(loss_type="luspo", level="sequence", delta=1.3),
        dict(loss_type="vespo", level="sequence", isr=True, beta=0.04),
    ],
)
def test_matches_trl(trl_kw, import_peer):
    """TRL 1.16's own GRPOTrainer._compute_loss on a stand-in trainer (tests/test_policy.py's harness): loss,
    autograd's gradient through TRL's lines, and the metrics TRL logs."""
    import test_policy

    grpo = import_peer("trl.trainer.grpo_trainer")
    inputs = _batch(B=5, T=12)
    keys = ["per_token_logps", "advantages", "completion_mask", "old_per_token_logps", "ref_per_token_logps"]
    kw = dict(trl_kw)
    if kw.pop("isr", False):
        keys.append("importance_sampling_ratio")
    if "opm" in kw:
        keys.append("sampling_per_token_logps")
    trl_inputs = {k: inputs[k].cpu() for k in keys}
    exp_loss, exp_grad, exp_metrics = test_policy.trl_compute_loss(grpo, trl_inputs, **kw)

    opts = dict(
        loss_type=kw["loss_type"],
        importance_sampling_level=kw.get("level", "token"),
        beta=kw.get("beta", 0.0),
        use_bias_correction_kl=kw.get("bias", True),
        epsilon_high=0.28,
        delta=kw.get("delta"),
        off_policy_mask_threshold=kw.get("opm"),
    )
    lp = inputs["per_token_logps"].clone().requires_grad_()
    rest = {k: inputs[k] for k in keys[3:]}
    out = policy_loss(lp, inputs["advantages"], inputs["completion_mask"], backend="triton", **rest, **opts)
    (grad,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(out.loss.cpu(), exp_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad.cpu(), exp_grad, **TOL[torch.float64])
    assert exp_metrics  # TRL logged something for every configuration here
    for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl", "phi_mean"):
        ours = getattr(out, name).item()
        if name in exp_metrics:
            # TRL averages its clip flags in fp32 (``.float()``): fp32 agreement
            assert ours == pytest.approx(exp_metrics[name], rel=1e-6, abs=1e-9), name
        else:
            assert math.isnan(ours), f"{name}: TRL logs nothing here, ours is {ours}"
