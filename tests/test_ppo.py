"""The ppo family: gae_advantages (native C++, Triton, torch reference) and ppo_value_loss, against the
Python-loop reference (python/alignops/reference/ppo.py) and against TRL's PPOTrainer formulas.

TRL 1.16 no longer ships PPOTrainer (trl/trainer/ppo_trainer.py was moved to trl.experimental and removed in
v1.13), and its GAE loop was never a standalone function, so ``_trl_gae`` / ``_trl_masked_whiten`` /
``_trl_value_loss`` below are transcriptions of that file's lines (the "6. compute advantages and returns"
block and the value-loss lines of the training loop) and of trl.core's masked_mean / masked_var /
masked_whiten, applied the way TRL applies them: rewards and values zero-filled after the last token.
"""

import math

import pytest
import torch

import alignops
from alignops import AlignopsError
from alignops.ppo import GAEOutput, ValueLossOutput, gae_advantages, ppo_value_loss
from alignops.reference import ppo as ref

TRITON = alignops._backend.triton_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


# ---- TRL's formulas, transcribed ----------------------------------------------------------------------------


def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_masked_var(values, mask):
    mean = _trl_masked_mean(values, mask)
    variance = _trl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    return variance * (mask_sum / (mask_sum - 1))


def _trl_masked_whiten(values, mask):
    mean, var = _trl_masked_mean(values, mask), _trl_masked_var(values, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _trl_gae(rewards, values, padding_mask, gamma, lam, whiten):
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    if whiten:
        advantages = _trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def _trl_value_loss(vpred, mb_values, mb_return, padding_mask_p1, cliprange_value):
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * _trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = _trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    return vf_loss, vf_clipfrac


# ---- inputs -------------------------------------------------------------------------------------------------


def _rollout(B, T, dtype=torch.float32, padded=True, device="cpu"):
    """Rewards (a KL-like term per token plus a score on the last valid token), values, and a mask with
    padding at the end of each row (TRL's layout; one row fully padded and one full when B >= 3)."""
    r = 0.05 * torch.randn(B, T, dtype=torch.float64)
    v = torch.randn(B, T, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,))
    if B >= 3:
        lengths[0], lengths[1] = T, 0
    mask = torch.arange(T)[None, :] < lengths[:, None] if padded else torch.rand(B, T) > 0.3
    last = (lengths - 1).clamp(min=0)
    r[torch.arange(B), last] += torch.randn(B, dtype=torch.float64) * (lengths > 0)
    return r.to(dtype).to(device), v.to(dtype).to(device), mask.to(device)


BACKENDS = [
    "native",
    "torch",
    pytest.param(
        "triton", marks=[pytest.mark.triton, pytest.mark.skipif(not TRITON, reason="needs the triton package")]
    ),
]


def _device(backend):
    return DEVICE if backend == "triton" else "cpu"


# ---- GAE ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,padded", [(3, 47, True), (1, 1, True), (6, 33, False), (5, 130, True)])
def test_gae_matches_reference(backend, dtype, B, T, padded):
    r, v, m = _rollout(B, T, dtype, padded, _device(backend))
    last = torch.randn(B, dtype=dtype, device=r.device)
    for kwargs in (
        dict(),
        dict(gamma=0.9, lam=0.8, last_values=last),
        dict(gamma=0.0, lam=1.0),
        dict(gamma=1.0, lam=0.0, last_values=last),
    ):
        out = gae_advantages(r, v, m, backend=backend, **kwargs)
        assert isinstance(out, GAEOutput) and out.advantages.dtype == dtype and out.returns.shape == (B, T)
        lv = kwargs["last_values"].cpu() if "last_values" in kwargs else None
        ea, er = ref.gae_advantages(r.cpu(), v.cpu(), m.cpu(), lv, kwargs.get("gamma", 1.0), kwargs.get("lam", 0.95))
        torch.testing.assert_close(out.advantages.cpu(), ea, **TOL[dtype])
        torch.testing.assert_close(out.returns.cpu(), er, **TOL[dtype])
        assert (out.advantages.cpu()[~m.cpu()] == 0).all() and (out.returns.cpu()[~m.cpu()] == 0).all()


def test_gae_closed_form():
    """A hand-computed row, independent of both the reference and TRL: T = 3, mask [1, 1, 0], gamma = 0.5,
    lam = 0.5: A_1 = r_1 - V_1 (the padding ends the episode), A_0 = r_0 + 0.5 V_1 - V_0 + 0.25 A_1."""
    r = torch.tensor([[1.0, 2.0, 7.0]])
    v = torch.tensor([[0.5, 1.5, 9.0]])
    m = torch.tensor([[True, True, False]])
    out = gae_advantages(r, v, m, gamma=0.5, lam=0.5, backend="native")
    a1 = 2.0 - 1.5
    a0 = 1.0 + 0.5 * 1.5 - 0.5 + 0.25 * a1
    assert out.advantages.tolist() == [[a0, a1, 0.0]]
    assert out.returns.tolist() == [[a0 + 0.5, a1 + 1.5, 0.0]]
    lv = torch.tensor([4.0])
    full = gae_advantages(r, v, torch.ones_like(m), gamma=0.5, lam=1.0, last_values=lv, backend="native")
    a2 = 7.0 + 0.5 * 4.0 - 9.0
    assert full.advantages[0, 2].item() == a2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("whiten", [False, True])
def test_gae_matches_trl_loop(backend, whiten):
    """Padding at the end of each row, zero-filled as TRL does it: equal to TRL's loop at every position."""
    B, T = 7, 61
    r, v, m = _rollout(B, T, torch.float64)
    r, v = r.masked_fill(~m, 0), v.masked_fill(~m, 0)
    ea, er = _trl_gae(r, v, ~m, 1.0, 0.95, whiten)
    dev = _device(backend)
    out = gae_advantages(r.to(dev), v.to(dev), m.to(dev), whiten=whiten, backend=backend)
    # TRL's Bessel factor mask_sum / (mask_sum - 1) divides two int64 tensors, which gives a float32 tensor:
    # its whitened advantages carry that factor's fp32 rounding (relative 6e-8); alignops keeps it in fp64.
    tol = dict(rtol=2e-7, atol=1e-10) if whiten else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.advantages.cpu(), ea, **tol)
    torch.testing.assert_close(out.returns.cpu(), er, rtol=1e-10, atol=1e-10)
    # Values left at random after the mask (not zero-filled) change nothing: positions outside the mask
    # contribute nothing.
    r2 = torch.where(m, r, torch.randn_like(r)).to(dev)
    v2 = torch.where(m, v, torch.randn_like(v)).to(dev)
    out2 = gae_advantages(r2, v2, m.to(dev), whiten=whiten, backend=backend)
    torch.testing.assert_close(out2.advantages.cpu(), out.advantages.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_bf16_error_within_2x_of_torch_in_bf16(backend):
    B, T = 8, 200
    r, v, m = _rollout(B, T, torch.float64)
    r, v = r.masked_fill(~m, 0), v.masked_fill(~m, 0)
    exact, _ = _trl_gae(r, v, ~m, 1.0, 0.95, False)
    torch_bf16, _ = _trl_gae(r.bfloat16(), v.bfloat16(), ~m, 1.0, 0.95, False)
    dev = _device(backend)
    ours = gae_advantages(r.bfloat16().to(dev), v.bfloat16().to(dev), m.to(dev), backend=backend).advantages.cpu()
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch_bf16.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_torch, (err_ours, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_gae_empty(backend, shape):
    dev = _device(backend)
    r = torch.zeros(shape, device=dev)
    out = gae_advantages(r, r.clone(), torch.ones(shape, dtype=torch.bool, device=dev), backend=backend)
    assert out.advantages.shape == shape and out.returns.shape == shape


def test_gae_nan_propagates_within_its_episode():
    r = torch.zeros(2, 6)
    v = torch.zeros(2, 6)
    m = torch.ones(2, 6, dtype=torch.bool)
    m[0, 3] = False
    r[0, 4] = float("nan")
    out = gae_advantages(r, v, m, backend="native")
    assert out.advantages[0, 4].isnan() and not out.advantages[0, :4].isnan().any()
    assert out.advantages[0, 3] == 0 and not out.advantages[1].isnan().any()


def test_gae_non_bool_mask_and_strided_inputs():
    r, v, m = _rollout(4, 40, torch.float64)
    rt = r.t().contiguous().t()
    ea, er = ref.gae_advantages(r, v, m)
    out = gae_advantages(rt, v, m.to(torch.int64), backend="native")
    torch.testing.assert_close(out.advantages, ea, rtol=1e-12, atol=1e-12)


def test_gae_not_differentiable():
    r, v, m = _rollout(2, 5)
    v.requires_grad_(True)
    out = gae_advantages(r, v, m, backend="native")
    with pytest.raises(AlignopsError, match="gae_advantages is not differentiable"):
        out.advantages.sum().backward()


def test_gae_opcheck():
    r, v, m = _rollout(3, 17)
    torch.library.opcheck(torch.ops.alignops.gae_advantages.default, (r, v, m, None, 0.9, 0.95))
    torch.library.opcheck(torch.ops.alignops.gae_advantages.default, (r, v, m, torch.randn(3), 1.0, 0.5))


@pytest.mark.triton
@pytest.mark.skipif(not TRITON, reason="needs the triton package")
def test_gae_triton_opcheck_and_bf16():
    r, v, m = _rollout(5, 9, device=DEVICE)
    # In the interpreter, wrap_triton hands back the plain interpreted kernel, which would run on fake tensors:
    # the fake-tensor and AOT-dispatch checks need a GPU, where all of opcheck runs.
    utils = (
        ("test_schema", "test_autograd_registration")
        if DEVICE == "cpu"
        else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    )
    torch.library.opcheck(
        torch.ops.alignops.gae_advantages_triton.default, (r, v, m, None, 0.9, 0.95), test_utils=utils
    )
    rb, vb = r.bfloat16(), v.bfloat16()
    got = gae_advantages(rb, vb, m, backend="triton").advantages.cpu().float()
    exp = ref.gae_advantages(rb.cpu(), vb.cpu(), m.cpu())[0].float()
    # The interpreter's fp32 -> bf16 cast rounds ties differently from the C++ / torch cast: one ulp.
    assert ((got - exp).abs() <= 2**-7 * exp.abs().clamp_min(1)).all()


def test_gae_compile_fullgraph():
    r, v, m = _rollout(4, 23)
    last = torch.randn(4)
    fn = torch.compile(
        lambda r, v, m, last: gae_advantages(r, v, m, gamma=0.9, last_values=last, whiten=True),
        fullgraph=True,
        backend="aot_eager",
    )
    got = fn(r, v, m, last)
    exp = gae_advantages(r, v, m, gamma=0.9, last_values=last, whiten=True)
    torch.testing.assert_close(got.advantages, exp.advantages)
    torch.testing.assert_close(got.returns, exp.returns)


def test_gae_meta_shapes():
    r = torch.empty(3, 7, device="meta")
    out = gae_advantages(r, r, torch.empty(3, 7, dtype=torch.bool, device="meta"))
    assert out.advantages.shape == (3, 7) and out.advantages.device.type == "meta"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_bad_inputs(backend):
    dev = _device(backend)
    r, v, m = _rollout(3, 8, device=dev)
    call = lambda *a, **k: gae_advantages(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(AlignopsError, match=r"values must have the shape of rewards \[3, 8\]"):
        call(r, v[:, :5], m)
    with pytest.raises(AlignopsError, match=r"completion_mask must have the shape of rewards"):
        call(r, v, m[:2])
    with pytest.raises(AlignopsError, match=r"rewards must be a 2-D tensor"):
        call(r[0], v[0], m[0])
    with pytest.raises(AlignopsError, match=r"rewards must be float32, float64, float16 or bfloat16, got torch.int64"):
        call(r.long(), v.long(), m)
    with pytest.raises(AlignopsError, match=r"values must have the dtype of rewards \(torch.float32\)"):
        call(r, v.double(), m)
    with pytest.raises(AlignopsError, match=r"last_values must have shape \[B\] = \[3\]"):
        call(r, v, m, last_values=torch.zeros(4, device=dev))
    with pytest.raises(AlignopsError, match=r"last_values must have the dtype of rewards"):
        call(r, v, m, last_values=torch.zeros(3, dtype=torch.float64, device=dev))
    for name in ("gamma", "lam"):
        for bad in (1.5, -0.1, float("nan")):
            with pytest.raises(AlignopsError, match=rf"{name} must be a float in \[0, 1\], got"):
                call(r, v, m, **{name: bad})
    meta = torch.empty(3, 8, device="meta")
    with pytest.raises(AlignopsError, match=r"values must be on the device of rewards .*got meta"):
        call(r, meta, m)
    with pytest.raises(AlignopsError, match=r"last_values must be on the device of rewards .*got meta"):
        call(r, v, m, last_values=torch.empty(3, device="meta"))


def test_gae_native_op_checks_and_meta_mixing():
    """The raw ops check what the public function checks (the C++ kernel and the fake kernel)."""
    r, v, m = _rollout(3, 8)
    op = torch.ops.alignops.gae_advantages
    with pytest.raises(ValueError, match=r"gamma must be a float in \[0, 1\], got nan"):
        op(r, v, m, None, float("nan"), 0.9)
    with pytest.raises(ValueError, match=r"completion_mask must be a bool tensor"):
        op(r, v, m.float(), None, 1.0, 0.9)
    with pytest.raises(AlignopsError, match=r"values must be on the device of rewards"):
        op(r, torch.empty(3, 8, device="meta"), m, None, 1.0, 0.9)


def test_gae_bad_backend():
    r, v, m = _rollout(2, 3)
    with pytest.raises(AlignopsError, match=r"gae_advantages: backend must be one of"):
        gae_advantages(r, v, m, backend="cuda")


# ---- value loss ---------------------------------------------------------------------------------------------


def _value_inputs(B, T, dtype=torch.float64):
    r, old, m = _rollout(B, T, dtype)
    returns = old + 0.3 * torch.randn_like(old)
    new = old + 0.3 * torch.randn_like(old)  # about half the tokens beyond the 0.2 clip range
    return new, old, returns, m


@pytest.mark.parametrize("B,T", [(3, 47), (8, 16), (1, 1)])
def test_value_loss_matches_trl(B, T):
    new, old, returns, m = _value_inputs(B, T)
    if not m.any():
        m[0, 0] = True
    new.requires_grad_(True)
    out = ppo_value_loss(new, old, returns, m, cliprange_value=0.2)
    assert isinstance(out, ValueLossOutput)
    new_trl = new.detach().clone().requires_grad_(True)
    loss, clipfrac = _trl_value_loss(new_trl, old, returns, ~m, 0.2)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=1e-12)
    # TRL's clipfrac averages a .float() indicator: fp32, where alignops keeps the values' fp64.
    torch.testing.assert_close(out.clipfrac, clipfrac.to(out.clipfrac.dtype), rtol=1e-6, atol=0)
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(new.grad, new_trl.grad, rtol=1e-12, atol=1e-12)


def test_value_loss_closed_form_and_reductions():
    # Token 0: V = 1.0, V_old = 0, R = 0.5 -> clipped to 0.2: max(0.25, 0.09) = 0.25 (not clipped term).
    # Token 1: V = 0.0, V_old = 1, R = 1.0 -> clipped to 0.8: max(1.0, 0.04) = 1.0.
    # Token 2: V = 0.5, V_old = 0.4, R = -1 -> within range: 2.25 both, not counted as clipped.
    # Token 3: masked out.
    v = torch.tensor([[1.0, 0.0, 0.5, 9.0]], dtype=torch.float64)
    vo = torch.tensor([[0.0, 1.0, 0.4, 0.0]], dtype=torch.float64)
    R = torch.tensor([[0.5, 1.0, -1.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, True, False]])
    out = ppo_value_loss(v, vo, R, m, cliprange_value=0.2)
    assert out.loss.item() == pytest.approx(0.5 * (0.25 + 1.0 + 2.25) / 3)
    assert out.clipfrac.item() == 0.0
    # V = 0, V_old = 1, R = -2: unclipped (0 + 2)^2 = 4, clipped (0.8 + 2)^2 = 7.84, the larger: clipfrac 1.
    out2 = ppo_value_loss(torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[-2.0]]), torch.tensor([[True]]))
    assert out2.loss.item() == pytest.approx(0.5 * 2.8**2) and out2.clipfrac.item() == 1.0
    s = ppo_value_loss(v, vo, R, m, reduction="sum")
    assert s.loss.item() == pytest.approx(0.5 * 3.5)
    n = ppo_value_loss(v, vo, R, m, reduction="none")
    torch.testing.assert_close(n.loss, torch.tensor([[0.125, 0.5, 1.125, 0.0]], dtype=torch.float64))


def test_value_loss_gradcheck_and_dtypes():
    new, old, returns, m = _value_inputs(3, 11)
    new.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ppo_value_loss(x, old, returns, m).loss, (new,))
    for dtype in (torch.float32, torch.bfloat16):
        out = ppo_value_loss(new.detach().to(dtype), old.to(dtype), returns.to(dtype), m)
        exp = ref.ppo_value_loss(
            new.detach().to(dtype).double(), old.to(dtype).double(), returns.to(dtype).double(), m
        )[0]
        assert out.loss.dtype == torch.float32
        torch.testing.assert_close(out.loss.double(), exp, rtol=1e-5, atol=1e-6)


def test_value_loss_empty():
    z = torch.zeros(0, 7, requires_grad=True)
    out = ppo_value_loss(z, z.detach(), z.detach(), torch.zeros(0, 7, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.clipfrac.item() == 0.0
    out.loss.backward()
    assert z.grad.shape == (0, 7)


def test_value_loss_compile_fullgraph():
    new, old, returns, m = _value_inputs(4, 9, torch.float32)
    fn = torch.compile(lambda *a: ppo_value_loss(*a, cliprange_value=0.1), fullgraph=True, backend="aot_eager")
    got, exp = fn(new, old, returns, m), ppo_value_loss(new, old, returns, m, cliprange_value=0.1)
    torch.testing.assert_close(got.loss, exp.loss)
    torch.testing.assert_close(got.clipfrac, exp.clipfrac)


def test_value_loss_bad_inputs():
    new, old, returns, m = _value_inputs(2, 5, torch.float32)
    with pytest.raises(AlignopsError, match=r"old_values must have the shape of values \[2, 5\]"):
        ppo_value_loss(new, old[:, :3], returns, m)
    with pytest.raises(AlignopsError, match=r"returns must have the dtype of values"):
        ppo_value_loss(new, old, returns.double(), m)
    with pytest.raises(AlignopsError, match=r"values must be float32, float64, float16 or bfloat16"):
        ppo_value_loss(new.long(), old.long(), returns.long(), m)
    with pytest.raises(AlignopsError, match=r"returns must be on the device of values .*got meta"):
        ppo_value_loss(new, old, torch.empty(2, 5, device="meta"), m)
    with pytest.raises(AlignopsError, match=r"cliprange_value must be finite, got nan"):
        ppo_value_loss(new, old, returns, m, cliprange_value=math.nan)
    with pytest.raises(AlignopsError, match=r"cliprange_value must be >= 0"):
        ppo_value_loss(new, old, returns, m, cliprange_value=-0.1)
    with pytest.raises(AlignopsError, match=r"reduction must be one of"):
        ppo_value_loss(new, old, returns, m, reduction="batchmean")
