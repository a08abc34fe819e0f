"""alignops.fused_linear_distillation_loss against the materialised reference, TRL 1.16's own chunked
divergence, Liger-Kernel's LigerFusedLinearJSDLoss; opcheck, gradcheck, torch.compile, bad input."""

import functools
import math

import pytest
import torch

import alignops
from alignops import AlignopsError
from alignops import fused_linear_distillation_loss as fld
from alignops.reference import distillation as ref

CASES = [
    ("jsd", 0.0),
    ("jsd", 1.0),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("tv", 0.5),
    ("skew_kl", 0.5),
    ("skew_reverse_kl", 0.5),
]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True, params=["1", None], ids=["rows1", "rows_default"])
def _blocks(request, monkeypatch):
    # Blocks of 3 kept rows on these small shapes: several blocks, the last one ragged.
    if request.param:
        monkeypatch.setenv("ALIGNOPS_DISTILLATION_ROWS", "3")


def _inputs(B=3, T=7, Hs=12, Ht=20, V=53, dtype=torch.float32, bias=False, scale=1.0):
    sh = (torch.randn(B, T, Hs, dtype=dtype) * scale).requires_grad_()
    sw = (torch.randn(V, Hs, dtype=dtype) / math.sqrt(Hs)).requires_grad_()
    th = torch.randn(B, T, Ht, dtype=dtype) * scale
    tw = torch.randn(V, Ht, dtype=dtype) / math.sqrt(Ht)
    mask = torch.rand(B, T) > 0.3
    mask[:1, :2] = False  # a prompt
    sb = torch.randn(V, dtype=dtype).requires_grad_() if bias else None
    tb = torch.randn(V, dtype=dtype) if bias else None
    return sh, sw, th, tw, mask, sb, tb


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(divergence, beta, dtype, bias):
    sh, sw, th, tw, mask, sb, tb = _inputs(dtype=dtype, bias=bias)
    kw = dict(divergence=divergence, beta=beta, skew=0.3, temperature=1.7, student_bias=sb, teacher_bias=tb)
    out = fld(sh, sw, th, tw, mask, **kw)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(out.loss, exp[0], rtol=tol, atol=tol)
    torch.testing.assert_close(out.per_token, exp[1].detach().view(3, 7), rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy, exp[2].view(3, 7), rtol=tol, atol=tol)
    assert int(out.num_tokens) == int(mask.sum())
    assert (out.per_token[~mask] == 0).all()
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(exp[0], (sh, sw, sb))):
        torch.testing.assert_close(g, e, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_into_grad_and_retain_graph_accumulates(reduction):
    # loss.backward() hands the op a gradient of exactly 1, so its backward returns the weight gradient it saved
    # without a product (ops/_closed_form_grad.py): .grad must equal the reference's, and the saved gradient must
    # stay unchanged under retain_graph (each further backward adds one more copy).
    sh, sw, th, tw, mask, sb, tb = _inputs(dtype=torch.float64, bias=True)
    kw = dict(divergence="jsd", beta=0.5, temperature=1.3, student_bias=sb, teacher_bias=tb, reduction=reduction)
    exp = _grads(ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)[0], (sh, sw, sb))
    loss = fld(sh, sw, th, tw, mask, **kw).loss
    for k in (1, 2, 3):
        loss.backward(retain_graph=k < 3)
        for t, e in zip((sh, sw, sb), exp):
            torch.testing.assert_close(t.grad, k * e, rtol=1e-10, atol=1e-10)
    # Without retain_graph the saved weight gradient becomes .grad itself (no [V, H] copy).
    sw.grad = None
    out = torch.ops.alignops.fused_linear_distillation(
        sh.detach().reshape(-1, 12), sw, th.reshape(-1, 20), tw, None, None, mask.reshape(-1).double(),
        "jsd", 0.5, 1.0, 1.0, 1.0, 0.0, 0.0, True,
    )  # fmt: skip
    ptr = out[4].data_ptr()
    out[0].backward()
    assert sw.grad.data_ptr() == ptr
    # Any other incoming gradient scales it.
    sw.grad = None
    out = fld(sh, sw, th, tw, mask, **kw)
    (2.5 * out.loss).backward()
    torch.testing.assert_close(sw.grad, 2.5 * exp[1], rtol=1e-10, atol=1e-10)


def test_softcap_logit_scale_num_items_sum():
    sh, sw, th, tw, mask, sb, tb = _inputs(dtype=torch.float64, bias=True, scale=3.0)
    kw = dict(
        beta=0.3,
        temperature=0.7,
        student_bias=sb,
        teacher_bias=tb,
        student_softcap=2.5,
        teacher_softcap=4.0,
        student_logit_scale=1.5,
        teacher_logit_scale=0.5,
        num_items_in_batch=40,
    )
    out = fld(sh, sw, th, tw, mask, **kw)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)
    torch.testing.assert_close(out.loss, exp[0])
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(exp[0], (sh, sw, sb))):
        torch.testing.assert_close(g, e)
    total = fld(sh, sw, th, tw, mask, beta=0.3, reduction="sum").loss
    per_token = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, beta=0.3)[1]
    torch.testing.assert_close(total, per_token.sum())


def test_masked_rows_do_not_matter_and_teacher_gets_no_grad():
    sh, sw, th, tw, mask, _, _ = _inputs()
    th.requires_grad_()
    sh2 = sh.detach().clone()
    sh2[~mask] = float("nan")  # dropped before any GEMM: NaN there cannot reach the loss or the weight's grad
    sh2.requires_grad_()
    a = fld(sh, sw, th, tw, mask)
    b = fld(sh2, sw, th, tw, mask)
    torch.testing.assert_close(a.loss, b.loss)
    ga = _grads(a.loss, (sh, sw))
    gb = _grads(b.loss, (sh2, sw))
    torch.testing.assert_close(ga[1], gb[1])
    assert (gb[0][~mask] == 0).all()
    assert torch.autograd.grad(b.loss, th, allow_unused=True)[0] is None


@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_skew_at_its_ends_and_long_rows_match_reference(divergence, skew, dtype):
    """skew 0 and 1 put log 0 = -inf into one side of the mixture's logaddexp; V = 1000 walks many vectors and a
    ragged last one (the epilogue pads it)."""
    sh, sw, th, tw, mask, sb, tb = _inputs(V=1000, dtype=dtype, bias=True)
    kw = dict(divergence=divergence, skew=skew, temperature=0.8, student_bias=sb, teacher_bias=tb)
    out = fld(sh, sw, th, tw, mask, **kw)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(out.loss, exp[0], rtol=tol, atol=tol)
    torch.testing.assert_close(out.per_token, exp[1].detach().view(3, 7), rtol=tol, atol=tol)
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(exp[0], (sh, sw, sb))):
        torch.testing.assert_close(g, e, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logit_in_a_kept_row_poisons_that_row_as_the_reference_does(bad):
    sh, sw, th, tw, mask, _, _ = _inputs()
    r = int(mask.view(-1).nonzero()[0])
    th.view(-1, th.shape[-1])[r, 0] = bad
    out = fld(sh, sw, th, tw, mask)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask)
    per_token, expected = out.per_token.view(-1), exp[1].detach().view(-1)
    assert torch.isnan(per_token[r]) and torch.isnan(expected[r]) and torch.isnan(out.loss)
    others = torch.arange(per_token.numel()) != r
    torch.testing.assert_close(per_token[others], expected[others], rtol=2e-5, atol=2e-5)


def test_empty_batch_and_all_masked():
    sh, sw, th, tw, mask, _, _ = _inputs(B=0)
    out = fld(sh, sw, th, tw, mask)
    assert out.loss.item() == 0 and out.per_token.shape == (0, 7)
    gh, gw = _grads(out.loss, (sh, sw))
    assert gh.shape == sh.shape and (gw == 0).all()
    sh, sw, th, tw, mask, _, _ = _inputs()
    out = fld(sh, sw, th, tw, torch.zeros_like(mask))
    assert out.loss.item() == 0 and int(out.num_tokens) == 0


def test_identical_models_give_zero():
    sh, sw, _, _, mask, _, _ = _inputs(Ht=12)
    for divergence, beta in CASES:
        out = fld(sh, sw, sh.detach(), sw.detach(), mask, divergence=divergence, beta=beta)
        assert abs(out.loss.item()) < 1e-6, divergence


def test_bf16_error_within_twice_torch_bf16():
    sh, sw, th, tw, mask, _, _ = _inputs(Hs=64, Ht=64, V=301)
    exact = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask)[0].detach()
    bf = [t.detach().bfloat16() for t in (sh, sw, th, tw)]
    ours = fld(*bf, mask).loss
    # The same materialised computation with bf16 logits, as a bf16 PyTorch user would write it.
    zs = (bf[0].reshape(-1, 64) @ bf[1].T).float()
    zt = (bf[2].reshape(-1, 64) @ bf[3].T).float()
    torch_bf16 = ref.per_token_divergence(zs, zt)[mask.reshape(-1)].mean()
    assert abs(ours.item() - exact.item()) <= 2 * abs(torch_bf16.item() - exact.item()) + 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_chunked_divergence(beta, temperature, import_peer):
    trl_distillation = import_peer("trl.trainer.distillation_trainer")
    sh, sw, th, tw, mask, sb, tb = _inputs(bias=True)
    loss_trl, entropy_sum, n_valid = trl_distillation._chunked_divergence_loss(
        sh, th, sw, tw, mask.long(), beta, student_lm_head_bias=sb, teacher_lm_head_bias=tb, temperature=temperature
    )
    out = fld(sh, sw, th, tw, mask, beta=beta, temperature=temperature, student_bias=sb, teacher_bias=tb)
    torch.testing.assert_close(out.loss, loss_trl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy.sum(), entropy_sum, rtol=1e-5, atol=1e-5)
    assert int(out.num_tokens) == int(n_valid)
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(loss_trl, (sh, sw, sb))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_matches_liger_jsd(beta):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    sh, sw, th, tw, mask, _, _ = _inputs(Ht=12)
    labels = torch.where(mask, 1, -100).reshape(-1)
    # Liger 0.x's beta is TRL's: 0 forward KL(teacher || student), 1 reverse KL, mixture (1 - beta) p_s + beta p_t
    # (older releases had it flipped). Its soft loss is the masked mean, as TRL's reduction.
    liger = chunked.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=2.0, compiled=False
    )
    expected = liger(sh.reshape(-1, 12), sw, th.reshape(-1, 12), tw, labels)
    out = fld(sh, sw, th, tw, mask, beta=beta, temperature=2.0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(_grads(out.loss, (sh, sw)), _grads(expected, (sh, sw))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def _op_args(compute_grad=True, bias=True):
    sh, sw, th, tw, mask, sb, tb = _inputs(B=1, T=5, Hs=4, Ht=6, V=11, dtype=torch.float64, bias=bias)
    # Without compute_grad the op has no gradient to give: its inputs do not require one.
    sw = sw if compute_grad else sw.detach()
    return (
        sh.detach().reshape(5, 4).requires_grad_(compute_grad),
        sw,
        th.reshape(5, 6),
        tw,
        sb,
        tb,
        mask.reshape(-1).double(),
        "jsd",
        0.4,
        1.3,
        1.0,
        1.0,
        0.0,
        0.0,
        compute_grad,
    )


@pytest.mark.parametrize("divergence", ["jsd", "tv"])
def test_opcheck(divergence):
    args = list(_op_args())
    args[7] = divergence
    torch.library.opcheck(torch.ops.alignops.fused_linear_distillation.default, tuple(args))
    torch.library.opcheck(torch.ops.alignops.fused_linear_distillation.default, _op_args(False, False))


@pytest.mark.parametrize("divergence,beta", CASES)
def test_gradcheck(divergence, beta):
    sh, sw, th, tw, mask, sb, tb = _inputs(B=1, T=4, Hs=3, Ht=5, V=7, dtype=torch.float64, bias=True)

    def f(h, w, b):
        return fld(
            h,
            w,
            th,
            tw,
            mask,
            divergence=divergence,
            beta=beta,
            skew=0.3,
            temperature=1.3,
            student_bias=b,
            teacher_bias=tb,
        ).loss

    assert torch.autograd.gradcheck(f, (sh, sw, sb))


def test_compile_fullgraph():
    sh, sw, th, tw, mask, _, _ = _inputs()
    compiled = torch.compile(lambda *a: fld(*a, beta=0.5).loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(sh, sw, th, tw, mask), fld(sh, sw, th, tw, mask).loss)
    # reduction="none" (its backward reruns the op) with the hard-label term: still one graph.
    targets = _targets(mask)
    kw = dict(reduction="none", hard_label_weight=0.3, targets=targets)
    compiled = torch.compile(lambda *a: fld(*a, **kw).loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(sh, sw, th, tw, mask), fld(sh, sw, th, tw, mask, **kw).loss)


def test_backend_torch_is_the_reference():
    sh, sw, th, tw, mask, _, _ = _inputs()
    torch.testing.assert_close(fld(sh, sw, th, tw, mask, backend="torch").loss, fld(sh, sw, th, tw, mask).loss)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_inputs(backend):
    # the op's checks run on both backends: one message per mistake
    sh, sw, th, tw, mask, _, _ = _inputs()
    fld = functools.partial(alignops.fused_linear_distillation_loss, backend=backend)
    with pytest.raises(AlignopsError, match="teacher_weight must have the vocabulary of student_weight"):
        fld(sh, sw, th, tw[:-1], mask)
    with pytest.raises(AlignopsError, match="student_weight must have shape \\[V, H\\] with H = 12"):
        fld(sh, sw[:, :-1], th, tw, mask)
    with pytest.raises(AlignopsError, match="teacher_hidden must be on the device of student_hidden"):
        fld(sh, sw, th.to("meta"), tw, mask)
    with pytest.raises(AlignopsError, match="completion_mask must be on the device of student_hidden"):
        fld(sh, sw, th, tw, mask.to("meta"))
    with pytest.raises(AlignopsError, match="beta must lie in \\[0, 1\\], got nan"):
        fld(sh, sw, th, tw, mask, beta=float("nan"))
    with pytest.raises(AlignopsError, match="beta must lie in \\[0, 1\\], got 1.5"):
        fld(sh, sw, th, tw, mask, beta=1.5)
    with pytest.raises(AlignopsError, match="skew must lie in \\[0, 1\\], got -0.1"):
        fld(sh, sw, th, tw, mask, divergence="skew_kl", skew=-0.1)
    with pytest.raises(AlignopsError, match="temperature must be a finite value > 0, got 0$"):
        fld(sh, sw, th, tw, mask, temperature=0.0)
    with pytest.raises(AlignopsError, match="temperature must be a finite value > 0, got nan"):
        fld(sh, sw, th, tw, mask, temperature=float("nan"))
    with pytest.raises(AlignopsError, match="divergence must be one of"):
        fld(sh, sw, th, tw, mask, divergence="kl")
    with pytest.raises(AlignopsError, match="teacher_hidden and completion_mask must have the token layout"):
        fld(sh, sw, th[:, :-1], tw, mask)
    with pytest.raises(AlignopsError, match="student_weight must have the dtype of student_hidden"):
        fld(sh, sw.double(), th, tw, mask)
    with pytest.raises(AlignopsError, match="student_softcap must be > 0 and finite"):
        fld(sh, sw, th, tw, mask, student_softcap=float("inf"))
    with pytest.raises(AlignopsError, match="teacher_logit_scale must be finite, got inf"):
        fld(sh, sw, th, tw, mask, teacher_logit_scale=float("inf"))
    with pytest.raises(AlignopsError, match=r"student_hidden must be a tensor of shape \[N, H\] or \[B, T, H\]"):
        fld(sh[None, None], sw, th, tw, mask)
    with pytest.raises(AlignopsError, match="student_bias must have shape \\[V\\]"):
        fld(sh, sw, th, tw, mask, student_bias=torch.zeros(sw.shape[0] + 1))


def test_op_bad_input():
    with pytest.raises(ValueError, match="beta must lie in \\[0, 1\\], got 2"):
        torch.ops.alignops.fused_linear_distillation(*_op_args()[:8], 2.0, *_op_args()[9:])


# ---- the Triton op (in the interpreter on CPU tensors; tiny shapes) -------------------------------------------


@pytest.fixture
def _triton_blocks(monkeypatch):
    import alignops.kernels.distillation as kernels

    monkeypatch.setattr(kernels, "BLOCK_ROWS", 2)  # several row blocks, the last one ragged


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.usefixtures("_triton_blocks")
@pytest.mark.triton
@pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package")
def test_triton_matches_reference(divergence, beta, dtype, softcap):
    sh, sw, th, tw, mask, sb, tb = _inputs(B=1, T=5, Hs=4, Ht=6, V=45, dtype=dtype, bias=True)
    kw = dict(
        divergence=divergence,
        beta=beta,
        skew=0.3,
        temperature=1.7,
        student_bias=sb,
        teacher_bias=tb,
        student_softcap=softcap,
        teacher_softcap=softcap,
    )
    out = fld(sh, sw, th, tw, mask, backend="triton", **kw)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(out.loss, exp[0], rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy.reshape(-1), exp[2], rtol=tol, atol=tol)
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(exp[0], (sh, sw, sb))):
        torch.testing.assert_close(g, e, rtol=10 * tol, atol=10 * tol)


@pytest.mark.usefixtures("_triton_blocks")
@pytest.mark.triton
@pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package")
def test_triton_opcheck_and_native_parity():
    args = _op_args()
    # In the interpreter the kernel would run on fake tensors: the fake-tensor and AOT checks need a GPU.
    utils = (
        ("test_schema", "test_autograd_registration")
        if not torch.cuda.is_available()
        else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    )
    torch.library.opcheck(torch.ops.alignops.fused_linear_distillation_triton.default, args, test_utils=utils)
    native = torch.ops.alignops.fused_linear_distillation(*args)
    triton_out = torch.ops.alignops.fused_linear_distillation_triton(*args)
    for a, b in zip(native, triton_out):
        torch.testing.assert_close(a, b)


# ---- hard labels, reduction="none" -----------------------------------------------------------------------------


def _targets(mask, V=53):
    t = torch.randint(0, V, mask.shape)
    t[~mask] = -100
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_hard_labels_and_reductions_match_reference(reduction, temperature):
    sh, sw, th, tw, mask, sb, tb = _inputs(dtype=torch.float64, bias=True)
    targets = _targets(mask)
    targets[2, 6] = -100  # a kept token without a label: divergence only
    kw = dict(
        beta=0.3,
        temperature=temperature,
        student_bias=sb,
        teacher_bias=tb,
        student_softcap=3.0,
        student_logit_scale=1.2,
        hard_label_weight=0.4,
        soft_label_weight=0.7,
        targets=targets,
        reduction=reduction,
    )
    out = fld(sh, sw, th, tw, mask, **kw)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)
    expected_loss = exp[0].view(3, 7) if reduction == "none" else exp[0]
    torch.testing.assert_close(out.loss, expected_loss)
    torch.testing.assert_close(out.per_token, exp[1].detach().view(3, 7))
    # A weighting of the per-token losses that is not uniform: the backward of reduction="none" must use it.
    w = torch.randn(3, 7, dtype=torch.float64) if reduction == "none" else 1.0
    for g, e in zip(_grads((out.loss * w).sum(), (sh, sw, sb)), _grads((expected_loss * w).sum(), (sh, sw, sb))):
        torch.testing.assert_close(g, e)


def test_reduction_none_sums_to_sum_and_is_zero_when_masked():
    sh, sw, th, tw, mask, _, _ = _inputs()
    none = fld(sh, sw, th, tw, mask, reduction="none", divergence="tv").loss
    assert none.shape == (3, 7) and (none[~mask] == 0).all()
    torch.testing.assert_close(none.sum(), fld(sh, sw, th, tw, mask, reduction="sum", divergence="tv").loss)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 1.0)])
def test_hard_labels_match_liger(weights):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    sh, sw, th, tw, mask, _, _ = _inputs(Ht=12)
    labels = _targets(mask)
    hard, soft = weights
    liger = chunked.LigerFusedLinearJSDLoss(
        weight_hard_loss=hard, weight_soft_loss=soft, beta=0.3, temperature=2.0, compiled=False
    )
    expected = liger(sh.reshape(-1, 12), sw, th.reshape(-1, 12), tw, labels.reshape(-1))
    out = fld(
        sh, sw, th, tw, mask, beta=0.3, temperature=2.0, hard_label_weight=hard, soft_label_weight=soft, targets=labels
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(_grads(out.loss, (sh, sw)), _grads(expected, (sh, sw))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_hard_label_bad_inputs():
    sh, sw, th, tw, mask, _, _ = _inputs()
    with pytest.raises(AlignopsError, match="hard_label_weight != 0 needs targets"):
        fld(sh, sw, th, tw, mask, hard_label_weight=0.5)
    with pytest.raises(AlignopsError, match="targets must be an int64 tensor in the token layout"):
        fld(sh, sw, th, tw, mask, hard_label_weight=0.5, targets=_targets(mask).int())
    with pytest.raises(AlignopsError, match="targets must be an int64 tensor in the token layout"):
        fld(sh, sw, th, tw, mask, hard_label_weight=0.5, targets=_targets(mask)[:, :-1])
    with pytest.raises(AlignopsError, match="hard_label_weight must be finite"):
        fld(sh, sw, th, tw, mask, hard_label_weight=float("inf"), targets=_targets(mask))
    with pytest.raises(AlignopsError, match="reduction must be one of"):
        fld(sh, sw, th, tw, mask, reduction="batchmean")


# ---- topk_distillation_loss -------------------------------------------------------------------------------------


def _topk_inputs(B=3, T=7, H=12, V=53, k=5, dtype=torch.float64, bias=True):
    sh, sw, _, _, mask, sb, _ = _inputs(B=B, T=T, Hs=H, V=V, dtype=dtype, bias=bias)
    teacher = torch.log_softmax(torch.randn(B, T, V, dtype=dtype) * 2, -1)
    values, ids = teacher.topk(k, -1)
    if B and T > 3:
        values[0, 3, k - 2 :] = float("-inf")  # padding entries (vLLM returned fewer than k)
        ids[0, 3, k - 2 :] = 0
    if B:
        values[~mask] = float("nan")  # masked tokens may hold anything
        ids[~mask] = -7
    return sh, sw, values, ids, mask, sb


@pytest.mark.parametrize("support", ["teacher", "tail", "renormalize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_topk_matches_reference(support, dtype, temperature):
    sh, sw, values, ids, mask, sb = _topk_inputs(dtype=dtype)
    targets = _targets(mask)
    kw = dict(
        support=support,
        temperature=temperature,
        student_bias=sb,
        student_softcap=4.0,
        student_logit_scale=1.3,
        hard_label_weight=0.3,
        targets=targets,
    )
    out = alignops.topk_distillation_loss(sh, sw, values, ids, mask, **kw)
    exp = ref.topk_distillation_loss(sh, sw, values, ids, mask, **kw)
    tol = TOL[dtype]
    assert torch.isfinite(exp[0])
    torch.testing.assert_close(out.loss, exp[0], rtol=tol, atol=tol)
    torch.testing.assert_close(out.per_token, exp[1].detach().view(3, 7), rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy, exp[2].view(3, 7), rtol=tol, atol=tol)
    assert int(out.num_tokens) == int(mask.sum()) and (out.per_token[~mask] == 0).all()
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(exp[0], (sh, sw, sb))):
        torch.testing.assert_close(g, e, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_topk_reductions_and_num_items(reduction):
    sh, sw, values, ids, mask, sb = _topk_inputs()
    kw = dict(student_bias=sb, reduction=reduction, num_items_in_batch=40)
    out = alignops.topk_distillation_loss(sh, sw, values, ids, mask, **kw)
    exp = ref.topk_distillation_loss(sh, sw, values, ids, mask, **kw)[0]
    exp = exp.view(3, 7) if reduction == "none" else exp
    torch.testing.assert_close(out.loss, exp)
    w = torch.randn(3, 7, dtype=torch.float64) if reduction == "none" else 1.0
    for g, e in zip(_grads((out.loss * w).sum(), (sh, sw, sb)), _grads((exp * w).sum(), (sh, sw, sb))):
        torch.testing.assert_close(g, e)
    mean = alignops.topk_distillation_loss(sh, sw, values, ids, mask, student_bias=sb, num_items_in_batch=40).loss
    torch.testing.assert_close(
        mean, ref.topk_distillation_loss(sh, sw, values, ids, mask, student_bias=sb)[1].sum() / 40
    )


def test_topk_of_the_whole_vocabulary_is_the_forward_kl():
    # k = V: the teacher's top-k is its whole distribution, so every support is fused_linear_distillation_loss's
    # forward KL (beta = 0) with the teacher head that produced the log-probs (an independent implementation).
    sh, sw, th, tw, mask, _, _ = _inputs(dtype=torch.float64, Ht=20)
    temperature = 1.5
    teacher = torch.log_softmax(ref.logits(th.reshape(-1, 20), tw, temperature=temperature), -1).view(3, 7, 53)
    values, ids = teacher.topk(53, -1)
    full = fld(sh, sw, th, tw, mask, beta=0.0, temperature=temperature)
    full_grads = _grads(full.loss, (sh, sw))
    for support in ("teacher", "tail", "renormalize"):
        out = alignops.topk_distillation_loss(sh, sw, values, ids, mask, temperature=temperature, support=support)
        torch.testing.assert_close(out.loss, full.loss, rtol=1e-6, atol=1e-6)
        for g, e in zip(_grads(out.loss, (sh, sw)), full_grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def _trl_server_forward_kl(trainer_cls, add_tail, teacher_values, teacher_ids, student_log_probs, labels):
    # TRL's own method, on a stand-in trainer holding the only attributes it reads.
    from types import SimpleNamespace

    stand_in = SimpleNamespace(loss_add_tail=add_tail, _reduce_divergence_loss=trainer_cls._reduce_divergence_loss)
    return trainer_cls._compute_server_forward_kl_loss(
        stand_in, {"topk_logprobs": teacher_values, "topk_token_ids": teacher_ids}, student_log_probs, labels
    )


@pytest.mark.parametrize("support,add_tail", [("tail", True), ("renormalize", False)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_trl_server_distillation(support, add_tail, temperature, import_peer):
    server = import_peer("trl.experimental.server_distillation.server_distillation_trainer")
    sh, sw, values, ids, mask, sb = _topk_inputs(dtype=torch.float32)
    # TRL's layout: padding is -inf with id 0, every token carries a top-k (the labels say which count).
    values = torch.where(torch.isnan(values), torch.full_like(values, -1.0), values)
    ids = ids.clamp(min=0)
    labels = _targets(mask)
    logits = ref.logits(sh.reshape(-1, 12), sw, sb, temperature=temperature).view(3, 7, 53)
    expected = _trl_server_forward_kl(
        server.ServerDistillationTrainer, add_tail, values, ids, torch.log_softmax(logits, -1), labels
    )
    out = alignops.topk_distillation_loss(
        sh, sw, values, ids, mask, temperature=temperature, support=support, student_bias=sb
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(expected, (sh, sw, sb))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("support", ["teacher", "tail", "renormalize"])
def test_topk_gradcheck(support):
    sh, sw, values, ids, mask, sb = _topk_inputs(B=1, T=5, H=3, V=9, k=3)
    targets = _targets(mask, V=9)

    def f(h, w, b):
        return alignops.topk_distillation_loss(
            h,
            w,
            values,
            ids,
            mask,
            support=support,
            temperature=1.3,
            student_bias=b,
            student_softcap=2.0,
            hard_label_weight=0.5,
            targets=targets,
        ).loss

    assert torch.autograd.gradcheck(f, (sh, sw, sb))


def test_topk_identical_teacher_gives_zero_and_teacher_gets_no_grad():
    sh, sw, _, _, mask, _, _ = _inputs(dtype=torch.float64)
    teacher = torch.log_softmax(ref.logits(sh.detach().reshape(-1, 12), sw.detach()), -1).view(3, 7, 53)
    values, ids = teacher.topk(53, -1)
    values.requires_grad_()
    out = alignops.topk_distillation_loss(sh, sw, values, ids, mask)
    assert abs(out.loss.item()) < 1e-12
    assert torch.autograd.grad(out.loss, [sh, values], allow_unused=True)[1] is None


def test_topk_empty_and_all_masked():
    sh, sw, values, ids, mask, _ = _topk_inputs(B=0)
    out = alignops.topk_distillation_loss(sh, sw, values, ids, mask)
    assert out.loss.item() == 0 and out.per_token.shape == (0, 7)
    gh, gw = _grads(out.loss, (sh, sw))
    assert gh.shape == sh.shape and (gw == 0).all()
    sh, sw, values, ids, mask, _ = _topk_inputs()
    out = alignops.topk_distillation_loss(sh, sw, values, ids, torch.zeros_like(mask))
    assert out.loss.item() == 0 and int(out.num_tokens) == 0


def test_topk_bad_inputs():
    sh, sw, values, ids, mask, _ = _topk_inputs()
    tk = alignops.topk_distillation_loss
    with pytest.raises(AlignopsError, match="teacher_topk_logprobs and teacher_topk_ids must both have shape"):
        tk(sh, sw, values[..., :-1], ids, mask)
    with pytest.raises(AlignopsError, match="teacher_topk_logprobs and teacher_topk_ids must both have shape"):
        tk(sh, sw, values[:, :-1], ids[:, :-1], mask)
    with pytest.raises(AlignopsError, match="teacher_topk_ids must be int64"):
        tk(sh, sw, values, ids.int(), mask)
    bad = ids.clone()
    bad[mask] = 53
    with pytest.raises(AlignopsError, match="teacher_topk_ids must lie in \\[0, V\\) = \\[0, 53\\)"):
        tk(sh, sw, values, bad, mask)
    with pytest.raises(AlignopsError, match="support must be one of"):
        tk(sh, sw, values, ids, mask, support="both")
    with pytest.raises(AlignopsError, match="completion_mask must have the token layout"):
        tk(sh, sw, values, ids, mask[:, :-1])
    with pytest.raises(AlignopsError, match="teacher_topk_ids must be on the device of student_hidden"):
        tk(sh, sw, values, ids.to("meta"), mask)
    with pytest.raises(AlignopsError, match="temperature must be a finite value > 0"):
        tk(sh, sw, values, ids, mask, temperature=-1.0)
    with pytest.raises(AlignopsError, match="hard_label_weight != 0 needs targets"):
        tk(sh, sw, values, ids, mask, hard_label_weight=1.0)
    targets = _targets(mask)
    targets[mask] = 99
    with pytest.raises(AlignopsError, match="targets must lie in \\[0, V\\)"):
        tk(sh, sw, values, ids, mask, hard_label_weight=1.0, targets=targets)


def test_topk_backend_torch_is_the_reference():
    sh, sw, values, ids, mask, sb = _topk_inputs()
    a = alignops.topk_distillation_loss(sh, sw, values, ids, mask, student_bias=sb, backend="torch").loss
    b = alignops.topk_distillation_loss(sh, sw, values, ids, mask, student_bias=sb).loss
    torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("_triton_blocks")
@pytest.mark.triton
@pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package")
def test_triton_hard_labels_reduction_none_and_topk():
    sh, sw, th, tw, mask, sb, tb = _inputs(B=1, T=5, Hs=4, Ht=6, V=45, dtype=torch.float64, bias=True)
    targets = _targets(mask, V=45)
    kw = dict(beta=0.4, student_bias=sb, teacher_bias=tb, hard_label_weight=0.5, targets=targets, reduction="none")
    out = fld(sh, sw, th, tw, mask, backend="triton", **kw)
    exp = ref.fused_linear_distillation_loss(sh, sw, th, tw, mask, **kw)[0].view(1, 5)
    torch.testing.assert_close(out.loss, exp)
    w = torch.randn(1, 5, dtype=torch.float64)
    for g, e in zip(_grads((out.loss * w).sum(), (sh, sw, sb)), _grads((exp * w).sum(), (sh, sw, sb))):
        torch.testing.assert_close(g, e)
    sh, sw, values, ids, mask, sb = _topk_inputs(B=1, T=5, H=4, V=45, k=3)
    kw = dict(student_bias=sb, temperature=1.5, support="tail")
    out = alignops.topk_distillation_loss(sh, sw, values, ids, mask, backend="triton", **kw)
    exp = ref.topk_distillation_loss(sh, sw, values, ids, mask, **kw)[0]
    torch.testing.assert_close(out.loss, exp)
    for g, e in zip(_grads(out.loss, (sh, sw, sb)), _grads(exp, (sh, sw, sb))):
        torch.testing.assert_close(g, e)
