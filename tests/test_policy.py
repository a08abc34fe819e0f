"""The policy family: alignops.policy_loss (native C++, torch reference) against the reference
(python/alignops/reference/policy.py, differentiated by autograd) and against TRL 1.16 itself:
``GRPOTrainer._compute_loss`` run on a stand-in trainer (``types.SimpleNamespace``) whose
``_get_per_token_logps_and_entropies`` returns the test's leaf tensor, so that TRL's own lines compute the loss,
its gradient (autograd through TRL) and the metrics it logs.
"""

import functools
import itertools
import math
import types
from collections import defaultdict

import pytest
import torch
from contract import case

import alignops
from alignops import AlignopsError, PolicyLossOutput, policy_loss
from alignops.reference import policy as ref

LOSS_TYPES = ref.LOSS_TYPES
METRICS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl", "mean_ratio", "phi_mean")
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
}


def make(B=5, T=7, dtype=torch.float64, seed=0, adv_shape="B", isr=None, spread=0.3):
    """Log-probs with the policy drifted from old and ref by ~spread; a mask with an empty row and ragged rows."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    inputs = dict(
        per_token_logps=lp.to(dtype),
        advantages={"B": rn(B), "B1": rn(B, 1), "BT": rn(B, T)}[adv_shape].to(dtype),
        completion_mask=torch.rand(B, T, generator=g) > 0.3,
        old_per_token_logps=(lp + spread * rn(B, T)).to(dtype),
        ref_per_token_logps=(lp + spread * rn(B, T)).to(dtype),
    )
    if B > 1:
        inputs["completion_mask"][1] = False
    if isr is not None:
        shape = {"BT": (B, T), "B1": (B, 1), "B": (B,)}[isr]
        inputs["importance_sampling_ratio"] = (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return inputs


def reference(inputs, **kw):
    """(loss, grad, metrics) of the reference, differentiated by autograd."""
    lp = inputs["per_token_logps"].detach().clone().requires_grad_()
    loss, metrics = ref.policy_loss(lp, **{k: v for k, v in inputs.items() if k != "per_token_logps"}, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), lp, allow_unused=True)
    return loss.detach(), (torch.zeros_like(lp) if grad is None else grad), metrics


def native(inputs, backend="native", **kw):
    lp = inputs["per_token_logps"].detach().clone().requires_grad_()
    out = policy_loss(lp, **{k: v for k, v in inputs.items() if k != "per_token_logps"}, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss.sum(), lp)
    return out, grad


def assert_matches(inputs, tol=None, **kw):
    dtype = inputs["per_token_logps"].dtype
    tol = tol or TOL[dtype]
    exp_loss, exp_grad, exp_metrics = reference(inputs, **kw)
    out, grad = native(inputs, **kw)
    torch.testing.assert_close(out.loss, exp_loss, **tol)
    torch.testing.assert_close(grad, exp_grad.to(grad.dtype), **tol)
    for name in METRICS:
        torch.testing.assert_close(getattr(out, name), exp_metrics[name], equal_nan=True, **tol, msg=name)
    return out


# ---- vs the reference ----------------------------------------------------------------------------------------

GRID = [
    (lt, level, beta, bias, isr)
    for lt, level, beta, bias, isr in itertools.product(
        LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (True, False), (None, "BT", "B1")
    )
    if beta or bias  # use_bias_correction_kl only acts on the KL term
]


@pytest.mark.parametrize("loss_type,level,beta,bias,isr", GRID)
def test_vs_reference_fp64(loss_type, level, beta, bias, isr):
    inputs = make(isr=isr)
    assert_matches(
        inputs,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        use_bias_correction_kl=bias,
        epsilon_high=0.28,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "feature",
    [
        "delta",
        "off_policy",
        "off_policy_sampling",
        "entropy_mask",
        "adv_BT",
        "adv_B1",
        "on_policy",
        "float_mask",
        "isr_B",
        "num_items",
        "max_len",
    ],
)
def test_vs_reference_features(loss_type, level, feature):
    inputs = make(adv_shape={"adv_BT": "BT", "adv_B1": "B1"}.get(feature, "B"), isr="B" if feature == "isr_B" else None)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    g = torch.Generator().manual_seed(3)
    if feature == "delta":
        kw["delta"] = 1.1  # below 1 + eps_high of some ratios: the two-sided clip binds
    elif feature.startswith("off_policy"):
        # A threshold between the rows' mean KLs, so that both branches of the mask occur.
        kw["off_policy_mask_threshold"] = 0.0
        if feature == "off_policy_sampling":
            inputs["sampling_per_token_logps"] = inputs["per_token_logps"] + 0.2 * torch.randn(
                inputs["per_token_logps"].shape, generator=g, dtype=torch.float64
            )
    elif feature == "entropy_mask":
        inputs["entropy_mask"] = torch.rand(inputs["per_token_logps"].shape, generator=g) > 0.4
    elif feature == "on_policy":
        del inputs["old_per_token_logps"]
    elif feature == "float_mask":
        inputs["completion_mask"] = inputs["completion_mask"].to(torch.int32)
    elif feature == "num_items":
        kw["num_items_in_batch"] = torch.tensor(40.0)
    elif feature == "max_len":
        kw["max_completion_length"] = 16
    assert_matches(inputs, **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vs_reference_fp32(loss_type, level):
    inputs = make(B=16, T=45, dtype=torch.float32, isr="BT", adv_shape="BT" if level == "token" else "B")
    assert_matches(inputs, loss_type=loss_type, importance_sampling_level=level, beta=0.04)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_low_precision_input(dtype, loss_type):
    """bf16 / fp16 log-probs: computed in fp32 from the rounded inputs, so the loss equals the reference run on
    the same rounded values in fp32; the gradient is rounded once to the input dtype."""
    inputs = make(B=8, T=33, dtype=dtype)
    kw = dict(loss_type=loss_type, importance_sampling_level="sequence", beta=0.04)
    out, grad = native(inputs, **kw)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    exp_loss, exp_grad, _ = reference({k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}, **kw)
    torch.testing.assert_close(out.loss, exp_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), exp_grad, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_reductions(reduction, loss_type):
    inputs = make(B=6, T=9)
    out = assert_matches(inputs, loss_type=loss_type, beta=0.04, reduction=reduction)
    assert out.loss.shape == ((6,) if reduction == "none" else ())


# ---- torch's gradient conventions at ties and clip boundaries -------------------------------------------------


def test_tie_and_clip_boundaries_match_autograd():
    """coef_1 exactly at 1 - eps_low, 1 + eps_high and delta (torch.clamp passes no gradient there) and the
    on-policy tie of torch.min (coef_1 = 1 inside the clip range: min(c A, c A) splits the gradient)."""
    B, T = 4, 3
    # lp = 0 makes lp - old = x exactly; exp(x) of these x is the same double in torch, libm and Python, and the
    # bounds 1 - eps_low, 1 + eps_high below give back exactly exp(-0.25), exp(0.25) (Sterbenz).
    x = torch.tensor([-0.25, 0.25, 0.0, 1.0], dtype=torch.float64)
    lp = torch.zeros(B, T, dtype=torch.float64)
    old = lp - x[:, None]
    eps_low, eps_high = 1 - math.exp(-0.25), math.exp(0.25) - 1
    ratio = torch.exp(lp - old)
    assert (ratio[0] == 1 - eps_low).all() and (ratio[1] == 1 + eps_high).all() and (ratio[2] == 1).all()
    inputs = dict(
        per_token_logps=lp,
        advantages=torch.tensor([-1.0, 1.0, 0.7, -0.3], dtype=torch.float64),
        completion_mask=torch.ones(B, T, dtype=torch.bool),
        old_per_token_logps=old,
    )
    # torch 2.14 changed clamp's gradient at its bounds (2.13 passed it, 2.14 passes none); the kernels follow
    # 2.14, so autograd of the reference agrees with them from 2.14 on. The hand-computed gradient below is
    # checked under every torch.
    same_convention = torch.__version__ >= (2, 14)
    for kw in (dict(), dict(delta=math.exp(0.25))) if same_convention else ():
        for loss_type in ("dapo", "grpo", "luspo"):
            for level in ("token", "sequence"):
                out = assert_matches(
                    inputs,
                    loss_type=loss_type,
                    importance_sampling_level=level,
                    epsilon_low=eps_low,
                    epsilon_high=eps_high,
                    **kw,
                )
                assert out.clip_ratio_low.item() == 0.0 and out.clip_ratio_high.item() == 0.0  # bounds not "clipped"
    out, grad = native(inputs, loss_type="dapo", epsilon_low=eps_low, epsilon_high=eps_high)
    assert out.clip_ratio_low.item() == 0.0 and out.clip_ratio_high.item() == 0.0
    # By hand (dapo: loss = -sum min(c A, clip(c) A) / 12, d c / d lp = c): rows 0-2 tie in the min, so each
    # branch gets half; the clamp passes nothing at its bound (rows 0, 1) and everything inside (row 2); row 3's
    # ratio e is beyond 1 + eps_high with A < 0, so the unclipped branch is the min.
    lo, hi = 1 - eps_low, 1 + eps_high
    expected = torch.tensor([0.5 * lo, -0.5 * hi, -0.7, 0.3 * math.e], dtype=torch.float64) / 12
    torch.testing.assert_close(grad, expected[:, None].expand(B, T), rtol=1e-14, atol=0)


# ---- TRL itself -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_grpo(import_peer):
    return import_peer("trl.trainer.grpo_trainer")


def trl_compute_loss(
    grpo,
    inputs,
    *,
    loss_type,
    level="token",
    beta=0.0,
    bias=True,
    epsilon_low=0.2,
    epsilon_high=0.28,
    delta=None,
    opm=None,
    top_entropy_quantile=1.0,
    entropies=None,
):
    """TRL's loss, d loss / d per_token_logps (autograd through TRL's lines) and its logged metrics."""
    T = grpo.GRPOTrainer
    lp = inputs["per_token_logps"].detach().clone().requires_grad_()
    B, L = lp.shape
    entropies = torch.rand(B, L, dtype=lp.dtype) if entropies is None else entropies
    accelerator = types.SimpleNamespace(
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        pad_across_processes=lambda x, dim=0, pad_index=0: x,
        num_processes=1,
        sync_gradients=True,
    )
    args = types.SimpleNamespace(
        use_bias_correction_kl=bias,
        delta=delta,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=1,
    )
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, entropies, None),
        aux_loss_enabled=False,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=opm,
        get_off_policy_mask=T.get_off_policy_mask,
        get_gamma_weights=T.get_gamma_weights,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        args=args,
        use_vllm="importance_sampling_ratio" in inputs,
        vllm_importance_sampling_correction=True,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=L,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    fake.get_high_entropy_mask = functools.partial(T.get_high_entropy_mask, fake)
    mask = inputs["completion_mask"].to(torch.int32)  # TRL's completion_mask is an int tensor
    trl_inputs = dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.long),
        completion_ids=torch.zeros(B, L, dtype=torch.long),
        completion_mask=mask,
        advantages=inputs["advantages"],
        num_items_in_batch=mask.sum().to(lp.dtype),
    )
    for k in ("old_per_token_logps", "ref_per_token_logps", "importance_sampling_ratio", "sampling_per_token_logps"):
        if k in inputs:
            trl_inputs[k] = inputs[k]
    loss = T._compute_loss(fake, None, trl_inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    logged = fake._metrics["train"]
    names = {
        "kl": "kl",
        "clip_ratio_low": "clip_ratio/low_mean",
        "clip_ratio_high": "cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/high_mean",
        "clip_ratio_region": "clip_ratio/region_mean",
        "phi_mean": "vespo/phi_seq_mean",
    }
    metrics = {ours: logged[theirs][0] for ours, theirs in names.items() if theirs in logged}
    return loss.detach(), grad, metrics


def assert_matches_trl(grpo, inputs, tol=None, **trl_kw):
    kw = dict(
        loss_type=trl_kw["loss_type"],
        importance_sampling_level=trl_kw.get("level", "token"),
        beta=trl_kw.get("beta", 0.0),
        use_bias_correction_kl=trl_kw.get("bias", True),
        epsilon_low=trl_kw.get("epsilon_low", 0.2),
        epsilon_high=trl_kw.get("epsilon_high", 0.28),
        delta=trl_kw.get("delta"),
        off_policy_mask_threshold=trl_kw.get("opm"),
    )
    exp_loss, exp_grad, exp_metrics = trl_compute_loss(grpo, inputs, **trl_kw)
    out, grad = native(inputs, **kw)
    tol = tol or TOL[inputs["per_token_logps"].dtype]
    torch.testing.assert_close(out.loss, exp_loss.to(out.loss.dtype), **tol)
    torch.testing.assert_close(grad, exp_grad, **tol)
    for name in METRICS:
        ours = getattr(out, name)
        if name in exp_metrics:
            # TRL averages its clip flags in fp32 (``.float()``): fp32 agreement.
            assert ours.item() == pytest.approx(exp_metrics[name], rel=1e-6, abs=1e-9), name
        elif name != "mean_ratio":  # TRL logs no mean ratio
            assert math.isnan(ours.item()), f"{name}: TRL logs nothing here, ours is {ours.item()}"
    return out


TRL_GRID = [
    (lt, level, beta, bias, isr)
    for lt, level, beta, bias, isr in itertools.product(
        LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (True, False), (None, "BT")
    )
    if beta or bias
]


@pytest.mark.parametrize("loss_type,level,beta,bias,isr", TRL_GRID)
def test_vs_trl(trl_grpo, loss_type, level, beta, bias, isr):
    inputs = make(isr=isr)
    assert_matches_trl(trl_grpo, inputs, loss_type=loss_type, level=level, beta=beta, bias=bias)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("feature", ["delta", "off_policy", "off_policy_sampling", "adv_BT", "on_policy", "isr_B1"])
def test_vs_trl_features(trl_grpo, loss_type, level, feature):
    inputs = make(adv_shape="BT" if feature == "adv_BT" else "B", isr="B1" if feature == "isr_B1" else None)
    kw = dict(loss_type=loss_type, level=level, beta=0.04)
    if feature == "delta":
        kw["delta"] = 1.1
    elif feature.startswith("off_policy"):
        kw["opm"] = 0.0
        if feature == "off_policy_sampling":
            g = torch.Generator().manual_seed(5)
            inputs["sampling_per_token_logps"] = inputs["per_token_logps"] + 0.2 * torch.randn(
                inputs["per_token_logps"].shape, generator=g, dtype=torch.float64
            )
    elif feature == "on_policy":
        del inputs["old_per_token_logps"]
    assert_matches_trl(trl_grpo, inputs, **kw)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_vs_trl_entropy_mask(trl_grpo, loss_type):
    """TRL's top_entropy_quantile mask (its get_high_entropy_mask on the stand-in's entropies) passed to ours."""
    inputs = make(B=6, T=10)
    entropies = torch.rand(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fake = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(pad_across_processes=lambda x, **k: x, gather=lambda x: x)
    )
    entropy_mask = trl_grpo.GRPOTrainer.get_high_entropy_mask(fake, entropies, inputs["completion_mask"], 0.6)
    exp_loss, exp_grad, _ = trl_compute_loss(
        trl_grpo, inputs, loss_type=loss_type, beta=0.04, top_entropy_quantile=0.4, entropies=entropies
    )
    out, grad = native(inputs, loss_type=loss_type, beta=0.04, epsilon_high=0.28, entropy_mask=entropy_mask)
    torch.testing.assert_close(out.loss, exp_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, exp_grad, **TOL[torch.float64])


def test_vs_trl_fp32_larger(trl_grpo):
    inputs = make(B=32, T=100, dtype=torch.float32, isr="BT")
    for loss_type in LOSS_TYPES:
        assert_matches_trl(
            trl_grpo, inputs, tol=dict(rtol=1e-5, atol=1e-7), loss_type=loss_type, level="sequence", beta=0.04
        )


# ---- op-level checks ------------------------------------------------------------------------------------------


def _op_args(inputs, loss_type=3, level=0, beta=0.04, compute_grad=True, delta=None, opm=None):
    acc = torch.float64 if inputs["per_token_logps"].dtype == torch.float64 else torch.float32
    get = lambda k: None if k not in inputs else inputs[k].to(acc)  # noqa: E731
    return (
        inputs["per_token_logps"],
        get("advantages"),
        inputs["completion_mask"],
        get("old_per_token_logps"),
        get("ref_per_token_logps"),
        get("importance_sampling_ratio"),
        get("sampling_per_token_logps"),
        get("entropy_mask"),
        loss_type,
        level,
        0.2,
        0.28,
        delta,
        beta,
        True,
        opm,
        1.0,
        1.05,
        2.0,
        3.0,
        3.0,
        2.0,
        compute_grad,
    )


@pytest.mark.parametrize("loss_type,level", [(0, 1), (3, 0), (4, 1), (5, 0), (7, 1)])
def test_opcheck(loss_type, level):
    inputs = make(B=4, T=6, dtype=torch.float32, isr="BT")
    inputs["per_token_logps"].requires_grad_()
    torch.library.opcheck(torch.ops.alignops.policy_loss.default, _op_args(inputs, loss_type, level, opm=0.0))
    # compute_grad=False is the no-grad call (backward through it raises, tested below).
    inputs["per_token_logps"] = inputs["per_token_logps"].detach()
    torch.library.opcheck(
        torch.ops.alignops.policy_loss.default, _op_args(inputs, loss_type, level, delta=1.5, compute_grad=False)
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck(loss_type, level):
    inputs = make(B=3, T=5, isr="BT")
    rest = {k: v for k, v in inputs.items() if k != "per_token_logps"}
    lp = inputs["per_token_logps"].clone().requires_grad_()
    # Small drift: no ratio within gradcheck's step of a clip bound, where the loss has a kink.
    rest["old_per_token_logps"] = lp.detach() + 0.01 * torch.randn(3, 5, dtype=torch.float64)

    beta = 0.04
    if loss_type in ("cispo", "vespo"):
        # Their ratio weights are detached functions of lp - old (as in TRL), which a finite difference in lp
        # would see: old moves with x here, so the weights are constant and the difference sees only the
        # differentiated path (beta = 0: the bias-corrected KL's ratio is differentiated and would also be lost).
        drift = rest.pop("old_per_token_logps") - lp.detach()
        rest["old_per_token_logps"] = None
        beta = 0.0

    def f(x):
        kw = dict(rest)
        if loss_type in ("cispo", "vespo"):
            kw["old_per_token_logps"] = x + drift
        return policy_loss(x, **kw, loss_type=loss_type, importance_sampling_level=level, beta=beta).loss

    assert torch.autograd.gradcheck(f, (lp,))
    if loss_type not in ("cispo", "vespo"):
        g = lambda x: policy_loss(x, **rest, loss_type=loss_type, beta=beta, reduction="none").loss  # noqa: E731
        assert torch.autograd.gradcheck(g, (lp,))


def test_compile_fullgraph():
    inputs = make(B=4, T=9, dtype=torch.float32, isr="BT")
    lp = inputs.pop("per_token_logps")
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, num_items_in_batch=torch.tensor(20.0))
    fn = torch.compile(lambda x: policy_loss(x, **inputs, **kw), fullgraph=True, backend="aot_eager")
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    got, exp = fn(x1), policy_loss(x2, **inputs, **kw)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, equal_nan=True)
    got.loss.backward()
    exp.loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_meta_shapes():
    lp = torch.empty(3, 7, device="meta")
    out = policy_loss(lp, torch.empty(3, device="meta"), torch.empty(3, 7, dtype=torch.bool, device="meta"))
    assert out.loss.shape == () and out.loss.device.type == "meta"


def test_torch_backend_is_the_reference():
    inputs = make(isr="BT")
    kw = dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.04)
    a, ga = native(inputs, backend="torch", **kw)
    b, gb = native(inputs, backend="native", **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(ga, gb, **TOL[torch.float64])


def test_output_is_named_and_metrics_detached():
    inputs = make()
    out, _ = native(inputs, loss_type="dapo", beta=0.04)
    assert isinstance(out, PolicyLossOutput) and alignops.policy_loss is policy_loss
    assert all(not getattr(out, m).requires_grad and getattr(out, m).shape == () for m in METRICS)
    assert math.isnan(out.phi_mean.item())  # not vespo


# ---- edge cases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batch(loss_type):
    lp = torch.zeros(0, 5, requires_grad=True)
    out = policy_loss(
        lp,
        torch.zeros(0),
        torch.zeros(0, 5, dtype=torch.bool),
        loss_type=loss_type,
        beta=0.04,
        ref_per_token_logps=torch.zeros(0, 5),
        importance_sampling_level="sequence",
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert lp.grad.shape == (0, 5)


def test_all_masked_row_and_batch():
    inputs = make(B=3, T=4)
    inputs["completion_mask"][:] = False
    for loss_type in LOSS_TYPES:
        out = assert_matches(inputs, loss_type=loss_type, beta=0.04)
        assert out.loss.item() == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "sapo"])
def test_non_finite_logps_propagate_like_trl(trl_grpo, bad, loss_type):
    """A non-finite log-prob gives a NaN / inf loss, as TRL's expression does, never a silent finite value."""
    inputs = make(B=3, T=4)
    inputs["per_token_logps"][0, 1] = bad
    inputs["completion_mask"][0, 1] = True
    exp_loss, _, _ = trl_compute_loss(trl_grpo, inputs, loss_type=loss_type, beta=0.04)
    out, _ = native(inputs, loss_type=loss_type, beta=0.04, epsilon_high=0.28)
    assert not math.isfinite(out.loss.item())
    torch.testing.assert_close(out.loss, exp_loss, equal_nan=True)


# ---- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs():
    lp, adv, m = torch.randn(3, 4), torch.randn(3), torch.ones(3, 4, dtype=torch.bool)
    cases = [
        (
            dict(per_token_logps=torch.randn(3)),
            r"per_token_logps must be a 2-D tensor of shape \[B, T\], got shape \[3\]",
        ),
        (
            dict(per_token_logps=torch.zeros(3, 4, dtype=torch.long)),
            r"per_token_logps must be float32, .* got torch.int64",
        ),
        (
            dict(advantages=torch.randn(4)),
            r"advantages must have shape \[B\], \[B, 1\] or \[B, T\] = \[3, 4\], got \[4\]",
        ),
        (dict(advantages=torch.ones(3, dtype=torch.long)), r"advantages must be a float tensor, got torch.int64"),
        (dict(completion_mask=torch.ones(3, 5)), r"completion_mask must have the shape of per_token_logps \[3, 4\]"),
        (dict(old_per_token_logps=torch.randn(2, 4)), r"old_per_token_logps must have the shape of per_token_logps"),
        (
            dict(importance_sampling_ratio=torch.rand(3, 2)),
            r"importance_sampling_ratio must have shape \[B\], \[B, 1\]",
        ),
        (dict(entropy_mask=torch.ones(3, 4, device="meta")), r"entropy_mask must be on the device of per_token_logps"),
        (dict(loss_type="ppo"), r"loss_type must be one of \('grpo', .*\), got 'ppo'"),
        (dict(importance_sampling_level="tok"), r"importance_sampling_level must be one of \('token', 'sequence'\)"),
        (dict(reduction="avg"), r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(beta=0.04), r"ref_per_token_logps is required when beta != 0"),
        (dict(epsilon_low=math.nan), r"epsilon_low must be finite, got nan"),
        (dict(epsilon_high=math.inf), r"epsilon_high must be finite, got inf"),
        (dict(delta=math.nan), r"delta must be finite, got nan"),
        (dict(sapo_temperature_neg=0.0), r"sapo_temperature_neg must be a finite value > 0, got 0.0"),
        (dict(vespo_lambda_pos=math.inf), r"vespo_lambda_pos must be finite, got inf"),
        (dict(off_policy_mask_threshold=math.nan), r"off_policy_mask_threshold must not be NaN"),
        (dict(max_completion_length=0), r"max_completion_length must be a positive int, got 0"),
        (dict(num_items_in_batch=torch.ones(2)), r"num_items_in_batch must be a number or a one-element tensor"),
        (dict(num_items_in_batch=math.nan), r"num_items_in_batch must not be NaN"),
        (dict(backend="cuda"), r"backend must be one of"),
    ]
    for change, message in cases:
        args = dict(per_token_logps=lp, advantages=adv, completion_mask=m)
        args.update(change)
        pos = [args.pop(k) for k in ("per_token_logps", "advantages", "completion_mask")]
        with pytest.raises(AlignopsError, match=message):
            policy_loss(*pos, **args)
    assert math.isfinite(policy_loss(lp, adv, m, off_policy_mask_threshold=math.inf).loss.item())  # inf: keep all


def test_op_memory_safety_checks():
    inputs = make(B=3, T=4, dtype=torch.float32)
    args = list(_op_args(inputs))
    args[1] = torch.randn(5)
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\], \[B, 1\] or \[B, T\]"):
        torch.ops.alignops.policy_loss(*args)
    args = list(_op_args(inputs))
    args[3] = args[3].double()
    with pytest.raises(ValueError, match=r"old_per_token_logps must be torch.float32, got torch.float64"):
        torch.ops.alignops.policy_loss(*args)
    args = list(_op_args(inputs))
    args[8] = 8
    with pytest.raises(ValueError, match=r"loss_type must be a PolicyLossType code, got 8"):
        torch.ops.alignops.policy_loss(*args)


def test_backward_without_compute_grad_raises():
    inputs = make(B=2, T=3, dtype=torch.float32)
    lp = inputs["per_token_logps"].clone().requires_grad_()
    loss_sum, _, _ = torch.ops.alignops.policy_loss(*(lp, *_op_args(inputs, compute_grad=False)[1:]))
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss_sum.backward()


# ---- token_entropy ------------------------------------------------------------------------------------------------
# alignops.policy.token_entropy on every backend against the reference (alignops.reference.policy.token_entropy,
# log_softmax differentiated by autograd) and TRL's entropy_from_logits; the Triton kernel runs in the interpreter on
# CPU tensors. V = 5000 > kernels/preference.py's MAX_BLOCK_V = 4096 makes a row span two vocabulary steps of the
# Triton kernel (its online rescaling of the entropy sum), and records the GPU launch of real vocabularies for the
# sm_90 compile gate.

triton_backend = pytest.param(
    "triton",
    marks=[
        pytest.mark.triton,
        pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
    ],
)
ENTROPY_BACKENDS = ["native", triton_backend, "torch"]
ENTROPY_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-5, atol=2e-5),  # fp32 sums of the same bf16 inputs as the reference's
    torch.float16: dict(rtol=2e-5, atol=2e-5),
}


def entropy_logits(*shape, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def entropy_and_grad(fn, logits, weights):
    x = logits.clone().requires_grad_()
    h = fn(x)
    (h.double() * weights).sum().backward()
    return h.detach(), x.grad


@pytest.mark.parametrize("backend", ENTROPY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_entropy_vs_reference(backend, dtype, temperature):
    logits = entropy_logits(2, 3, 37, dtype=dtype)
    weights = torch.randn(2, 3, dtype=torch.float64)
    h, grad = entropy_and_grad(
        lambda x: alignops.policy.token_entropy(x, temperature=temperature, backend=backend), logits, weights
    )
    h_ref, grad_ref = entropy_and_grad(lambda x: ref.token_entropy(x, temperature), logits, weights)
    assert h.shape == (2, 3) and h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    torch.testing.assert_close(h, h_ref, **ENTROPY_TOL[dtype])
    # The gradient is rounded once to the logits' dtype, the reference's through several low-precision steps.
    torch.testing.assert_close(grad, grad_ref, **(ENTROPY_TOL[dtype] if dtype.itemsize >= 4 else {}))


@pytest.mark.parametrize("backend", ["native", triton_backend])
def test_token_entropy_long_rows_and_extreme_temperatures(backend):
    """Rows longer than one Triton step whose max sits in the last step (the running sums are rescaled), a row
    whose logits span 1e4, and temperatures from 1e-3 to 1e3."""
    logits = entropy_logits(3, 5000)
    logits[0, 4990] = 40.0
    logits[1] *= 3e3
    weights = torch.randn(3, dtype=torch.float64)
    for temperature in (1.0, 1e-3, 1e3):
        h, grad = entropy_and_grad(
            lambda x, t=temperature: alignops.policy.token_entropy(x, temperature=t, backend=backend), logits, weights
        )
        h_ref, grad_ref = entropy_and_grad(lambda x, t=temperature: ref.token_entropy(x, t), logits, weights)
        torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["native", triton_backend])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_entropy_long_rows_low_precision(backend, dtype):
    """The vocabulary sizes of real models in fp32 / bf16: the Triton launch at its GPU tile (recorded for the sm_90
    gate), the CPU kernel's vectorised body and tail."""
    logits = entropy_logits(3, 5003, dtype=dtype)
    weights = torch.randn(3, dtype=torch.float64)
    h, grad = entropy_and_grad(lambda x: alignops.policy.token_entropy(x, backend=backend), logits, weights)
    h_ref, grad_ref = entropy_and_grad(ref.token_entropy, logits, weights)
    torch.testing.assert_close(h, h_ref, **ENTROPY_TOL[dtype])
    torch.testing.assert_close(grad, grad_ref, **(ENTROPY_TOL[dtype] if dtype == torch.float32 else {}))


def test_token_entropy_vs_trl(import_peer):
    entropy_from_logits = import_peer("trl.trainer.utils").entropy_from_logits
    logits = entropy_logits(4, 9, 1000, dtype=torch.float32)
    weights = torch.randn(4, 9, dtype=torch.float64)
    h, grad = entropy_and_grad(lambda x: alignops.policy.token_entropy(x), logits, weights)
    h_trl, grad_trl = entropy_and_grad(lambda x: entropy_from_logits(x, chunk_size=8), logits, weights)
    torch.testing.assert_close(h, h_trl, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, grad_trl, rtol=2e-5, atol=2e-6)
    # TRL divides by the temperature before; here the op does.
    h_t = alignops.policy.token_entropy(logits, temperature=0.7)
    torch.testing.assert_close(h_t, entropy_from_logits(logits / 0.7), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ENTROPY_BACKENDS)
def test_token_entropy_masked_and_non_finite_logits(backend):
    """A -inf logit (a masked token) adds 0 and gets a zero gradient (TRL's p * log p is NaN there); a row with
    one finite logit has entropy 0; NaN and +inf logits give NaN, never a finite value."""
    logits = entropy_logits(5, 33)
    logits[0, :10] = -math.inf
    logits[1, 1:] = -math.inf
    logits[2, 7] = math.nan
    logits[3, 7] = math.inf
    weights = torch.ones(5, dtype=torch.float64)
    weights[2:4] = 0  # NaN rows: the finite rows' gradients are checked
    h, grad = entropy_and_grad(lambda x: alignops.policy.token_entropy(x, backend=backend), logits, weights)
    torch.testing.assert_close(h[[0, 4]], ref.token_entropy(logits[[0, 4]]), rtol=1e-12, atol=1e-12)
    assert h[1].item() == 0.0 and math.isnan(h[2].item()) and math.isnan(h[3].item())
    assert torch.isfinite(grad[[0, 1, 4]]).all() and (grad[0, :10] == 0).all() and (grad[1] == 0).all()
    _, grad_ref = entropy_and_grad(ref.token_entropy, logits[[0, 4]], weights[[0, 4]])
    torch.testing.assert_close(grad[[0, 4]], grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ENTROPY_BACKENDS)
def test_token_entropy_empty(backend):
    x = torch.zeros(0, 7, 11, requires_grad=True)
    h = alignops.policy.token_entropy(x, backend=backend)
    assert h.shape == (0, 7)
    h.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_token_entropy_reads_every_half_and_bfloat16_value_exactly(dtype):
    """The CPU kernel widens bf16 / fp16 by its own bit moves: on one-entry rows the saved max is the value itself and
    log s = log exp(0) = 0, so every finite value of the dtype must come back exactly (a misread value would make
    u = value' - max nonzero); the entropy of such a row is 0."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)].view(-1, 1)
    entropy, stats = torch.ops.alignops.token_entropy(x, 1.0)
    assert torch.equal(stats[:, 0], x.float().view(-1)) and (stats[:, 1] == 0).all() and (entropy == 0).all()


def test_token_entropy_uniform_is_log_v():
    """An oracle outside the code: uniform logits have entropy log V, one-hot-like ones ~0."""
    h = alignops.policy.token_entropy(torch.full((2, 1000), 0.5))
    torch.testing.assert_close(h, torch.full((2,), math.log(1000.0)))
    assert alignops.policy.token_entropy(torch.tensor([[0.0, -200.0, -300.0]])).item() < 1e-80


def test_token_entropy_opcheck_and_gradcheck():
    logits = entropy_logits(4, 13, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.alignops.token_entropy.default, (logits, 0.8))
    h, stats = torch.ops.alignops.token_entropy(logits.detach(), 0.8)
    torch.library.opcheck(
        torch.ops.alignops.token_entropy_backward.default, (torch.randn(4), logits.detach(), h, stats, 0.8)
    )
    x = entropy_logits(3, 2, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: alignops.policy.token_entropy(t, temperature=0.8), (x,))


def test_token_entropy_compile_and_meta():
    logits = entropy_logits(6, 40, dtype=torch.float32)
    fn = torch.compile(lambda t: alignops.policy.token_entropy(t, temperature=0.5), fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    torch.testing.assert_close(fn(x1), alignops.policy.token_entropy(x2, temperature=0.5))
    fn(x1).sum().backward()
    alignops.policy.token_entropy(x2, temperature=0.5).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    out = alignops.policy.token_entropy(torch.empty(2, 3, 50, device="meta", dtype=torch.bfloat16))
    assert out.shape == (2, 3) and out.dtype == torch.float32 and out.device.type == "meta"


def test_token_entropy_bad_inputs():
    x = torch.randn(3, 5)
    cases = [
        ((x.numpy(),), {}, r"logits must be a tensor, got ndarray"),
        ((torch.tensor(1.0),), {}, r"logits must have shape \[\.\.\., V\], got a 0-D tensor"),
        (
            (torch.ones(3, 5, dtype=torch.long),),
            {},
            r"logits must be float32, float64, float16 or bfloat16, got torch.int64",
        ),
        ((torch.randn(3, 0),), {}, r"logits must have a non-empty vocabulary \(V > 0\), got shape \[3, 0\]"),
        ((x,), dict(temperature=0.0), r"temperature must be a finite value > 0, got 0"),
        ((x,), dict(temperature=-1.0), r"temperature must be a finite value > 0, got -1"),
        ((x,), dict(temperature=math.nan), r"temperature must be a finite value > 0, got nan"),
        ((x,), dict(temperature=math.inf), r"temperature must be a finite value > 0, got inf"),
        ((x,), dict(temperature=1e-40), r"temperature must lie in \[1e-30, 1e30\], got 1e-40"),
        ((x,), dict(temperature=1e39), r"temperature must lie in \[1e-30, 1e30\], got 1e\+39"),
        ((x,), dict(backend="cuda"), r"backend must be one of"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(AlignopsError, match=message):
            alignops.policy.token_entropy(*args, **kwargs)
    with pytest.raises(TypeError):
        alignops.policy.token_entropy(x, 1.0)  # temperature is keyword-only


def test_token_entropy_backward_op_checks():
    logits = torch.randn(3, 5)
    h, stats = torch.ops.alignops.token_entropy(logits, 1.0)
    with pytest.raises(ValueError, match=r"grad must be torch.float32 for torch.float32 logits, got torch.float64"):
        torch.ops.alignops.token_entropy_backward(torch.ones(3, dtype=torch.float64), logits, h, stats, 1.0)
    with pytest.raises(ValueError, match=r"stats must have shape \[N, 2\] with N = 3, got \[2, 2\]"):
        torch.ops.alignops.token_entropy_backward(torch.ones(3), logits, h, stats[:2], 1.0)
    with pytest.raises(ValueError, match=r"entropy must be a 1-D tensor of shape \[N\]"):
        torch.ops.alignops.token_entropy_backward(torch.ones(3), logits, h.view(3, 1), stats, 1.0)
    with pytest.raises(ValueError, match=r"entropy must be on the device of logits \(cpu\), got meta"):
        torch.ops.alignops.token_entropy_backward_check(torch.ones(3), logits, h.to("meta"), stats, 1.0)


def exact_entropy_and_grad(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H and dH/dlogits per row in 40-digit arithmetic (mpmath): an oracle that neither the kernels nor the fp64
    reference (whose log_softmax loses the small terms of a confident row) share any rounding with."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    hs, grads = [], []
    for row in logits.double().tolist():
        m = max(row)
        u = [(mpmath.mpf(x) - m) / temperature for x in row]
        e = [mpmath.exp(v) for v in u]
        s = mpmath.fsum(e)
        log_p = [v - mpmath.log(s) for v in u]
        p = [x / s for x in e]
        h = -mpmath.fsum(a * b for a, b in zip(p, log_p))
        hs.append(float(h))
        grads.append([float(-a * (b + h) / temperature) for a, b in zip(p, log_p)])
    return torch.tensor(hs, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["native", triton_backend])
def test_token_entropy_confident_rows_far_from_zero(backend):
    """Real logits sit far from 0 and peak sharply: the gradient must come from the difference to the row max, not
    from logits / T - logsumexp, which cancels (found by review: the native kernel was 1e7 off with the wrong sign
    on [30, 20] at T = 0.3). The torch backend (log_softmax) is not held to this: it cancels too."""
    g = torch.Generator().manual_seed(3)
    llm = torch.randn(6, 3000, generator=g) * 2.5 + 15
    llm[torch.arange(6), torch.randint(0, 3000, (6,), generator=g)] += 12
    cases = [(torch.tensor([[30.0, 20.0]]), 0.3), (torch.tensor([[1e4, 9999.0]]), 1.0), (llm, 0.3), (llm, 0.7)]
    for logits, temperature in cases:
        weights = torch.ones(logits.shape[0], dtype=torch.float64)
        h, grad = entropy_and_grad(
            lambda x, t=temperature: alignops.policy.token_entropy(x, temperature=t, backend=backend), logits, weights
        )
        h_exact, grad_exact = exact_entropy_and_grad(logits, temperature)
        scale = grad_exact.abs().amax(dim=1, keepdim=True)
        err = (grad.double() - grad_exact).abs() / scale
        assert err.max() < 1e-4, (temperature, err.max(), grad[0, :4], grad_exact[0, :4])
        torch.testing.assert_close(h.double(), h_exact, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", triton_backend])
def test_token_entropy_double_backward_raises(backend):
    """The backward is a closed-form kernel: differentiating it again must fail loudly, not drop the Hessian."""
    x = entropy_logits(3, 7).requires_grad_()
    (g,) = torch.autograd.grad(
        alignops.policy.token_entropy(x, temperature=0.6, backend=backend).sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        (g**2).sum().backward()


@pytest.mark.parametrize("backend", ENTROPY_BACKENDS)
def test_token_entropy_nan_rows_have_nan_gradients(backend):
    logits = entropy_logits(3, 9)
    logits[0, 2] = math.nan
    logits[1, 4] = math.inf
    logits[2] = -math.inf
    for weights in (torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)):
        h, grad = entropy_and_grad(lambda x: alignops.policy.token_entropy(x, backend=backend), logits, weights)
        assert h.isnan().all() and grad.isnan().all(), grad


# ---- the public-function contract (tests/test_public_contract.py) --------------------------------------------------


def _rn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CONTRACT_CASES = {
    "policy_loss": case(
        alignops.policy_loss,
        lambda: [_rn(3, 6), _rn(3, seed=1), torch.ones(3, 6, dtype=torch.bool)],
        lambda: dict(
            old_per_token_logps=_rn(3, 6, seed=2),
            ref_per_token_logps=_rn(3, 6, seed=3),
            beta=0.04,
            importance_sampling_ratio=_rn(3, 6, seed=4).abs(),
        ),
        meta="ref_per_token_logps",
        hyper=(
            "epsilon_low",
            "epsilon_high",
            "delta",
            "beta",
            "sapo_temperature_pos",
            "vespo_lambda_neg",
            "off_policy_mask_threshold:nan",
        ),
    ),
    "token_entropy": case(alignops.policy.token_entropy, lambda: [_rn(2, 3, 11)], hyper=("temperature",)),
}
