"""The Triton preference ops against the reference (python/alignops/reference/preference.py) and the native
CPU ops. Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); shapes are small because the interpreter is slow."""

import pytest
import torch

import alignops
from alignops.reference import preference as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
# Outputs are in the accumulation dtype; bf16 inputs are compared with the fp32 reference of the same bf16
# values. Gradients for bf16 inputs are rounded to bf16 once, so they lie within one bf16 ulp (2^-7 relative)
# of the fp32 reference: the interpreter's fp32 -> bf16 cast truncates, a GPU rounds to nearest even.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
}
GRAD_TOL = {**TOL, torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}
SMOOTHED_TYPES = ("sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo", "cpo")
SORTED_TYPES = ("aot", "aot_unpaired")


def _pairs(B, dtype):
    """Per-sequence log-probs with log-ratios of a few units, so that beta * margin spans the sigmoid."""
    pc = -30 + 8 * torch.randn(B, dtype=torch.float64)
    pr = -35 + 8 * torch.randn(B, dtype=torch.float64)
    rc = pc + 3 * torch.randn(B, dtype=torch.float64)
    rr = pr + 3 * torch.randn(B, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (pc, pr, rc, rr)]


def _lengths(B):
    # Includes 0, which the kernels clamp to 1.
    return torch.randint(0, 40, (B,), device=DEVICE), torch.randint(0, 40, (B,), device=DEVICE)


def _run(fn, inputs, upstream, **kwargs):
    """Loss per pair, rewards, and the gradients of sum(upstream * loss) with respect to the four inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss, cr, rj = fn(*leaves, reduction="none", **kwargs)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return (loss, cr, rj), [t.grad for t in leaves]


def _check(loss_type, dtype, B=13, **kwargs):
    """Triton vs reference (autograd) and vs the native CPU op, for the forward outputs and the gradients."""
    acc = ACC[dtype]
    inputs = _pairs(B, dtype)
    upstream = torch.rand(B, dtype=torch.float64, device=DEVICE)
    out, grads = _run(alignops.preference_loss, inputs, upstream, loss_type=loss_type, backend="triton", **kwargs)
    assert all(t.dtype == acc for t in out)
    assert all(g.dtype == dtype for g in grads)
    ref_kwargs = {
        k: (v.to(acc) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()
    }
    ref_out, ref_grads = _run(
        ref.preference_loss, [t.to(acc) for t in inputs], upstream, loss_type=loss_type, **ref_kwargs
    )
    for got, want in zip(out, ref_out):
        torch.testing.assert_close(got, want, **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        # The reference-free types leave the reference log-probs out of the graph.
        want = torch.zeros_like(got, dtype=acc) if want is None else want
        torch.testing.assert_close(got.to(acc), want, **GRAD_TOL[dtype])
    if DEVICE == "cpu":
        nat_out, nat_grads = _run(
            alignops.preference_loss, inputs, upstream, loss_type=loss_type, backend="native", **kwargs
        )
        for got, want in zip(out, nat_out):
            torch.testing.assert_close(got, want, **TOL[dtype])
        for got, want in zip(grads, nat_grads):
            torch.testing.assert_close(got, want, **GRAD_TOL[dtype])


# ---- preference_loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", alignops.LOSS_TYPES)
def test_loss_type_matches_reference_and_native(loss_type, dtype):
    lc, lr = _lengths(13)
    # exo_pair is undefined without label smoothing; every other type runs unsmoothed here.
    _check(
        loss_type,
        dtype,
        beta=0.3,
        label_smoothing=0.01 if loss_type == "exo_pair" else 0.0,
        chosen_lengths=lc,
        rejected_lengths=lr,
    )


@pytest.mark.parametrize("loss_type", SMOOTHED_TYPES)
def test_label_smoothing(loss_type):
    _check(loss_type, torch.float32, beta=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_pair_beta(dtype):
    lc, lr = _lengths(13)
    beta = (0.05 + 0.5 * torch.rand(13, dtype=torch.float64)).to(dtype).to(DEVICE)
    for loss_type in sorted(set(alignops.LOSS_TYPES) - set(SORTED_TYPES)):
        _check(
            loss_type,
            dtype,
            beta=beta,
            label_smoothing=0.1 if loss_type == "exo_pair" else 0.0,
            chosen_lengths=lc,
            rejected_lengths=lr,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence(f_divergence, dtype):
    lc, lr = _lengths(13)
    for loss_type in ("sigmoid", "ipo", "sigmoid_norm"):
        _check(
            loss_type,
            dtype,
            beta=0.3,
            f_divergence_type=f_divergence,
            f_alpha_divergence_coef=0.5,
            chosen_lengths=lc,
            rejected_lengths=lr,
        )


def test_alpha_divergence_near_one_is_reverse_kl():
    _check("sigmoid", torch.float64, beta=0.3, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0 + 1e-7)


def test_weighted_loss_types_across_blocks():
    # 300 pairs: more than one program of the pair kernel, the last one masked.
    lc, lr = _lengths(300)
    _check(
        ["sigmoid", "bco_pair", "simpo", "aot"],
        torch.float32,
        B=300,
        beta=0.2,
        label_smoothing=0.05,
        loss_weights=[1.0, 0.5, 0.3, 0.2],
        chosen_lengths=lc,
        rejected_lengths=lr,
        gamma=0.3,
    )


@pytest.mark.skipif(DEVICE != "cpu", reason="compares with the native CPU op")
@pytest.mark.parametrize("f_divergence", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_margins_match_native(dtype, f_divergence):
    # Log-ratios up to 1e4 in both directions: the stable forms (two-branch sigmoid, log-sigmoid via log1p,
    # discopop's E m in log space) must give the native op's numbers, infinities and NaNs included.
    vals = torch.tensor([-1e4, -300.0, -80.0, -20.0, -1.0, 0.0, 1e-8, 1.0, 20.0, 80.0, 300.0, 1e4])
    xc, xr = (t.flatten().to(dtype) for t in torch.meshgrid(vals, vals, indexing="ij"))
    rc, rr = torch.full_like(xc, -50.0), torch.full_like(xr, -60.0)
    lc, lr = _lengths(xc.shape[0])
    for code in range(15):
        args = (xc + rc, xr + rr, rc, rr, None, lc, lr, [code], [1.0], 0.5, 0.1, 0.5, 0.05, f_divergence, 0.5, True)
        triton_out = torch.ops.alignops.preference_loss_triton(*args)
        for got, want in zip(triton_out, torch.ops.alignops.preference_loss(*args)):
            torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_batch(dtype):
    inputs = [t.requires_grad_(True) for t in _pairs(0, dtype)]
    out = alignops.preference_loss(*inputs, loss_type="sigmoid", reduction="sum", backend="triton")
    assert out.loss.dtype == ACC[dtype] and out.loss.item() == 0.0
    assert out.chosen_rewards.shape == (0,) and out.rejected_rewards.shape == (0,)
    out.loss.backward()
    assert all(t.grad.shape == (0,) and t.grad.dtype == dtype for t in inputs)


def test_raw_op_outputs_bf16_accumulate_in_fp32():
    B = 11
    inputs = _pairs(B, torch.bfloat16)
    lc, lr = _lengths(B)
    args = (None, lc, lr, [0, 2, 13], [1.0, 0.25, 0.5], 0.3, 0.05, 0.5, 0.05, 0, 0.5, True)
    loss, cr, rj, grad = torch.ops.alignops.preference_loss_triton(*inputs, *args)
    assert grad.shape == (4, B) and grad.dtype == torch.float32
    # d loss / d (pc, pr, rc, rr) from the fp32 reference of the same bf16 values, before any rounding.
    leaves = [t.float().requires_grad_(True) for t in inputs]
    want, _, _ = ref.preference_loss(
        *leaves,
        ["sigmoid", "ipo", "simpo"],
        0.3,
        0.05,
        loss_weights=[1.0, 0.25, 0.5],
        chosen_lengths=lc,
        rejected_lengths=lr,
        reduction="none",
    )
    want.sum().backward()
    torch.testing.assert_close(loss, want.detach(), **TOL[torch.bfloat16])
    torch.testing.assert_close(grad, torch.stack([t.grad for t in leaves]), **TOL[torch.bfloat16])
    if DEVICE == "cpu":
        for got, want in zip((loss, cr, rj, grad), torch.ops.alignops.preference_loss(*inputs, *args)):
            torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


def test_raw_op_without_grad_has_empty_grad_and_refuses_backward():
    inputs = [t.requires_grad_(True) for t in _pairs(5, torch.float32)]
    loss, _, _, grad = torch.ops.alignops.preference_loss_triton(
        *inputs, None, None, None, [0], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, False
    )
    assert grad.shape == (0,)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.sum().backward()


def test_raw_op_rejects_bad_arguments():
    inputs = _pairs(5, torch.float32)
    common = (0.1, 0.0, 0.5, 0.05, 0, 0.5, False)
    with pytest.raises(ValueError, match="one weight per loss type"):
        torch.ops.alignops.preference_loss_triton(*inputs, None, None, None, [0, 1], [1.0], *common)
    with pytest.raises(ValueError, match=r"loss type code must be in \[0, 15\), got 15"):
        torch.ops.alignops.preference_loss_triton(*inputs, None, None, None, [15], [1.0], *common)
    with pytest.raises(ValueError, match="ref_chosen_logps must have the dtype"):
        torch.ops.alignops.preference_loss_triton(
            inputs[0], inputs[1], inputs[2].double(), inputs[3], None, None, None, [0], [1.0], *common
        )


# ---- selective_logprobs ---------------------------------------------------------------------------------


def _logits(N, V, dtype):
    logits = (3 * torch.randn(N, V, dtype=torch.float64)).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[2] = -100  # ignored row
    logits[4, ::3] = float("-inf")  # masked logits (the target is not one of them)
    targets[4] = 1
    return logits, targets


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 1000), (5, 4100)], ids=lambda s: "x".join(map(str, s)))
def test_selective_logprobs_forward_backward(shape, dtype, temperature, target_dtype):
    # V = 1000 is not a multiple of the block; V = 4100 takes two steps of the online logsumexp.
    acc = ACC[dtype]
    logits, targets = _logits(*shape, dtype)
    targets = targets.to(target_dtype)
    upstream = torch.randn(shape[0], dtype=acc, device=DEVICE)
    upstream[0] = 0.0  # a row with g = 0 writes zeros without reading the logits

    x = logits.clone().requires_grad_(True)
    logp = alignops.selective_logprobs(x, targets, temperature=temperature, backend="triton")
    (logp * upstream).sum().backward()
    assert logp.dtype == acc and x.grad.dtype == dtype

    x_ref = logits.to(acc).requires_grad_(True)
    want = ref.selective_logprobs(x_ref, targets, temperature=temperature)
    (want * upstream).sum().backward()
    torch.testing.assert_close(logp, want, **TOL[dtype])
    torch.testing.assert_close(x.grad.to(acc), x_ref.grad, **GRAD_TOL[dtype])
    assert logp[2] == 0 and (x.grad[2] == 0).all() and (x.grad[0] == 0).all()
    assert torch.isfinite(logp).all() and torch.isfinite(x.grad).all()

    if DEVICE == "cpu":
        logp_t, lse_t = torch.ops.alignops.selective_logprobs_triton(logits, targets, -100, temperature)
        logp_n, lse_n = torch.ops.alignops.selective_logprobs(logits, targets, -100, temperature)
        torch.testing.assert_close(logp_t, logp_n, **TOL[dtype])
        torch.testing.assert_close(lse_t, lse_n, **TOL[dtype])
        assert lse_t[2] == 0
        g = torch.ops.alignops.selective_logprobs_backward_triton(upstream, logits, targets, lse_t, -100, temperature)
        g_n = torch.ops.alignops.selective_logprobs_backward(upstream, logits, targets, lse_n, -100, temperature)
        torch.testing.assert_close(g.to(acc), g_n.to(acc), **GRAD_TOL[dtype])


@pytest.mark.parametrize("V, hot", [(11, None), (70, 69)])
def test_selective_logprobs_tiny_temperature_stays_finite(V, hot):
    # At T = 1e-10 an exponent formed as z / T - max under FMA fusion is the product's rounding error
    # (hundreds): logp came out -inf / +inf. Expected: torch in float64.
    logits = torch.randn(5, V)
    if hot is not None:
        logits[:, hot] = 5.0
    targets = torch.randint(0, V, (5,))
    targets[0] = V - 1 if hot is None else hot
    exp = torch.log_softmax(logits.double() / 1e-10, -1).gather(-1, targets[:, None]).squeeze(-1)
    got = alignops.selective_logprobs(logits.to(DEVICE), targets.to(DEVICE), temperature=1e-10, backend="triton")
    torch.testing.assert_close(got.double().cpu(), exp, rtol=1e-6, atol=1e-6)


def test_selective_logprobs_out_of_range_target_gives_nan_without_reading_it():
    logits, targets = _logits(6, 100, torch.float32)
    targets[1] = 100
    targets[3] = -7
    logp, lse = torch.ops.alignops.selective_logprobs_triton(logits, targets, -100, 1.0)
    assert torch.isnan(logp[[1, 3]]).all() and torch.isfinite(lse[[1, 3]]).all()
    keep = torch.tensor([0, 4, 5])
    torch.testing.assert_close(logp[keep], ref.selective_logprobs(logits, targets.clamp(0, 99))[keep])
    g = torch.ops.alignops.selective_logprobs_backward_triton(
        torch.ones(6, device=DEVICE), logits, targets, lse, -100, 1.0
    )
    assert torch.isnan(g[[1, 3]]).all() and torch.isfinite(g[keep]).all()


def test_selective_logprobs_raw_op_rejects_bad_arguments():
    logits, targets = _logits(6, 100, torch.float32)
    with pytest.raises(ValueError, match=r"temperature must be a finite value > 0, got 0\b"):
        torch.ops.alignops.selective_logprobs_triton(logits, targets, -100, 0.0)
    with pytest.raises(ValueError, match="targets must be int64 or int32"):
        torch.ops.alignops.selective_logprobs_triton(logits, targets.float(), -100, 1.0)
    with pytest.raises(ValueError, match="lse must be torch.float32 for torch.bfloat16 logits"):
        torch.ops.alignops.selective_logprobs_backward_triton(
            torch.ones(6, device=DEVICE),
            logits.bfloat16(),
            targets,
            torch.ones(6, dtype=torch.float64, device=DEVICE),
            -100,
            1.0,
        )


# ---- opcheck ----------------------------------------------------------------------------------------------


def _opcheck_samples():
    plain = _pairs(9, torch.float32)
    inputs = [t.clone().requires_grad_(True) for t in plain]
    lc, lr = _lengths(9)
    beta = torch.rand(9, device=DEVICE) + 0.1
    logits, targets = _logits(7, 50, torch.float32)
    logp, lse = torch.ops.alignops.selective_logprobs_triton(logits, targets, -100, 0.7)
    return [
        (
            torch.ops.alignops.preference_loss_triton,
            (*inputs, beta, lc, lr, [0, 12, 14], [1.0, 0.5, 0.25], 0.0, 0.0, 0.5, 0.05, 0, 0.5, True),
        ),
        # compute_grad=False refuses backward by design, hence inputs that do not require grad.
        (
            torch.ops.alignops.preference_loss_triton,
            (*plain, None, None, None, [11], [1.0], 0.1, 0.0, 0.5, 0.05, 2, 0.5, False),
        ),
        (torch.ops.alignops.selective_logprobs_triton, (logits.requires_grad_(True), targets, -100, 0.7)),
        (
            torch.ops.alignops.selective_logprobs_backward_triton,
            (torch.randn(7, device=DEVICE), logits.detach(), targets, lse, -100, 0.7),
        ),
    ]


# In the interpreter, wrap_triton hands back the plain interpreted kernel (there is no JITFunction to trace),
# so under FakeTensorMode the kernel would run on fake tensors: the fake-tensor and AOT-dispatch checks need
# a GPU. On a GPU every check of opcheck runs.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
