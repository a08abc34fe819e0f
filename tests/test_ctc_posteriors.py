"""ctc_posteriors on the CPU: loss vs torch.nn.functional.ctc_loss, occupancy and gradient vs a brute-force
enumeration of every alignment, gradient vs autograd through the reference (gradcheck), occupancy rows at
T = 100000, dtypes, layouts, opcheck, compile, bad input. Triton kernel: tests/test_ctc_posteriors_triton.py."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import alignops
from alignops.reference import ctc_posteriors as ref


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


def make_batch(B, T, C, L, blank=0, dtype=torch.float64, normalised=True, repeats=True):
    scores = torch.randn(B, T, C, dtype=torch.float64) * 2
    lp = scores.log_softmax(-1) if normalised else scores + torch.randn(B, T, 1, dtype=torch.float64) * 3
    others = torch.tensor([c for c in range(C) if c != blank])
    targets = others[torch.randint(0, C - 1, (B, L))]
    if repeats and L > 1:
        targets[0, 1] = targets[0, 0]
    input_lengths = torch.randint(max(1, T // 2), T + 1, (B,))
    input_lengths[0] = T
    target_lengths = torch.randint(0, L + 1, (B,))
    target_lengths[0] = L
    return lp.to(dtype), targets, input_lengths, target_lengths


def torch_ctc(lp, targets, il, tl, blank=0, reduction="none", zero_infinity=False):
    return F.ctc_loss(
        lp.transpose(0, 1), targets, il, tl, blank=blank, reduction=reduction, zero_infinity=zero_infinity
    )


def brute_force(lp, targets, T, L, blank):
    """(loss, gamma [T, 2L+1], class occupancy [T, C]) of one utterance by enumerating all C^T label paths."""
    C = lp.shape[1]
    tok = targets[:L].tolist()
    z = 0.0
    gamma = torch.zeros(T, 2 * L + 1, dtype=torch.float64)
    occ = torch.zeros(T, C, dtype=torch.float64)
    for path in itertools.product(range(C), repeat=T):
        collapsed = [c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]
        if collapsed != tok:
            continue
        w = math.exp(sum(float(lp[t, c]) for t, c in enumerate(path)))
        z += w
        k = 0
        for t, c in enumerate(path):
            if c != blank and (t == 0 or c != path[t - 1]):
                k += 1
            gamma[t, 2 * k - 1 if c != blank else 2 * k] += w
            occ[t, c] += w
    if z == 0:
        return math.inf, gamma, occ
    return -math.log(z), gamma / z, occ / z


# ---- loss vs torch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("blank", [0, 4])
def test_loss_matches_torch_fp64(cpu_capability, reduction, zero_infinity, blank):
    lp, targets, il, tl = make_batch(6, 23, 7, 9, blank=blank)
    il[1], tl[1] = 3, 5  # infeasible: 3 frames for 5 tokens
    targets[2, :4] = targets[2, 0]  # three repeats: needs >= 7 frames for 4 tokens
    il[2], tl[2] = 6, 4  # infeasible through the repeats only
    ours = alignops.ctc_loss(lp, targets, il, tl, blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    theirs = torch_ctc(lp, targets, il, tl, blank, reduction, zero_infinity)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    per = alignops.ctc_loss(lp, targets, il, tl, blank=blank, reduction="none")
    assert torch.isinf(per[1]) and torch.isinf(per[2]) and torch.isfinite(per[[0, 3, 4, 5]]).all()


def test_gradient_through_log_softmax_matches_torch(cpu_capability):
    logits = torch.randn(5, 31, 11, dtype=torch.float64)
    _, targets, il, tl = make_batch(5, 31, 11, 12)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    alignops.ctc_loss(a.log_softmax(-1), targets, il, tl).backward()
    torch_ctc(b.log_softmax(-1), targets, il, tl, reduction="mean").backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)


def test_torch_layout_and_concatenated_targets():
    lp, targets, il, tl = make_batch(4, 17, 6, 5)
    flat = torch.cat([targets[b, : tl[b]] for b in range(4)])
    ours = alignops.ctc_loss(lp.transpose(0, 1), flat, il.tolist(), tl.tolist(), reduction="none", batch_first=False)
    torch.testing.assert_close(ours, torch_ctc(lp, targets, il, tl), rtol=1e-10, atol=1e-10)


# ---- occupancy and gradient vs brute force ----------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        # (T, C, blank, tokens)
        (6, 3, 0, [1, 2]),
        (6, 3, 0, [1, 1]),  # a repeat: a blank must separate them
        (5, 4, 2, [3, 0, 3]),  # blank != 0
        (4, 3, 0, []),  # empty target: all blank
        (3, 3, 1, [0, 0]),  # exactly feasible
    ],
)
def test_occupancy_and_gradient_vs_brute_force(cpu_capability, case):
    T, C, blank, tok = case
    L = len(tok)
    lp = torch.randn(1, T, C, dtype=torch.float64) * 2 + 0.7  # not normalised
    targets = torch.tensor([tok + [blank if blank != 0 else 1]], dtype=torch.long)[:, : max(L, 1)]
    il, tl = torch.tensor([T]), torch.tensor([L])
    loss_bf, gamma_bf, occ_bf = brute_force(lp[0], targets[0], T, L, blank)
    out = alignops.ctc.ctc_posteriors(lp, targets, il, tl, blank, output="both")
    torch.testing.assert_close(out.loss, torch.tensor([loss_bf], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    S = 2 * L + 1
    torch.testing.assert_close(out.states[0, :, :S], gamma_bf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tokens[0, :, :L], gamma_bf[:, 1::2], rtol=1e-12, atol=1e-12)
    x = lp.clone().requires_grad_()
    alignops.ctc_loss(x, targets, il, tl, blank, reduction="sum").backward()
    torch.testing.assert_close(x.grad[0], -occ_bf, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_matches_reference(cpu_capability, dtype):
    lp, targets, il, tl = make_batch(7, 41, 9, 13, normalised=False, dtype=dtype)
    out = alignops.ctc.ctc_posteriors(lp, targets, il, tl, output="both")
    r_loss, r_gamma = ref.forward_backward(lp, targets, il, tl)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    assert (
        out.loss.dtype
        == out.states.dtype
        == out.tokens.dtype
        == (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    torch.testing.assert_close(out.loss, r_loss.to(dtype), **tol)
    torch.testing.assert_close(out.states, r_gamma.to(dtype), **tol)
    torch.testing.assert_close(out.tokens, ref.token_occupancy(r_gamma).to(dtype), **tol)
    rows = out.states.double().sum(-1)
    frames = torch.arange(41)[None] < il[:, None]
    torch.testing.assert_close(rows[frames], torch.ones(int(frames.sum()), dtype=torch.float64), rtol=0, atol=1e-5)
    assert (rows[~frames] == 0).all()


@pytest.mark.parametrize("B", [1, 2])
def test_checkpointed_long_utterance_matches_reference(cpu_capability, B):
    # T * (2L+1) fp64 cells above the kernel's 64 MB full-alpha budget: alpha is checkpointed every
    # ceil(sqrt(T)) frames and recomputed block by block. B = 1 leaves a thread idle, so (with >= 2 threads)
    # alpha and beta run concurrently and each thread emits half of the blocks; B = 2 runs one utterance per
    # thread, each sweeping its blocks in turn.
    T, C, L = 3000, 12, 1400
    lp = (torch.randn(B, T, C, dtype=torch.float64) * 2).log_softmax(-1)
    targets = torch.randint(1, C, (B, L))
    il, tl = torch.tensor([T, T - 17])[:B], torch.tensor([L, L - 5])[:B]
    assert T * (2 * L + 5) * 8 > 64 << 20
    out = alignops.ctc.ctc_posteriors(lp, targets, il, tl, output="both")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's 6000 small steps crawl when intra-op threads contend for cores
    try:
        r_loss, r_gamma = ref.forward_backward(lp, targets, il, tl)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out.loss, r_loss, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(out.states, r_gamma, rtol=1e-9, atol=1e-9)
    x = lp.clone().requires_grad_()
    alignops.ctc_loss(x, targets, il, tl, reduction="sum").backward()
    torch.testing.assert_close(x.grad, -ref.class_occupancy(r_gamma, targets, tl, 0, C), rtol=1e-9, atol=1e-9)


def test_light_mode_equals_full(cpu_capability):
    lp, targets, il, tl = make_batch(3, 50, 8, 14)
    full = alignops.ctc.ctc_posteriors(lp, targets, il, tl, output="both")
    light = alignops.ctc.ctc_posteriors(lp, targets, il, tl, output="tokens")
    assert light.states is None and torch.equal(light.tokens, full.tokens) and torch.equal(light.loss, full.loss)


# ---- gradient -----------------------------------------------------------------------------------------


def test_gradcheck_unnormalised_scores():
    lp, targets, il, tl = make_batch(3, 9, 5, 3, normalised=False)
    x = lp.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: alignops.ctc_loss(x, targets, il, tl, reduction="none"), (x,))
    assert torch.autograd.gradcheck(lambda x: alignops.ctc_loss(x, targets, il, tl, reduction="mean"), (x,))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradient_matches_autograd_through_reference(cpu_capability, reduction):
    lp, targets, il, tl = make_batch(5, 30, 7, 10, normalised=False)
    lp[1, :, 3] -= 800.0  # scores ~800 nats apart within a frame: exp() of them underflows, log space does not
    g = torch.randn(5, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    la = alignops.ctc_loss(a, targets, il, tl, reduction=reduction)
    lb = ref.ctc_loss(b, targets, il, tl, reduction=reduction)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    la.backward(g)
    lb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_infeasible_and_masked_utterances_have_zero_gradient():
    lp, targets, il, tl = make_batch(3, 12, 5, 4, normalised=False)
    il[1], tl[1] = 2, 4
    lp[2, :, :] = float("-inf")  # every alignment has score -inf
    x = lp.clone().requires_grad_()
    loss = alignops.ctc_loss(x, targets, il, tl, reduction="none")
    assert torch.isinf(loss[1]) and torch.isinf(loss[2]) and torch.isfinite(loss[0])
    loss[0].backward()
    assert x.grad[1:].abs().sum() == 0 and x.grad[0].abs().sum() > 0
    x.grad = None
    alignops.ctc_loss(x, targets, il, tl, reduction="sum", zero_infinity=True).backward()
    assert torch.isfinite(x.grad).all() and x.grad[1:].abs().sum() == 0


# ---- accuracy at long T ---------------------------------------------------------------------------------


def test_rows_sum_to_one_at_T_100000_fp32_inputs():
    T, C, L = 100_000, 32, 500
    lp = torch.randn(1, T, C).log_softmax(-1)
    targets = torch.randint(1, C, (1, L))
    out = alignops.ctc.ctc_posteriors(lp, targets, [T], [L])
    assert out.states.dtype == torch.float32
    err = (out.states.double().sum(-1) - 1).abs().max().item()
    assert err < 1e-4, err
    # the loss agrees with torch's on the same fp32 scores computed in fp64
    exact = torch_ctc(lp.double(), targets, torch.tensor([T]), torch.tensor([L]))
    torch.testing.assert_close(out.loss.double(), exact, rtol=1e-6, atol=0)


# ---- dtypes, edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp64(cpu_capability, dtype):
    lp, targets, il, tl = make_batch(4, 60, 9, 20)
    low = lp.to(dtype)
    out = alignops.ctc.ctc_posteriors(low, targets.int(), il.int(), tl.int())
    exact_loss, exact_gamma = ref.forward_backward(low.double(), targets, il, tl)  # same rounded scores
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), exact_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.states.double(), exact_gamma, rtol=0, atol=1e-6)
    x = low.clone().requires_grad_()
    alignops.ctc_loss(x, targets, il, tl, reduction="sum").backward()
    assert x.grad.dtype == dtype
    occ = ref.class_occupancy(exact_gamma, targets, tl, 0, 9)
    torch.testing.assert_close(x.grad.double(), -occ, rtol=0, atol=1e-2)


def test_empty_batch_and_empty_targets():
    out = alignops.ctc.ctc_posteriors(torch.randn(0, 5, 4), torch.zeros(0, 3, dtype=torch.long), [], [], output="both")
    assert out.loss.shape == (0,) and out.states.shape == (0, 5, 7) and out.tokens.shape == (0, 5, 3)
    lp = torch.randn(2, 6, 4, dtype=torch.float64).log_softmax(-1)
    out = alignops.ctc.ctc_posteriors(lp, torch.zeros(2, 0, dtype=torch.long), [6, 0], [0, 0])
    torch.testing.assert_close(out.loss, torch.stack([-lp[0, :, 0].sum(), torch.tensor(0.0, dtype=torch.float64)]))
    assert torch.equal(out.states[0, :, 0], torch.ones(6, dtype=torch.float64))
    assert (out.states[1] == 0).all()


def test_backends_agree():
    lp, targets, il, tl = make_batch(3, 15, 6, 5)
    a = alignops.ctc.ctc_posteriors(lp, targets, il, tl, backend="native")
    b = alignops.ctc.ctc_posteriors(lp, targets, il, tl, backend="torch")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.states, b.states, rtol=1e-12, atol=1e-12)


# ---- custom-op machinery --------------------------------------------------------------------------------


def test_opcheck():
    lp, targets, il, tl = make_batch(3, 10, 5, 4, normalised=False)
    x = lp.clone().requires_grad_()
    torch.library.opcheck(torch.ops.alignops.ctc_posteriors.default, (x, targets, il, tl, 0, True, True, True))
    torch.library.opcheck(
        torch.ops.alignops.ctc_posteriors.default, (lp.float(), targets.int(), il, tl, 0, False, True, False)
    )


def test_compile_fullgraph():
    lp, targets, il, tl = make_batch(3, 12, 5, 4)
    fn = torch.compile(lambda x: alignops.ctc_loss(x, targets, il, tl), fullgraph=True, backend="aot_eager")
    x = lp.clone().requires_grad_()
    y = x.detach().clone().requires_grad_()
    fn(x).backward()
    alignops.ctc_loss(y, targets, il, tl).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_backward_needs_compute_grad():
    lp, targets, il, tl = make_batch(2, 8, 4, 3)
    x = lp.clone().requires_grad_()
    loss = torch.ops.alignops.ctc_posteriors(x, targets, il, tl, 0, False, False, False)[0]
    with pytest.raises(RuntimeError, match="called with compute_grad=False"):
        loss.sum().backward()


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_input_messages():
    lp, targets, il, tl = make_batch(2, 8, 5, 3)
    f = alignops.ctc.ctc_posteriors
    bad = targets.clone()
    bad[1, 0] = 0
    tl_full = torch.tensor([3, 3])
    with pytest.raises(
        ValueError,
        match=r"targets must be class ids in \[0, C = 5\) other than blank = 0, got 0 "
        r"at targets\[1, 0\]",
    ):
        f(lp, bad, il, tl_full)
    bad[1, 0] = 5
    with pytest.raises(ValueError, match=r"other than blank = 0, got 5 at targets\[1, 0\]"):
        f(lp, bad, il, tl_full)
    with pytest.raises(ValueError, match=r"input_lengths must lie in \[0, T = 8\], got 9 for utterance 1"):
        f(lp, targets, torch.tensor([8, 9]), tl)
    with pytest.raises(ValueError, match=r"target_lengths must lie in \[0, L = 3\], got 4 for utterance 0"):
        f(lp, targets, il, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"input_lengths must lie in \[0, T = 8\], got -1 for utterance 0"):
        f(lp, targets, torch.tensor([-1, 8]), tl)
    with pytest.raises(ValueError, match="log_probs must be float32, float64, float16 or bfloat16, got torch.int64"):
        f(lp.long(), targets, il, tl)
    with pytest.raises(ValueError, match="targets must be int64 or int32, got torch.float32"):
        f(lp, targets.float(), il, tl)
    with pytest.raises(ValueError, match="input_lengths must be int64 or int32, got torch.float32"):
        f(lp, targets, il.float(), tl)
    with pytest.raises(ValueError, match=r"log_probs must be a 3-D tensor of shape \[B, T, C\], got shape \[8, 5\]"):
        f(lp[0], targets, il, tl)
    with pytest.raises(ValueError, match=r"blank must lie in \[0, C = 5\), got 5"):
        f(lp, targets, il, tl, blank=5)
    with pytest.raises(ValueError, match=r"targets must have one row per utterance \(B = 2\), got 1"):
        f(lp, targets[:1], il, tl)
    with pytest.raises(ValueError, match=r"target_lengths must have one entry per utterance \(B = 2\), got 3"):
        f(lp, targets, il, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="output must be one of"):
        f(lp, targets, il, tl, output="alpha")
    with pytest.raises(ValueError, match="reduction must be one of"):
        alignops.ctc_loss(lp, targets, il, tl, reduction="avg")
    with pytest.raises(ValueError, match="concatenated 1-D targets need non-negative target_lengths summing to"):
        alignops.ctc_loss(lp, targets.flatten(), il, tl)


def test_raw_op_checks_in_cpp():
    lp, targets, il, tl = make_batch(2, 8, 5, 3)
    op = torch.ops.alignops.ctc_posteriors
    bad = targets.clone()
    bad[0, 0] = 0
    with pytest.raises(
        ValueError,
        match=r"targets must be class ids in \[0, C = 5\) other than blank = 0, got 0 "
        r"at targets\[0, 0\]",
    ):
        op(lp, bad, il, torch.tensor([3, 3]), 0, True, False, False)
    with pytest.raises(ValueError, match=r"input_lengths must lie in \[0, T = 8\], got 10 for utterance 0"):
        op(lp, targets, torch.tensor([10, 1]), tl, 0, True, False, False)
    with pytest.raises(ValueError, match=r"target_lengths must lie in \[0, L = 3\], got -2 for utterance 1"):
        op(lp, targets, il, torch.tensor([1, -2]), 0, True, False, False)
    with pytest.raises(ValueError, match="targets must be int64 or int32, got torch.float32"):
        op(lp, targets.float(), il, tl, 0, True, False, False)
    with pytest.raises(ValueError, match=r"blank must lie in \[0, C = 5\), got -1"):
        op(lp, targets, il, tl, -1, True, False, False)


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_nan_emission_gives_nan_loss_as_torch(backend):
    """A NaN score the alignments read made the row's loss inf, which zero_infinity turned into 0 (issue 13,
    item 5). torch's ctc_loss is the oracle: NaN for a NaN at a blank / target class within the input length,
    the loss unchanged for a NaN at a class the row never reads."""
    if backend == "triton":
        pytest.importorskip("triton")
    lp = torch.randn(3, 10, 5, dtype=torch.float64).log_softmax(-1)
    lp[0, 4, 2] = math.nan  # a target class of row 0
    lp[1, 3, 4] = math.nan  # class 4: not in row 1's targets, not blank
    lp[2, 9, 0] = math.nan  # blank, but past row 2's input length
    targets = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    il, tl = torch.tensor([10, 10, 9]), torch.tensor([3, 3, 3])
    for zero_infinity in (False, True):
        want = F.ctc_loss(lp.transpose(0, 1), targets, il, tl, reduction="none", zero_infinity=zero_infinity)
        got = alignops.ctc_loss(lp, targets, il, tl, reduction="none", zero_infinity=zero_infinity, backend=backend)
        assert torch.isnan(want[0]) and torch.isnan(got[0])
        torch.testing.assert_close(got[1:], want[1:].to(got.dtype), rtol=1e-10, atol=1e-10)
    post = alignops.ctc.ctc_posteriors(lp, targets, il, tl, backend=backend)
    assert torch.isnan(post.loss[0]) and torch.isfinite(post.loss[1:]).all()


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nan_emission_gives_nan_gradient_as_torch(backend, reduction):
    """The gradient of a row that reads a NaN was 0 (issue 13, item 5). torch's ctc_loss is the oracle: NaN
    at every class of the frames within the row's input length, 0 past it; rows that read no NaN keep their
    gradient. (A NaN at a class the row never reads is NaN in torch's logit gradient, which adds exp(log_probs);
    the exact gradient there is 0, so that row is only checked to stay finite.)"""
    if backend == "triton":
        pytest.importorskip("triton")
    lp = torch.randn(4, 10, 5, dtype=torch.float64).log_softmax(-1)
    lp[0, 4, 2] = math.nan  # a target class of row 0
    lp[1, 3, 4] = math.nan  # class 4: not in row 1's targets, not blank
    lp[2, 7, 0] = math.nan  # blank within row 2's input length (8)
    lp[3, 9, 1] = math.nan  # a target class past row 3's input length
    targets = torch.tensor([[1, 2, 3]] * 4)
    il, tl = torch.tensor([10, 10, 8, 9]), torch.tensor([3, 3, 3, 3])
    for zero_infinity in (False, True):
        x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        F.ctc_loss(
            x.transpose(0, 1), targets, il, tl, reduction=reduction, zero_infinity=zero_infinity
        ).sum().backward()
        alignops.ctc_loss(
            y, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity, backend=backend
        ).sum().backward()
        nan_rows = [0, 2]
        assert torch.equal(y.grad[nan_rows].isnan(), x.grad[nan_rows].isnan())
        assert y.grad[nan_rows].isnan().sum() == 10 * 5 + 8 * 5
        assert torch.isfinite(y.grad[[1, 3]]).all()
        # a row that reads no NaN: torch's logit gradient is ours (the score gradient) + exp(lp) * d total / d loss
        scale = 1 / (3 * 4) if reduction == "mean" else 1.0
        torch.testing.assert_close(y.grad[3, :9], x.grad[3, :9] - lp[3, :9].exp() * scale, rtol=1e-7, atol=1e-7)
        assert (y.grad[3, 9:] == 0).all()
    y = lp.clone().requires_grad_()
    alignops.ctc.ctc_posteriors(y, targets, il, tl, backend=backend).loss[1:].sum().backward()
    assert y.grad[0, :10].isnan().all() and y.grad[2, :8].isnan().all() and not y.grad[2, 8:].isnan().any()


def test_double_backward_is_refused_with_a_clear_message():
    lp = torch.randn(2, 10, 5, dtype=torch.float64).log_softmax(-1).requires_grad_()
    args = (torch.randint(1, 5, (2, 3)), torch.tensor([10, 10]), torch.tensor([3, 3]))
    (g,) = torch.autograd.grad(alignops.ctc_loss(lp, *args), lp, create_graph=True)
    (g1,) = torch.autograd.grad(alignops.ctc_loss(lp, *args), lp)
    assert torch.equal(g.detach(), g1)  # the first-order gradient is unchanged
    with pytest.raises(RuntimeError, match="ctc_loss / ctc_posteriors: double backward is not supported"):
        g.sum().backward()
