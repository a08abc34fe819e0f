"""The Triton ctc_posteriors op against the fp64 reference, torch.nn.functional.ctc_loss and the native CPU op.
Without a GPU it runs in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1);
shapes are tiny because the interpreter is slow. GPU-only tests (long T) are skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

import alignops
from alignops.reference import ctc_posteriors as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(B, T, C, L, blank=0, dtype=torch.float64, normalised=True):
    scores = torch.randn(B, T, C, dtype=torch.float64) * 2
    lp = scores.log_softmax(-1) if normalised else scores + 1.3
    others = torch.tensor([c for c in range(C) if c != blank])
    targets = others[torch.randint(0, C - 1, (B, L))]
    targets[0, 1] = targets[0, 0]  # a repeat
    input_lengths = torch.tensor([T, T - 3, 4, T][:B])
    target_lengths = torch.tensor([L, L - 2, 3, 0][:B])  # utterance 2: 4 frames, 3 tokens (infeasible if repeats)
    return lp.to(dtype).to(DEVICE), targets.to(DEVICE), input_lengths.to(DEVICE), target_lengths.to(DEVICE)


@pytest.mark.parametrize("blank", [0, 3])
def test_matches_reference_fp64(blank):
    # L = 10 gives 21 states: two 16-wide chunks in the interpreter
    lp, targets, il, tl = make_batch(4, 13, 5, 10, blank=blank, normalised=False)
    out = alignops.ctc.ctc_posteriors(lp, targets, il, tl, blank, output="both", backend="triton")
    r_loss, r_gamma = ref.forward_backward(lp.cpu(), targets.cpu(), il.cpu(), tl.cpu(), blank)
    torch.testing.assert_close(out.loss.cpu(), r_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.states.cpu(), r_gamma, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tokens.cpu(), r_gamma[..., 1::2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_loss_and_gradient_vs_torch_and_native(reduction):
    lp, targets, il, tl = make_batch(4, 12, 6, 5)
    x = lp.clone().requires_grad_()
    y = lp.detach().cpu().clone().requires_grad_()
    lx = alignops.ctc_loss(x, targets, il, tl, reduction=reduction, zero_infinity=True, backend="triton")
    ly = alignops.ctc_loss(
        y, targets.cpu(), il.cpu(), tl.cpu(), reduction=reduction, zero_infinity=True, backend="native"
    )
    theirs = F.ctc_loss(lp.transpose(0, 1), targets, il, tl, reduction=reduction, zero_infinity=True)
    torch.testing.assert_close(lx, theirs, rtol=1e-10, atol=1e-10)
    lx.sum().backward()
    ly.sum().backward()
    torch.testing.assert_close(x.grad.cpu(), y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    lp, targets, il, tl = make_batch(3, 10, 5, 4, dtype=dtype)
    out = alignops.ctc.ctc_posteriors(lp, targets.int(), il, tl, output="both", backend="triton")
    r_loss, r_gamma = ref.forward_backward(lp.double().cpu(), targets.cpu(), il.cpu(), tl.cpu())
    assert out.loss.dtype == out.states.dtype == torch.float32
    torch.testing.assert_close(out.loss.double().cpu(), r_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.states.double().cpu(), r_gamma, rtol=0, atol=1e-6)


# In the interpreter, wrap_triton hands back the plain interpreted kernel, so under FakeTensorMode it would run
# on fake tensors: the fake-tensor and AOT-dispatch checks need a GPU. On a GPU every check of opcheck runs.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def test_opcheck():
    lp, targets, il, tl = make_batch(2, 6, 4, 3)
    torch.library.opcheck(
        torch.ops.alignops.ctc_posteriors_triton.default,
        (lp.clone().requires_grad_(), targets, il, tl, 0, True, True, True),
        test_utils=OPCHECK_UTILS,
    )
    torch.library.opcheck(
        torch.ops.alignops.ctc_posteriors_triton.default,
        (lp.float(), targets, il, tl, 0, False, True, False),
        test_utils=OPCHECK_UTILS,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling the Triton op needs a GPU")
def test_compile_fullgraph_gpu():
    lp, targets, il, tl = make_batch(3, 12, 5, 4)
    fn = torch.compile(lambda x: alignops.ctc_loss(x, targets, il, tl, backend="triton"), fullgraph=True)
    x = lp.clone().requires_grad_()
    y = lp.clone().requires_grad_()
    fn(x).backward()
    alignops.ctc_loss(y, targets, il, tl, backend="triton").backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_bad_input():
    lp, targets, il, tl = make_batch(2, 6, 4, 3)
    with pytest.raises(ValueError, match=r"blank must lie in \[0, C = 4\), got 4"):
        torch.ops.alignops.ctc_posteriors_triton(lp, targets, il, tl, 4, True, False, False)
    with pytest.raises(ValueError, match=r"targets must be a 2-D tensor of shape \[B, L\] \(padded\)"):
        torch.ops.alignops.ctc_posteriors_triton(lp, targets[0], il, tl, 0, True, False, False)
    bad = targets.clone()
    bad[0, 0] = 0
    with pytest.raises(ValueError, match=r"other than blank = 0, got 0 at targets\[0, 0\]"):
        alignops.ctc.ctc_posteriors(lp, bad, il, tl, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="long utterance: GPU only")
def test_rows_sum_to_one_long_utterance_gpu():
    T, C, L = 100_000, 32, 500
    lp = torch.randn(1, T, C, device="cuda").log_softmax(-1)
    targets = torch.randint(1, C, (1, L), device="cuda")
    out = alignops.ctc.ctc_posteriors(lp, targets, [T], [L], backend="triton")
    err = (out.states.double().sum(-1) - 1).abs().max().item()
    assert err < 1e-4, err
    native = alignops.ctc.ctc_posteriors(lp.cpu(), targets.cpu(), [T], [L], output="tokens")
    torch.testing.assert_close(out.loss.cpu(), native.loss, rtol=1e-6, atol=0)
