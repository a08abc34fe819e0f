"""alignops.adpa_loss / dckd_loss: against the materialised reference (fp64), against closed forms written
independently here (the released code's formulas with torch.nn.functional, KL(p_d || p_r), the policy-gradient
identity), gradcheck, opcheck, torch.compile, masked rows, the empty batch, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

import alignops
from alignops import AlignopsError, adpa_loss, dckd_loss
from alignops.reference import adpa as ref

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True, params=["small", None], ids=["rows3", "rows_default"])
def _blocks(request, monkeypatch):
    # Blocks of 3 kept rows on these small shapes: several blocks, the last one ragged.
    if request.param:
        monkeypatch.setenv("ALIGNOPS_ADPA_ROWS", "3")


def _inputs(B=3, T=7, Hs=12, Ht=20, Hr=16, V=53, dtype=torch.float32, bias=False):
    sh = torch.randn(B, T, Hs, dtype=dtype).requires_grad_()
    sw = (torch.randn(V, Hs, dtype=dtype) / math.sqrt(Hs)).requires_grad_()
    th = torch.randn(B, T, Ht, dtype=dtype)
    tw = torch.randn(V, Ht, dtype=dtype) / math.sqrt(Ht)
    rh = torch.randn(B, T, Hr, dtype=dtype)
    rw = torch.randn(V, Hr, dtype=dtype) / math.sqrt(Hr)
    mask = torch.rand(B, T) > 0.3
    mask[:1, :2] = False  # a prompt
    sb = torch.randn(V, dtype=dtype).requires_grad_() if bias else None
    tb = torch.randn(V, dtype=dtype) if bias else None
    rb = torch.randn(V, dtype=dtype) if bias else None
    return sh, sw, th, tw, rh, rw, mask, sb, tb, rb


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _call(args, **kw):
    sh, sw, th, tw, rh, rw, mask, sb, tb, rb = args
    return adpa_loss(sh, sw, th, tw, rh, rw, mask, student_bias=sb, teacher_bias=tb, ref_bias=rb, **kw)


def _ref(args, **kw):
    sh, sw, th, tw, rh, rw, mask, sb, tb, rb = args
    return ref.adpa_loss(sh, sw, th, tw, rh, rw, mask, student_bias=sb, teacher_bias=tb, ref_bias=rb, **kw)


# ---- ADPA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("clip", [None, (-0.5, 0.75), (1e-8, 1 - 1e-8)])
def test_adpa_matches_reference(dtype, bias, clip):
    args = _inputs(dtype=dtype, bias=bias)
    out = _call(args, advantage_clip=clip)
    exp_loss, exp_e, exp_count = _ref(args, advantage_clip=clip)
    tol = TOL[dtype]
    torch.testing.assert_close(out.loss, exp_loss, rtol=tol, atol=tol)
    mask = args[6].reshape(-1)
    torch.testing.assert_close(out.expected_advantage.reshape(-1)[mask], exp_e[mask].detach(), rtol=tol, atol=tol)
    assert (out.expected_advantage.reshape(-1)[~mask] == 0).all()
    assert int(out.num_tokens) == int(exp_count) == int(mask.sum())
    trained = (args[0], args[1], args[7])
    for g, e in zip(_grads(out.loss, trained), _grads(exp_loss, trained)):
        torch.testing.assert_close(g, e, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_adpa_backward_into_grad_and_retain_graph_accumulates(reduction):
    # loss.backward() hands the op a gradient of exactly 1, so its backward returns the weight gradient it saved
    # without a product (ops/_closed_form_grad.py): .grad must equal the reference's, and the saved gradient must
    # stay unchanged under retain_graph (each further backward adds one more copy).
    args = _inputs(dtype=torch.float64, bias=True)
    sh, sw, sb = args[0], args[1], args[7]
    exp = _grads(_ref(args, reduction=reduction)[0], (sh, sw, sb))
    loss = _call(args, reduction=reduction).loss
    for k in (1, 2, 3):
        loss.backward(retain_graph=k < 3)
        for t, e in zip((sh, sw, sb), exp):
            torch.testing.assert_close(t.grad, k * e, rtol=1e-10, atol=1e-10)
    sw.grad = None
    (2.5 * _call(args, reduction=reduction).loss).backward()
    torch.testing.assert_close(sw.grad, 2.5 * exp[1], rtol=1e-10, atol=1e-10)


def test_adpa_released_code_formula():
    """The released code's loss written out with F (its get_reverse_ce on log(p_dpo / p_ref), full vocabulary)."""
    args = _inputs(dtype=torch.float64)
    sh, sw, th, tw, rh, rw, mask = args[:7]
    zs = sh @ sw.T
    margin = torch.log(F.softmax(th @ tw.T, -1) / F.softmax(rh @ rw.T, -1))
    probs = F.softmax(zs, -1)
    expected = -(probs[mask] * margin[mask]).sum(-1).mean()
    out = _call(args)
    torch.testing.assert_close(out.loss, expected)
    for g, e in zip(_grads(out.loss, (sh, sw)), _grads(expected, (sh, sw))):
        torch.testing.assert_close(g, e)


def test_adpa_student_equal_to_teacher_gives_kl_teacher_ref():
    """p_s = p_d: E = sum p_d log(p_d / p_r) = KL(p_d || p_r) per token."""
    sh, sw, _, _, rh, rw, mask, *_ = _inputs(dtype=torch.float64)
    out = adpa_loss(sh, sw, sh.detach(), sw.detach(), rh, rw, mask)
    log_pd = F.log_softmax(sh.detach() @ sw.detach().T, -1)
    kl = F.kl_div(F.log_softmax(rh @ rw.T, -1), log_pd, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(out.expected_advantage[mask], kl[mask])
    torch.testing.assert_close(out.loss, -kl[mask].mean())


def test_adpa_policy_gradient_identity():
    """d loss / d z_s = -p_s (A - E) / count: the loss through the student's logits as a leaf."""
    sh, sw, th, tw, rh, rw, mask, *_ = _inputs(dtype=torch.float64, Hs=53)
    eye = torch.eye(53, dtype=torch.float64)  # student_weight = I: the student's hidden states are its logits
    z = sh.detach().requires_grad_()
    out = adpa_loss(z, eye, th, tw, rh, rw, mask)
    (g,) = torch.autograd.grad(out.loss, z)
    p = torch.softmax(z.detach(), -1)
    adv = torch.log_softmax(th @ tw.T, -1) - torch.log_softmax(rh @ rw.T, -1)
    e = (p * adv).sum(-1, keepdim=True)
    expected = -p * (adv - e) * mask[..., None] / mask.sum()
    torch.testing.assert_close(g, expected)


def test_adpa_teacher_equal_to_ref_gives_zero():
    sh, sw, th, tw, _, _, mask, *_ = _inputs()
    out = adpa_loss(sh, sw, th, tw, th, tw, mask)
    assert abs(out.loss.item()) < 1e-6
    assert all(g.abs().max() < 1e-6 for g in _grads(out.loss, (sh, sw)))


def test_adpa_reductions():
    args = _inputs(dtype=torch.float64)
    for kw in (dict(reduction="sum"), dict(num_items_in_batch=5), dict(num_items_in_batch=torch.tensor(5.0))):
        torch.testing.assert_close(_call(args, **kw).loss, _ref(args, **kw)[0])


def test_adpa_masked_rows_do_not_matter_and_teachers_get_no_grad():
    sh, sw, th, tw, rh, rw, mask, *_ = _inputs()
    th.requires_grad_()
    rw.requires_grad_()
    a = adpa_loss(sh, sw, th, tw, rh, rw, mask)
    sh2 = torch.where(mask[..., None], sh.detach(), torch.randn_like(sh) * 100).requires_grad_()
    b = adpa_loss(sh2, sw, th, tw, rh, rw, mask)
    torch.testing.assert_close(a.loss, b.loss)
    gb = _grads(b.loss, (sh2, sw))
    torch.testing.assert_close(_grads(a.loss, (sw,))[0], gb[1])
    assert (gb[0][~mask] == 0).all()
    assert torch.autograd.grad(b.loss, [th, rw], allow_unused=True) == (None, None)


def test_adpa_every_row_path(monkeypatch):
    """The GPU's path (every row computed and weighted, no host sync), run on the CPU."""
    import alignops.ops.adpa as op_module

    args = _inputs(dtype=torch.float64, bias=True)
    dropped = _call(args, advantage_clip=(-0.5, 0.5))
    monkeypatch.setattr(op_module, "DROP_MASKED_ROWS_ON", ())
    every = _call(args, advantage_clip=(-0.5, 0.5))
    exp = _ref(args, advantage_clip=(-0.5, 0.5))[0]
    torch.testing.assert_close(every.loss, exp)
    torch.testing.assert_close(every.expected_advantage, dropped.expected_advantage)
    trained = (args[0], args[1], args[7])
    for g, d, e in zip(_grads(every.loss, trained), _grads(dropped.loss, trained), _grads(exp, trained)):
        torch.testing.assert_close(g, e)
        torch.testing.assert_close(g, d)


def test_adpa_empty_batch_and_all_masked():
    args = _inputs(B=0)
    out = _call(args)
    assert out.loss.item() == 0 and out.expected_advantage.shape == (0, 7) and int(out.num_tokens) == 0
    gh, gw = _grads(out.loss, args[:2])
    assert gh.shape == args[0].shape and (gw == 0).all()
    args = _inputs()
    args = (*args[:6], torch.zeros_like(args[6]), *args[7:])
    out = _call(args)
    assert out.loss.item() == 0 and int(out.num_tokens) == 0
    assert all((g == 0).all() for g in _grads(out.loss, args[:2]))


def test_adpa_flat_layout_and_no_grad():
    args = _inputs(dtype=torch.float64)
    flat = [t.reshape(-1, t.shape[-1]) if t is not None and t.dim() == 3 else t for t in args]
    flat[6] = args[6].reshape(-1)
    torch.testing.assert_close(_call(flat).loss, _call(args).loss)
    with torch.no_grad():
        out = _call(args)
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss, _ref(args)[0].detach())


def test_adpa_bf16_error_within_twice_torch_bf16():
    args = _inputs(Hs=64, Ht=64, Hr=64, V=301)
    exact = _ref(args)[0].detach()
    bf = [t.detach().bfloat16() for t in args[:6]]
    ours = adpa_loss(*bf, args[6]).loss
    # The same materialised computation with bf16 logits, as a bf16 PyTorch user would write it.
    zs, zd, zr = ((bf[i].reshape(-1, 64) @ bf[i + 1].T).float() for i in (0, 2, 4))
    torch_bf16 = -ref.expected_advantage(zs, zd, zr)[args[6].reshape(-1)].mean()
    assert abs(ours.item() - exact.item()) <= 2 * abs(torch_bf16.item() - exact.item()) + 1e-3


def _op_args(compute_grad=True, bias=True, clip=(float("-inf"), float("inf"))):
    sh, sw, th, tw, rh, rw, mask, sb, tb, rb = _inputs(B=1, T=5, Hs=4, Ht=6, Hr=3, V=11, dtype=torch.float64, bias=bias)
    # Without compute_grad the op has no gradient to give: its inputs do not require one.
    return (
        sh.detach().reshape(5, 4).requires_grad_(compute_grad),
        sw if compute_grad else sw.detach(),
        th.reshape(5, 6),
        tw,
        rh.reshape(5, 3),
        rw,
        sb if compute_grad or sb is None else sb.detach(),
        tb,
        rb,
        mask.reshape(-1).double(),
        *clip,
        compute_grad,
    )


def test_opcheck():
    op = torch.ops.alignops.fused_linear_adpa.default
    torch.library.opcheck(op, _op_args())
    torch.library.opcheck(op, _op_args(clip=(-0.3, 0.4)))
    torch.library.opcheck(op, _op_args(False, False))


@pytest.mark.parametrize("clip", [None, (-0.4, 0.6)])
def test_gradcheck(clip):
    sh, sw, th, tw, rh, rw, mask, sb, tb, rb = _inputs(B=1, T=4, Hs=3, Ht=5, Hr=2, V=9, dtype=torch.float64, bias=True)

    def f(h, w, b):
        return adpa_loss(
            h, w, th, tw, rh, rw, mask, student_bias=b, teacher_bias=tb, ref_bias=rb, advantage_clip=clip
        ).loss

    assert torch.autograd.gradcheck(f, (sh, sw, sb))


def test_compile_fullgraph():
    args = _inputs()
    compiled = torch.compile(lambda *a: adpa_loss(*a).loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args[:7]), _call(args).loss)


def test_meta_device_gives_shapes():
    args = [t.detach().to("meta") if t is not None else None for t in _inputs()]
    out = _call(args)
    assert out.loss.device.type == "meta" and out.expected_advantage.shape == (3, 7)


def test_backend_torch_is_the_reference():
    args = _inputs()
    torch.testing.assert_close(_call(args, backend="torch").loss, _call(args).loss)


@pytest.mark.triton
@pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package")
def test_backend_triton_refused():
    with pytest.raises(RuntimeError, match="adpa_loss has no Triton kernel"):
        _call(_inputs(), backend="triton")


def test_adpa_bad_inputs():
    sh, sw, th, tw, rh, rw, mask, *_ = _inputs()
    with pytest.raises(AlignopsError, match="ref_weight must have the vocabulary of student_weight"):
        adpa_loss(sh, sw, th, tw, rh, rw[:-1], mask)
    with pytest.raises(AlignopsError, match="teacher_weight must have the vocabulary of student_weight"):
        adpa_loss(sh, sw, th, tw[:-1], rh, rw, mask)
    with pytest.raises(AlignopsError, match="ref_weight must have shape \\[V, H\\] with H = 16"):
        adpa_loss(sh, sw, th, tw, rh, rw[:, :-1], mask)
    with pytest.raises(AlignopsError, match="ref_weight must have the dtype of ref_hidden"):
        adpa_loss(sh, sw, th, tw, rh, rw.double(), mask)
    with pytest.raises(AlignopsError, match="ref_hidden must be on the device of student_hidden"):
        adpa_loss(sh, sw, th, tw, rh.to("meta"), rw, mask)
    with pytest.raises(AlignopsError, match="completion_mask must be on the device of student_hidden"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask.to("meta"))
    with pytest.raises(AlignopsError, match="ref_hidden's leading dimensions must have the token layout"):
        adpa_loss(sh, sw, th, tw, rh[:, :-1], rw, mask)
    with pytest.raises(AlignopsError, match="completion_mask must have the token layout of student_hidden"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask[:, :-1])
    with pytest.raises(AlignopsError, match="advantage_clip must be \\(lo, hi\\) with lo <= hi"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask, advantage_clip=(1.0, -1.0))
    with pytest.raises(AlignopsError, match="advantage_clip must be \\(lo, hi\\) with lo <= hi and no NaN"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask, advantage_clip=(float("nan"), 1.0))
    with pytest.raises(AlignopsError, match="advantage_clip must be a pair"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask, advantage_clip=(1.0,))
    with pytest.raises(AlignopsError, match="reduction must be one of"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask, reduction="none")
    with pytest.raises(AlignopsError, match="backend must be one of"):
        adpa_loss(sh, sw, th, tw, rh, rw, mask, backend="cuda")


# ---- DCKD ---------------------------------------------------------------------------------------------------


def _pair(dtype=torch.float64, bias=False):
    sh, sw, th, tw, _, _, mask, sb, tb, _ = _inputs(dtype=dtype, bias=bias)
    chosen = torch.zeros_like(mask)
    chosen[:2] = mask[:2]  # rows 0-1 the chosen responses, row 2 the rejected one
    rejected = mask & ~chosen
    return sh, sw, th, tw, chosen, rejected, sb, tb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_dckd_matches_reference(dtype, bias, backend):
    sh, sw, th, tw, chosen, rejected, sb, tb = _pair(dtype, bias)
    kw = dict(chosen_weight=0.7, rejected_weight=0.2, student_bias=sb, teacher_bias=tb)
    out = dckd_loss(sh, sw, th, tw, chosen, rejected, backend=backend, **kw)
    exp = ref.dckd_loss(sh, sw, th, tw, chosen, rejected, **kw)
    tol = TOL[dtype]
    for got, want in zip(out[:3], exp[:3]):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
    assert (int(out.num_chosen), int(out.num_rejected)) == (int(chosen.sum()), int(rejected.sum()))
    trained = (sh, sw, sb)
    for g, e in zip(_grads(out.loss, trained), _grads(exp[0], trained)):
        torch.testing.assert_close(g, e, rtol=10 * tol, atol=10 * tol)


def test_dckd_released_code_formula():
    """The released code's get_kl_loss (F.kl_div(log p_s, p_t) summed over V, mean over the masked tokens) on the
    chosen and on the rejected tokens, without its top-k compression and 1e-7 floor."""
    sh, sw, th, tw, chosen, rejected, *_ = _pair()
    log_ps = F.log_softmax(sh @ sw.T, -1)
    pt = F.softmax(th @ tw.T, -1)
    kl = F.kl_div(log_ps, pt, reduction="none").sum(-1)
    expected = 1.5 * kl[chosen].mean() + 0.5 * kl[rejected].mean()
    out = dckd_loss(sh, sw, th, tw, chosen, rejected, chosen_weight=1.5, rejected_weight=0.5)
    torch.testing.assert_close(out.loss, expected)
    for g, e in zip(_grads(out.loss, (sh, sw)), _grads(expected, (sh, sw))):
        torch.testing.assert_close(g, e)


def test_dckd_empty_sides():
    sh, sw, th, tw, chosen, rejected, *_ = _pair()
    none = torch.zeros_like(chosen)
    out = dckd_loss(sh, sw, th, tw, chosen, none)
    assert out.rejected_kl.item() == 0 and int(out.num_rejected) == 0
    torch.testing.assert_close(out.loss, out.chosen_kl)
    out = dckd_loss(sh[:0], sw, th[:0], tw, chosen[:0], rejected[:0])
    assert out.loss.item() == 0
    assert (_grads(out.loss, (sw,))[0] == 0).all()


def test_dckd_bad_inputs():
    sh, sw, th, tw, chosen, rejected, *_ = _pair()
    with pytest.raises(AlignopsError, match="rejected_mask must have the token layout of student_hidden"):
        dckd_loss(sh, sw, th, tw, chosen, rejected[:, :-1])
    with pytest.raises(AlignopsError, match="chosen_mask must be on the device of student_hidden"):
        dckd_loss(sh, sw, th, tw, chosen.to("meta"), rejected)
    with pytest.raises(AlignopsError, match="chosen_weight must be finite, got inf"):
        dckd_loss(sh, sw, th, tw, chosen, rejected, chosen_weight=float("inf"))
    with pytest.raises(AlignopsError, match="rejected_mask must be a tensor, got NoneType"):
        dckd_loss(sh, sw, th, tw, chosen, None)
    with pytest.raises(AlignopsError, match="teacher_weight must have the vocabulary of student_weight"):
        dckd_loss(sh, sw, th, tw[:-1], chosen, rejected)


# ---- DTensor heads (FSDP2): a one-rank gloo mesh in this process -------------------------------------------


@pytest.fixture(scope="module")
def mesh1(tmp_path_factory):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import init_device_mesh

    init = tmp_path_factory.mktemp("adpa_mesh1") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_adpa_sharded_heads_are_the_plain_heads(mesh1):
    """Shard(0) DTensor heads on one rank are the whole heads: the same loss and, through the gather's backward,
    the same student gradient (as a DTensor); a DTensor mask is refused by name."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    sh, sw, th, tw, rh, rw, mask, *_ = _inputs(dtype=torch.float64)
    plain = adpa_loss(sh, sw, th, tw, rh, rw, mask).loss
    (expected,) = torch.autograd.grad(plain, sw)
    sw_d = distribute_tensor(sw.detach(), mesh1, [Shard(0)]).requires_grad_()
    tw_d, rw_d = (distribute_tensor(w, mesh1, [Shard(0)]) for w in (tw, rw))
    sharded = adpa_loss(sh, sw_d, th, tw_d, rh, rw_d, mask).loss
    torch.testing.assert_close(sharded, plain)
    (got,) = torch.autograd.grad(sharded, sw_d)
    assert isinstance(got, DTensor)
    torch.testing.assert_close(got.full_tensor(), expected)
    with pytest.raises(AlignopsError, match=r"adpa_loss: completion_mask is a DTensor with placements \(Replicate"):
        adpa_loss(sh, sw, th, tw, rh, rw, distribute_tensor(mask, mesh1, [Replicate()]))
