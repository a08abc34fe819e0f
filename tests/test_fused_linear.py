"""fused_linear_logprobs and fused_linear_preference_loss on the CPU: vs the materialised-logits reference
(TRL's path), vs Liger-Kernel's fused linear DPO / SimPO / CPO, opcheck, gradcheck, compile, bad input."""

import pytest
import torch

import alignops
from alignops.reference import preference as ref


@pytest.fixture(params=["one tile", "several tiles"])
def vocab_tiles(request, monkeypatch):
    if request.param == "several tiles":
        monkeypatch.setenv("ALIGNOPS_FUSED_LINEAR_TILE", "37")  # V = 301 -> 9 tiles, the last one ragged
    return request.param


def make(N, H, V, dtype=torch.float32, bias=False):
    hidden = torch.randn(N, H, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5 * 3).to(dtype).requires_grad_(True)
    b = torch.randn(V, dtype=torch.float64).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100
    return hidden, weight, b, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7, "logit_scale": 0.5}, {"softcap": 2.0}, {"softcap": 30.0}])
@pytest.mark.parametrize("bias", [False, True])
def test_logprobs_and_grads_match_reference(vocab_tiles, dtype, opts, bias):
    hidden, weight, b, targets = make(23, 16, 301, dtype, bias)
    out = alignops.fused_linear_logprobs(hidden, weight, targets, b, return_entropy=True, **opts)
    params = [t for t in (hidden, weight, b) if t is not None]
    clones = [t.detach().clone().requires_grad_(True) for t in params]
    exp_logp, exp_ent = ref.fused_linear_logprobs(
        clones[0], clones[1], targets, clones[2] if bias else None, return_entropy=True, **opts
    )
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logp, exp_logp, **tol)
    torch.testing.assert_close(out.entropy, exp_ent, **tol)
    assert torch.all(out.logp[targets == -100] == 0)
    g = torch.randn(23, dtype=out.logp.dtype)
    got = torch.autograd.grad((out.logp * g).sum(), params)
    exp = torch.autograd.grad((exp_logp * g).sum(), clones)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "column-strided"])
def test_long_runs_of_kept_rows_match_reference(vocab_tiles, dtype, layout):
    """A right-padded batch (prompt, completion, padding per sequence): the kept rows form one long run per
    sequence, which the CPU kernel reads in place from hidden (one GEMM per run) instead of gathering them; a
    row-strided hidden (a slice of a wider tensor) is read in place too, a column-strided one is gathered."""
    B, T, H, V = 3, 150, 16, 301
    wide = torch.randn(B * T, H + 5, dtype=torch.float64).to(dtype)
    hidden = {
        "contiguous": lambda: wide[:, :H].contiguous(),
        "row-strided": lambda: wide[:, :H],
        "column-strided": lambda: wide.t().contiguous().t()[:, :H],
    }[layout]().requires_grad_(True)
    assert hidden.stride(1) == (B * T if layout == "column-strided" else 1)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5 * 3).to(dtype).requires_grad_(True)
    b = torch.randn(V, dtype=torch.float64).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    targets[:, :10] = -100  # prompts
    targets[0, 120:] = -100  # padding
    targets[2, 90:] = -100
    targets = targets.view(-1)
    out = alignops.fused_linear_logprobs(hidden, weight, targets, b, return_entropy=True, temperature=0.9)
    # The oracle in fp64 (fp32 sums over 450 rows x 301 columns differ from fp32 autograd's by ~1e-5).
    clones = [t.detach().double().requires_grad_(True) for t in (hidden, weight, b)]
    exp_logp, exp_ent = ref.fused_linear_logprobs(*clones[:2], targets, clones[2], return_entropy=True, temperature=0.9)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logp.double(), exp_logp, **tol)
    torch.testing.assert_close(out.entropy.double(), exp_ent, **tol)
    g, ge = torch.randn(B * T, dtype=dtype), torch.randn(B * T, dtype=dtype)
    got = torch.autograd.grad((out.logp * g).sum() + (out.entropy * ge).sum(), (hidden, weight, b))
    exp = torch.autograd.grad((exp_logp * g.double()).sum() + (exp_ent * ge.double()).sum(), clones)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, **tol)
    assert (got[0][targets == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7, "logit_scale": 0.5, "softcap": 2.0}])
@pytest.mark.parametrize("use_logp", [True, False])
def test_entropy_gradient_matches_reference(vocab_tiles, dtype, opts, use_logp):
    """An entropy bonus: the entropy's gradient -p (log p + H) rides in the log-probs' backward pass (or alone)."""
    hidden, weight, b, targets = make(23, 16, 301, dtype, bias=True)
    out = alignops.fused_linear_logprobs(hidden, weight, targets, b, return_entropy=True, **opts)
    clones = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, b)]
    exp_logp, exp_ent = ref.fused_linear_logprobs(*clones[:2], targets, clones[2], return_entropy=True, **opts)
    g, ge = torch.randn(23, dtype=out.logp.dtype), torch.randn(23, dtype=out.logp.dtype)
    ge[3] = 0.0  # a row with only the log-prob term
    got = torch.autograd.grad((out.logp * g).sum() * use_logp + (out.entropy * ge).sum(), (hidden, weight, b))
    exp = torch.autograd.grad((exp_logp * g).sum() * use_logp + (exp_ent * ge).sum(), clones)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, e in zip(got, exp):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, **tol)
    assert torch.all(got[0][targets == -100] == 0)


def test_entropy_gradcheck_and_opcheck():
    hidden, weight, b, targets = make(7, 5, 13, torch.float64, bias=True)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: (
            alignops.fused_linear_logprobs(h, w, targets, bb, softcap=3.0, temperature=0.9, return_entropy=True).entropy
        ),
        (hidden, weight, b),
    )
    out = torch.ops.alignops.fused_linear_logprobs(hidden, weight, targets, b, -100, 0.9, 1.0, 0.0, True)
    # The backward op itself has no autograd: its inputs are plain tensors.
    args = (
        torch.randn(7, dtype=torch.float64),
        hidden.detach(),
        weight.detach(),
        targets,
        b.detach(),
        out[1].detach(),
        -100,
        0.9,
        1.0,
        0.0,
        True,
        torch.randn(7, dtype=torch.float64),
        out[2].detach(),
    )
    torch.library.opcheck(torch.ops.alignops.fused_linear_logprobs_backward.default, args)
    with pytest.raises(ValueError, match="grad_entropy and entropy go together"):
        torch.ops.alignops.fused_linear_logprobs_backward(*args[:-1])


def test_bf16_within_twice_torch_error():
    hidden, weight, _, targets = make(64, 32, 500, torch.float32)
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    exact = ref.fused_linear_logprobs(h16.double(), w16.double(), targets)
    ours = alignops.fused_linear_logprobs(h16, w16, targets).logp.double()
    # PyTorch's own bf16 path (TRL): bf16 logits, then log_softmax.
    keep = targets != -100
    z = (h16 @ w16.t()).float()
    theirs = torch.where(keep, torch.log_softmax(z, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    assert (ours - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max()


def test_opcheck_gradcheck_compile():
    hidden, weight, b, targets = make(7, 5, 13, torch.float64, bias=True)
    torch.library.opcheck(
        torch.ops.alignops.fused_linear_logprobs.default, (hidden, weight, targets, b, -100, 0.9, 1.0, 0.0, True)
    )
    torch.library.opcheck(
        torch.ops.alignops.fused_linear_logprobs.default, (hidden, weight, targets, None, -100, 1.0, 0.5, 3.0, False)
    )
    assert torch.autograd.gradcheck(
        lambda h, w, bb: alignops.fused_linear_logprobs(h, w, targets, bb, softcap=3.0, temperature=0.9).logp,
        (hidden, weight, b),
    )
    fn = torch.compile(
        lambda h, w: alignops.fused_linear_logprobs(h, w, targets).logp.sum(), fullgraph=True, backend="aot_eager"
    )
    grads = torch.autograd.grad(fn(hidden, weight), (hidden, weight))
    exp = torch.autograd.grad(ref.fused_linear_logprobs(hidden, weight, targets).sum(), (hidden, weight))
    for a, e in zip(grads, exp):
        torch.testing.assert_close(a, e)


def test_all_ignored_and_empty():
    hidden, weight, _, _ = make(4, 8, 10)
    out = alignops.fused_linear_logprobs(hidden, weight, torch.full((4,), -100))
    assert torch.equal(out.logp, torch.zeros(4))
    out.logp.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert alignops.fused_linear_logprobs(hidden[:0], weight, torch.zeros(0, dtype=torch.long)).logp.shape == (0,)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_logprobs_bad_input(backend):
    hidden, weight, _, targets = make(6, 8, 10)
    call = lambda *a, **kw: alignops.fused_linear_logprobs(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\] with H = 8"):
        call(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match=r"hidden must be a 2-D tensor of shape \[N, H\]"):
        call(hidden[0], weight, targets)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        call(hidden, weight, targets, softcap=0.0)
    if backend == "native":
        with pytest.raises(ValueError, match=r"targets\[1\] = 10 is out of range"):
            call(hidden, weight, torch.tensor([0, 10, 1, 2, 3, 4]))
        with pytest.raises(ValueError, match="weight must have the dtype of hidden"):
            call(hidden, weight.double(), targets)
        with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[10\]"):
            call(hidden, weight, targets, torch.zeros(3))
        with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
            call(hidden, weight, targets, temperature=-1.0)


# ---- fused_linear_preference_loss --------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "apo_zero", ["sigmoid", "hinge"]])
def test_preference_loss_matches_materialised_path(loss_type):
    B, T, H, V = 3, 9, 16, 120
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, dtype=torch.float64) / 2).requires_grad_(True)
    ref_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :3] = -100  # the prompt
    targets[0, -2:] = -100  # padding
    out = alignops.fused_linear_preference_loss(hidden, weight, targets, ref_hidden=ref_hidden, loss_type=loss_type)
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    exp = ref.fused_linear_preference_loss(h2, w2, targets, ref_hidden, loss_type)
    torch.testing.assert_close(out.loss, exp, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.loss, (hidden, weight))
    want = torch.autograd.grad(exp, (h2, w2))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_packed_layout_equals_padded():
    B, T, H, V = 2, 8, 12, 50
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / 2
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100
    padded = alignops.fused_linear_preference_loss(hidden, weight, targets, ref_hidden=hidden * 0.9, loss_type="ipo")
    cu = torch.arange(0, 2 * B * T + 1, T)
    packed = alignops.fused_linear_preference_loss(
        hidden.reshape(-1, H),
        weight,
        targets.reshape(-1),
        ref_hidden=hidden.reshape(-1, H) * 0.9,
        cu_seqlens=cu,
        chosen_index=torch.arange(B),
        rejected_index=torch.arange(B, 2 * B),
        loss_type="ipo",
    )
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.chosen_logps, padded.chosen_logps, rtol=1e-12, atol=1e-12)


def test_packed_varlen_and_shared_rejected():
    # Three responses of different lengths for one prompt: pairs (0 > 1) and (0 > 2), each computed once.
    H, V = 8, 30
    lens = [5, 3, 7]
    cu = torch.tensor([0, 5, 8, 15])
    hidden = torch.randn(15, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    targets = torch.randint(0, V, (15,))
    out = alignops.fused_linear_preference_loss(
        hidden,
        weight,
        targets,
        cu_seqlens=cu,
        chosen_index=torch.tensor([0, 0]),
        rejected_index=torch.tensor([1, 2]),
        loss_type="cpo",
        reduction="none",
    )
    tok = ref.fused_linear_logprobs(hidden, weight, targets)
    seqs = torch.stack([tok[s:e].sum() for s, e in zip([0, 5, 8], [5, 8, 15])])
    torch.testing.assert_close(out.chosen_logps, seqs[[0, 0]])
    torch.testing.assert_close(out.rejected_logps, seqs[[1, 2]])
    assert len(lens) == 3


@pytest.mark.parametrize("name", ["chosen_index", "rejected_index"])
def test_packed_segment_ids_are_checked(name):
    # A negative id silently picked the last segment, a float id was truncated and an id >= S raised a bare
    # IndexError.
    H, V = 8, 30
    cu = torch.tensor([0, 5, 8, 15])
    hidden, weight = torch.randn(15, H), torch.randn(V, H)
    targets = torch.randint(0, V, (15,))
    ids = {"chosen_index": torch.tensor([0, 0]), "rejected_index": torch.tensor([1, 2])}

    def call(bad):
        alignops.fused_linear_preference_loss(hidden, weight, targets, cu_seqlens=cu, **{**ids, name: bad})

    with pytest.raises(ValueError, match=rf"{name}\[1\] = -1 is out of range: segment ids must lie in \[0, 3\)"):
        call(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=rf"{name}\[0\] = 3 is out of range: segment ids must lie in \[0, 3\)"):
        call(torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=rf"{name} must be an integer tensor of segment ids, got dtype torch.float32"):
        call(torch.tensor([0.0, 1.7]))
    with pytest.raises(ValueError, match=rf"{name} must be an integer tensor of segment ids, got dtype torch.bool"):
        call(torch.tensor([True, False]))
    call(torch.tensor([0, 1], dtype=torch.int32))


def test_policy_equal_reference_is_exactly_zero():
    B, T, H, V = 2, 6, 16, 300
    hidden = torch.randn(2 * B, T, H)
    weight = torch.randn(V, H)
    targets = torch.randint(0, V, (2 * B, T))
    out = alignops.fused_linear_preference_loss(hidden, weight, targets, ref_hidden=hidden.clone(), reduction="none")
    assert torch.equal(out.chosen_rewards, torch.zeros(B)) and torch.equal(out.rejected_rewards, torch.zeros(B))


def test_reference_as_precomputed_logps_and_mask_dpo():
    B, T, H, V = 2, 7, 8, 40
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    targets = torch.randint(0, V, (2 * B, T))
    ref_tok = -torch.rand(2 * B, T, dtype=torch.float64)
    by_tokens = alignops.fused_linear_preference_loss(hidden, weight, targets, ref_per_token_logps=ref_tok)
    r = ref_tok.sum(-1)
    by_seq = alignops.fused_linear_preference_loss(
        hidden, weight, targets, ref_chosen_logps=r[:B], ref_rejected_logps=r[B:]
    )
    torch.testing.assert_close(by_tokens.loss, by_seq.loss, rtol=1e-12, atol=1e-12)
    # Mask-DPO: a token weight of 0 removes the token from both sums.
    mask = torch.ones(2 * B, T, dtype=torch.float64)
    mask[:, 4] = 0
    masked = alignops.fused_linear_preference_loss(
        hidden, weight, targets, ref_per_token_logps=ref_tok, token_weights=mask
    )
    t2 = targets.clone()
    t2[:, 4] = -100
    dropped = alignops.fused_linear_preference_loss(hidden, weight, t2, ref_per_token_logps=ref_tok * mask)
    torch.testing.assert_close(masked.chosen_logps, dropped.chosen_logps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "robust"])
def test_matches_liger_fused_linear_dpo(loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    B, T, H, V = 2, 10, 16, 64
    hidden = torch.randn(2 * B, T, H, requires_grad=True)
    ref_hidden = hidden.detach() + 0.05 * torch.randn(2 * B, T, H)
    weight = (torch.randn(V, H) / 4).requires_grad_(True)
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :3] = -100
    ls = 0.1 if loss_type == "robust" else 0.0
    peer = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, loss_type=loss_type, label_smoothing=ls)
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    exp_loss = peer(w2, h2, targets, ref_input=ref_hidden, ref_weight=w2.detach())[0]
    ours = alignops.nn.FusedLinearDPOLoss(beta=0.1, loss_type=loss_type, label_smoothing=ls)
    out = ours(weight, hidden, targets, ref_input=ref_hidden, ref_weight=weight.detach())
    torch.testing.assert_close(out.loss, exp_loss, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.loss, (hidden, weight))
    exp = torch.autograd.grad(exp_loss, (h2, w2))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_matches_liger_simpo_and_cpo():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    B, T, H, V = 2, 9, 16, 48
    hidden = torch.randn(2 * B, T, H)
    weight = torch.randn(V, H) / 4
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100
    exp = liger.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compiled=False)(weight, hidden, targets)[0]
    got = alignops.nn.FusedLinearSimPOLoss(beta=2.0, gamma=0.5)(weight, hidden, targets).loss
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    exp = liger.LigerFusedLinearCPOLoss(beta=0.1, alpha=1.0, compiled=False)(weight, hidden, targets)[0]
    got = alignops.nn.FusedLinearCPOLoss(beta=0.1, alpha=1.0)(weight, hidden, targets).loss
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_zero_length_responses_give_documented_zeros():
    # A response with no completion token sums to 0 and counts 0 tokens; its mean is 0 (count clamped to 1).
    B, T, H, V = 2, 5, 8, 20
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    targets = torch.randint(0, V, (2 * B, T))
    targets[1] = -100
    seq = alignops.fused_linear_sequence_logprobs(hidden, weight, targets)
    assert seq.num_tokens.tolist() == [T, 0, T, T] and seq.sum[1] == 0 and seq.mean[1] == 0
    out = alignops.fused_linear_preference_loss(hidden, weight, targets, loss_type="ipo", reduction="none")
    assert torch.isfinite(out.loss).all() and out.chosen_logps[1] == 0


def test_orpo_module_matches_liger():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    B, T, H, V = 2, 8, 16, 40
    hidden = torch.randn(2 * B, T, H)
    weight = torch.randn(V, H) / 8
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100
    exp = liger.LigerFusedLinearORPOLoss(beta=0.1, compiled=False)(weight, hidden, targets)[0]
    got = alignops.nn.FusedLinearORPOLoss(beta=0.1)(weight, hidden, targets).loss
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_preference_loss_bad_layouts():
    hidden = torch.randn(3, 4, 8)
    weight = torch.randn(10, 8)
    targets = torch.randint(0, 10, (3, 4))
    with pytest.raises(ValueError, match=r"padded hidden must stack B chosen then B rejected rows"):
        alignops.fused_linear_preference_loss(hidden, weight, targets)
    # Issue 13 (vague errors): the module blamed policy_rejected_logps' shape.
    with pytest.raises(ValueError, match=r"_input must stack B chosen then B rejected rows \(\[2B, T, H\]\); got 3"):
        alignops.nn.FusedLinearORPOLoss()(weight, hidden, targets)
    with pytest.raises(ValueError, match="packed .* need cu_seqlens, chosen_index and rejected_index"):
        alignops.fused_linear_preference_loss(hidden[0], weight, targets[0])
    with pytest.raises(ValueError, match=r"targets must have shape \[R, T\] = \(2, 4\)"):
        alignops.fused_linear_preference_loss(hidden[:2], weight, targets[:2, :3])
    with pytest.raises(ValueError, match="give both ref_chosen_logps and ref_rejected_logps, or neither"):
        alignops.fused_linear_preference_loss(hidden[:2], weight, targets[:2], ref_chosen_logps=torch.zeros(1))
    with pytest.raises(ValueError, match="ref_hidden must have the shape of hidden"):
        alignops.fused_linear_preference_loss(hidden[:2], weight, targets[:2], ref_hidden=hidden)
    with pytest.raises(ValueError, match="token_weights must have the shape of targets"):
        alignops.fused_linear_preference_loss(hidden[:2], weight, targets[:2], token_weights=torch.ones(2, 3))


@pytest.mark.parametrize("name", ["dpo", "dpo_nll", "simpo", "simpo_no_nll", "cpo", "orpo", "orpo_no_nll"])
def test_liger_modules_return_liger_structure(name):
    """``loss, aux = module(...)`` as with Liger-Kernel: aux element for element (log-probs, logits means computed
    without the logits, NLL 0 when it is off, rewards, ORPO's odds metrics) equal to Liger's own."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    B, T, H, V = 2, 9, 16, 48
    hidden = torch.randn(2 * B, T, H)
    weight = torch.randn(V, H) / 4
    bias = torch.randn(V) / 10
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100
    ref = dict(ref_input=hidden + 0.05 * torch.randn_like(hidden), ref_weight=weight, ref_bias=bias)
    peer, ours, kw = {
        "dpo": (liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False), alignops.nn.FusedLinearDPOLoss(beta=0.1), ref),
        "dpo_nll": (
            liger.LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=True, compiled=False),
            alignops.nn.FusedLinearDPOLoss(beta=0.1, compute_nll_loss=True),
            ref,
        ),
        "simpo": (
            liger.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compiled=False),
            alignops.nn.FusedLinearSimPOLoss(beta=2.0, gamma=0.5),
            {},
        ),
        "simpo_no_nll": (
            liger.LigerFusedLinearSimPOLoss(beta=2.0, compute_nll_loss=False, compiled=False),
            alignops.nn.FusedLinearSimPOLoss(beta=2.0, compute_nll_loss=False),
            {},
        ),
        "cpo": (liger.LigerFusedLinearCPOLoss(beta=0.1, compiled=False), alignops.nn.FusedLinearCPOLoss(beta=0.1), {}),
        "orpo": (
            liger.LigerFusedLinearORPOLoss(beta=0.1, compiled=False),
            alignops.nn.FusedLinearORPOLoss(beta=0.1),
            {},
        ),
        "orpo_no_nll": (
            liger.LigerFusedLinearORPOLoss(beta=0.1, compute_nll_loss=False, compiled=False),
            alignops.nn.FusedLinearORPOLoss(beta=0.1, compute_nll_loss=False),
            {},
        ),
    }[name]
    exp_loss, exp_aux = peer(weight, hidden, targets, bias, **kw)
    loss, aux = ours(weight, hidden, targets, bias, **kw)
    torch.testing.assert_close(loss, exp_loss, rtol=1e-5, atol=1e-6)
    assert len(aux) == len(exp_aux)
    for got, exp in zip(aux, exp_aux):
        torch.testing.assert_close(
            torch.as_tensor(got), torch.as_tensor(exp).to(torch.as_tensor(got).dtype), rtol=1e-4, atol=1e-5
        )


def test_liger_modules_check_arguments_at_construction():
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        alignops.nn.FusedLinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="beta must be > 0 and finite, got nan"):
        alignops.nn.FusedLinearDPOLoss(beta=float("nan"))
    with pytest.raises(ValueError, match="alpha must be finite, got inf"):
        alignops.nn.FusedLinearCPOLoss(alpha=float("inf"))
    with pytest.raises(ValueError, match="ignore_index must be an int, got 1.5"):
        alignops.nn.FusedLinearSimPOLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match="beta must be finite, got nan"):
        alignops.nn.FusedLinearORPOLoss(beta=float("nan"))
    with pytest.raises(ValueError, match=r"_input must be \[2B, T, H\]"):
        alignops.nn.FusedLinearDPOLoss()(torch.randn(8, 4), torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
