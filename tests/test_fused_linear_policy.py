"""fused_linear_policy_loss (GRPO family from hidden states) on the CPU: vs the materialised path (logits ->
log_softmax -> gather -> TRL 1.16's loss, transcribed in alignops.reference.policy), vs Liger-Kernel's
LigerFusedLinearGRPOLoss, packed vs padded, prompt tokens dropped, a global num_items_in_batch, the entropy mask,
gradcheck and bad input."""

import importlib.util

import pytest
import torch

import alignops
from alignops.fused_linear_policy import fused_linear_policy_loss, high_entropy_mask
from alignops.nn import FusedLinearGRPOLoss
from alignops.reference.policy import policy_loss as trl_policy_loss

LIGER = importlib.util.find_spec("liger_kernel") is not None


def make(B=3, T=9, H=16, V=301, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3).to(dtype).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 6:] = 0  # right padding of uneven completions
    mask[1, 4:] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return hidden, weight, b, ids, mask, adv


def materialised(hidden, weight, bias, ids, temperature=1.0, softcap=None):
    """TRL's path: full logits, / temperature, selective log-softmax and entropy_from_logits."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def clones(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def params(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


@pytest.fixture(params=["one tile", "several tiles"])
def vocab_tiles(request, monkeypatch):
    if request.param == "several tiles":
        monkeypatch.setenv("ALIGNOPS_FUSED_LINEAR_TILE", "37")  # V = 301 -> 9 tiles, the last one ragged
    return request.param


CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", epsilon_high=0.28),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dr_grpo", beta=0.1, use_bias_correction_kl=False),
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="vespo"),
    dict(loss_type="dapo", delta=1.5, top_entropy_quantile=0.4),
    dict(loss_type="dapo", off_policy_mask_threshold=0.1, beta=0.02),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_materialised_path(vocab_tiles, case, dtype):
    case = dict(case)
    hidden, weight, bias, ids, mask, adv = make(dtype=dtype, bias=True)
    g = torch.Generator().manual_seed(1)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape, generator=g, dtype=torch.float64).to(dtype)
    # old log-probs near the current ones so that some ratios fall outside the clip range and some inside
    with torch.no_grad():
        cur, _ = materialised(hidden.double(), weight.double(), bias.double(), ids, temperature=0.8)
    old = (cur + 0.3 * torch.randn(cur.shape, generator=g, dtype=torch.float64)).to(dtype)
    quantile = case.pop("top_entropy_quantile", 1.0)
    out = fused_linear_policy_loss(
        hidden,
        weight,
        ids,
        adv,
        mask,
        bias=bias,
        ref_hidden=ref_hidden,
        old_per_token_logps=old,
        temperature=0.8,
        top_entropy_quantile=quantile,
        **case,
    )

    h2, w2, b2 = clones(hidden, weight, bias)
    lp, ent = materialised(h2, w2, b2, ids, temperature=0.8)
    with torch.no_grad():
        ref_lp, _ = materialised(ref_hidden, w2, b2, ids, temperature=0.8)
    emask = None
    if quantile < 1.0:
        # TRL's get_high_entropy_mask, inlined: a quantile of the completion tokens' entropies
        thr = torch.quantile(ent.detach()[mask.bool()].float(), 1 - quantile)
        emask = ((ent.detach() * mask) >= thr) & mask.bool()
        assert 0 < int(emask.sum()) < int(mask.sum())
        assert torch.equal(out.entropy_mask, emask)
    exp_loss, exp_metrics = trl_policy_loss(
        lp, adv, mask, old_per_token_logps=old, ref_per_token_logps=ref_lp, entropy_mask=emask, **case
    )
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    keep = mask.bool()
    torch.testing.assert_close(out.loss, exp_loss.to(out.loss.dtype), **tol)
    torch.testing.assert_close(out.per_token_logps[keep], lp.detach()[keep].to(out.loss.dtype), **tol)
    torch.testing.assert_close(out.entropies[keep], ent.detach()[keep].to(out.loss.dtype), **tol)
    assert torch.all(out.per_token_logps[~keep] == 0) and torch.all(out.entropies[~keep] == 0)
    for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "kl", "mean_ratio"):
        torch.testing.assert_close(out.metrics[name], exp_metrics[name].to(out.loss.dtype), equal_nan=True, **tol)
    got = torch.autograd.grad(out.loss, params(hidden, weight, bias))
    exp = torch.autograd.grad(exp_loss, params(h2, w2, b2))
    for a, e in zip(got, exp):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e.to(a.dtype), **tol)


@pytest.mark.parametrize("opts", [dict(logit_scale=0.5, softcap=2.0), dict(softcap=30.0)])
def test_logit_transforms_match(opts):
    hidden, weight, _, ids, mask, adv = make()
    out = fused_linear_policy_loss(hidden, weight, ids, adv, mask, temperature=0.7, **opts)
    h2, w2 = clones(hidden, weight)
    lp, ent = materialised(h2 * opts.get("logit_scale", 1.0), w2, None, ids, temperature=0.7, softcap=opts["softcap"])
    exp, _ = trl_policy_loss(lp, adv, mask)
    torch.testing.assert_close(out.loss, exp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.entropies[mask.bool()], ent.detach()[mask.bool()], rtol=1e-10, atol=1e-12)
    for a, e in zip(torch.autograd.grad(out.loss, [hidden, weight]), torch.autograd.grad(exp, [h2, w2])):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("num_items", [None, 40])
def test_entropy_bonus_matches_materialised_path(vocab_tiles, num_items):
    """entropy_coef: loss - coef * sum(m H) / n, its gradient through the fused backward (dH/dz = -p (log p + H))."""
    hidden, weight, bias, ids, mask, adv = make(bias=True)
    kw = dict(loss_type="dapo", num_items_in_batch=num_items)
    out = fused_linear_policy_loss(hidden, weight, ids, adv, mask, bias=bias, entropy_coef=0.05, temperature=0.8, **kw)
    h2, w2, b2 = clones(hidden, weight, bias)
    lp, ent = materialised(h2, w2, b2, ids, temperature=0.8)
    base, _ = trl_policy_loss(lp, adv, mask, **kw)
    n = mask.sum() if num_items is None else num_items
    exp = base - 0.05 * (ent * mask).sum() / n
    torch.testing.assert_close(out.loss, exp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["entropy"], (ent * mask).sum().detach() / mask.sum(), rtol=1e-10, atol=0)
    assert not out.entropies.requires_grad
    got = torch.autograd.grad(out.loss, [hidden, weight, bias])
    want = torch.autograd.grad(exp, [h2, w2, b2], retain_graph=True)
    without = torch.autograd.grad(base, [h2, w2, b2])
    for a, e, w0 in zip(got, want, without):
        assert (e - w0).abs().max() > 1e-3  # the bonus moves the gradient: the test can see it missing
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_backend_matches_native(monkeypatch):
    """The Triton fused kernels (interpreter on the CPU) under the same composition: loss and gradients equal the
    native path's, with the reference model, the entropy mask and an entropy bonus."""
    import alignops.kernels.fused_linear as fl_kernels

    monkeypatch.setattr(fl_kernels, "VOCAB_TILE", 64)  # V = 150 -> 3 tiles, the last one partial
    hidden, weight, bias, ids, mask, adv = make(B=2, T=5, H=8, V=150, bias=True)
    mask[1, 3:] = 0
    ref_hidden = hidden.detach() * 0.9
    kw = dict(
        bias=bias,
        ref_hidden=ref_hidden,
        beta=0.04,
        entropy_coef=0.02,
        top_entropy_quantile=0.6,
        temperature=0.7,
        softcap=5.0,
    )
    nat = fused_linear_policy_loss(hidden, weight, ids, adv, mask, backend="native", **kw)
    h2, w2, b2 = clones(hidden, weight, bias)
    tri = fused_linear_policy_loss(h2, w2, ids, adv, mask, backend="triton", **{**kw, "bias": b2})
    torch.testing.assert_close(tri.loss, nat.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tri.entropies, nat.entropies, rtol=1e-10, atol=1e-12)
    assert torch.equal(tri.entropy_mask, nat.entropy_mask)
    for a, e in zip(torch.autograd.grad(tri.loss, [h2, w2, b2]), torch.autograd.grad(nat.loss, [hidden, weight, bias])):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_prompt_and_padding_tokens_are_dropped():
    """Masked rows never reach a GEMM: NaN hidden states there change nothing and get a zero gradient."""
    hidden, weight, _, ids, mask, adv = make()
    out = fused_linear_policy_loss(hidden, weight, ids, adv, mask, loss_type="grpo")
    poisoned = hidden.detach().clone()
    poisoned[~mask.bool()] = float("nan")
    poisoned.requires_grad_(True)
    w2 = weight.detach().clone().requires_grad_(True)
    out2 = fused_linear_policy_loss(poisoned, w2, ids, adv, mask, loss_type="grpo")
    assert torch.equal(out.loss, out2.loss)
    gh, gw = torch.autograd.grad(out2.loss, [poisoned, w2])
    assert torch.all(gh[~mask.bool()] == 0) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(gw, torch.autograd.grad(out.loss, weight)[0], rtol=0, atol=0)


def test_packed_equals_padded():
    hidden, weight, bias, ids, mask, adv = make(bias=True)
    g = torch.Generator().manual_seed(3)
    old = torch.randn(ids.shape, generator=g, dtype=torch.float64) * 0.2 - 5.0
    ref_lp = torch.randn(ids.shape, generator=g, dtype=torch.float64) * 0.2 - 5.0
    kw = dict(loss_type="dr_grpo", beta=0.05, max_completion_length=9, top_entropy_quantile=0.5)
    padded = fused_linear_policy_loss(
        hidden, weight, ids, adv, mask, bias=bias, old_per_token_logps=old, ref_per_token_logps=ref_lp, **kw
    )
    # Packed: only the completion tokens, back to back; sequence lengths 6, 4, 9.
    keep = mask.bool()
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    h2, w2, b2 = clones(hidden, weight, bias)
    packed = fused_linear_policy_loss(
        h2[keep],
        w2,
        ids[keep],
        adv,
        None,
        bias=b2,
        cu_seqlens=cu,
        old_per_token_logps=old[keep],
        ref_per_token_logps=ref_lp[keep],
        **kw,
    )
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(packed.per_token_logps, padded.per_token_logps[keep], rtol=0, atol=0)
    assert torch.equal(packed.entropy_mask, padded.entropy_mask[keep])
    got = torch.autograd.grad(packed.loss, [h2, w2, b2])
    exp = torch.autograd.grad(padded.loss, [hidden, weight, bias])
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_num_items_in_batch_is_global():
    """dapo divides by the step's global token count (a tensor, as TRL passes it): two ranks' halves, each
    normalised by the global count, sum to the loss of the whole batch."""
    hidden, weight, _, ids, mask, adv = make(B=4)
    whole = fused_linear_policy_loss(hidden, weight, ids, adv, mask)
    n = mask.sum()
    halves = [
        fused_linear_policy_loss(hidden[s], weight, ids[s], adv[s], mask[s], num_items_in_batch=n)
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(halves[0].loss + halves[1].loss, whole.loss, rtol=1e-12, atol=1e-14)
    local = fused_linear_policy_loss(hidden[:2], weight, ids[:2], adv[:2], mask[:2])
    torch.testing.assert_close(halves[0].loss, local.loss * mask[:2].sum() / n, rtol=1e-12, atol=1e-14)


def test_high_entropy_mask_matches_trl_rule():
    ent = torch.tensor([[0.1, 2.0, 3.0, 0.0], [1.0, 5.0, 0.2, 0.3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # completion entropies 0.1, 2, 3, 1, 5: the 0.6 quantile is 2.6 (linear interpolation) -> 3 and 5 kept
    assert torch.equal(
        high_entropy_mask(ent, mask, quantile=0.6),
        torch.tensor([[False, False, True, False], [False, True, False, False]]),
    )


def test_gradcheck_tiny_fp64():
    hidden, weight, bias, ids, mask, adv = make(B=2, T=3, H=4, V=11, bias=True)
    old = torch.full(ids.shape, -2.4, dtype=torch.float64)

    def f(h, w, b):
        return fused_linear_policy_loss(
            h, w, ids, adv, mask, bias=b, old_per_token_logps=old, loss_type="bnpo", temperature=0.9
        ).loss

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-8)


@pytest.mark.skipif(not LIGER, reason="needs liger-kernel")
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_liger(loss_type, beta):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, bias, ids, mask, adv = make(H=32, V=301, dtype=torch.float32, bias=True)
    g = torch.Generator().manual_seed(5)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape, generator=g)
    with torch.no_grad():
        cur, _ = materialised(hidden, weight, bias, ids)
    old = cur + 0.3 * torch.randn(cur.shape, generator=g)
    kw = dict(
        beta=beta, loss_type=loss_type, max_completion_length=9, epsilon_high=0.28, temperature=1.0, use_ref_model=True
    )
    ours = FusedLinearGRPOLoss(**kw)
    liger = LigerFusedLinearGRPOLoss(compiled=False, chunk_size=2, **kw)
    args = dict(old_per_token_logps=old, ref_input=ref_hidden, ref_weight=weight.detach(), ref_bias=bias.detach())
    loss, metrics = ours(hidden, weight, ids, mask, adv, bias, **args)
    h2, w2, b2 = clones(hidden, weight, bias)
    exp, exp_metrics = liger(h2, w2, ids, mask, adv, b2, **args)
    torch.testing.assert_close(loss, exp, rtol=2e-5, atol=2e-6)
    assert len(metrics) == len(exp_metrics)
    if beta:
        torch.testing.assert_close(metrics[0], exp_metrics[0], rtol=2e-5, atol=2e-6)
    if loss_type in ("dapo", "grpo", "bnpo", "dr_grpo"):  # TRL's clip_ratio/region_mean = Liger's is_clipped mean
        torch.testing.assert_close(metrics[-1], exp_metrics[-1], rtol=1e-6, atol=1e-7)
    for a, e in zip(torch.autograd.grad(loss, [hidden, weight, bias]), torch.autograd.grad(exp, [h2, w2, b2])):
        torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-6)


def test_public_exports():
    assert alignops.fused_linear_policy_loss is fused_linear_policy_loss
    assert alignops.nn.FusedLinearGRPOLoss is FusedLinearGRPOLoss


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(entropy_coef=float("nan")), "entropy_coef must be finite"),
        (dict(top_entropy_quantile=0.0), r"top_entropy_quantile must lie in \(0, 1\]"),
        (dict(top_entropy_quantile=1.5), r"top_entropy_quantile must lie in \(0, 1\]"),
        (dict(beta=0.1), "beta = 0.1 needs the reference model"),
        (dict(completion_mask=torch.ones(3, 8)), r"completion_mask must have the shape of completion_ids \(3, 9\)"),
        (
            dict(completion_ids=torch.zeros(3, 8, dtype=torch.long), completion_mask=None),
            r"completion_ids must have shape \[B, T\]",
        ),
        (dict(completion_ids=torch.zeros(3, 9)), "completion_ids must be an integer tensor"),
        (dict(advantages=torch.zeros(4)), r"advantages must have shape \[3\]"),
        (dict(old_per_token_logps=torch.zeros(3)), "old_per_token_logps must have the shape of completion_ids"),
        (dict(ref_per_token_logps=torch.zeros(3, 8), beta=0.1), "ref_per_token_logps must have the shape"),
        (dict(ref_hidden=torch.zeros(3, 9, 15)), "ref_hidden must have the shape of hidden"),
        (dict(cu_seqlens=torch.tensor([0, 9])), "cu_seqlens is for packed"),
        (dict(hidden=torch.zeros(27, 16)), "packed \\[N, H\\] hidden states need cu_seqlens"),
        (dict(hidden=torch.zeros(16)), r"hidden must be \[B, T, H\] \(padded\) or \[N, H\] \(packed\)"),
        (dict(weight=torch.zeros(301, 15, dtype=torch.float64)), "weight must have shape"),
    ],
)
def test_bad_input(change, match):
    hidden, weight, _, ids, mask, adv = make()
    kw = dict(hidden=hidden, weight=weight, completion_ids=ids, advantages=adv, completion_mask=mask) | change
    args = [kw.pop(k) for k in ("hidden", "weight", "completion_ids", "advantages", "completion_mask")]
    with pytest.raises(alignops.AlignopsError, match=match):
        fused_linear_policy_loss(*args, **kw)


def test_bad_packed_input():
    hidden, weight, _, ids, _, adv = make()
    with pytest.raises(alignops.AlignopsError, match="cu_seqlens must start at 0, end at N=27"):
        fused_linear_policy_loss(hidden.reshape(27, 16), weight, ids.reshape(27), adv, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(alignops.AlignopsError, match=r"advantages must have shape \[2\]"):
        fused_linear_policy_loss(
            hidden.reshape(27, 16), weight, ids.reshape(27), adv, cu_seqlens=torch.tensor([0, 9, 27])
        )
