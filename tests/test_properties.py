"""Property-based tests (hypothesis): the public ops of every family on random shapes (empty and odd sizes
included), dtypes, lengths, masks, magnitudes and NaN / inf placement, checked against
``alignops.reference`` and the peers where they are installed.

CPU only, native backend (the Triton interpreter is too slow for a search). Examples are derandomised
(the "alignops" profile of tests/conftest.py), so CI sees the same cases every run.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import alignops  # noqa: E402
from alignops import ot as O  # noqa: E402
from alignops.reference import ctc as ref_ctc  # noqa: E402
from alignops.reference import ctc_posteriors as ref_post  # noqa: E402
from alignops.reference import objectives as ref_obj  # noqa: E402
from alignops.reference import preference as ref_pref  # noqa: E402
from alignops.reference import represent as ref_rep  # noqa: E402
from alignops.reference import skip as ref_skip  # noqa: E402
from alignops.reference import wasserstein as ref_w  # noqa: E402
from alignops.reference import watermark as ref_wm  # noqa: E402

# Tolerances per dtype against a reference run on the same inputs (bf16: the kernels accumulate in fp32,
# the difference is the final rounding and the fp32 sum order).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def fast(n: int):
    """A per-test budget: n examples, no deadline (the first call of an op loads its kernels)."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, scale=1.0):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def close(got, exp, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(
        got.double(), exp.double(), rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0), equal_nan=True
    )


def nan_or_raises(fn, what):
    """NaN in must give NaN out (propagation) or a clear ValueError: never a finite or infinite number."""
    try:
        out = fn()
    except ValueError as e:
        assert str(e), what
        return None
    return out


seeds = st.integers(0, 2**31 - 1)
fdtypes = st.sampled_from([torch.float32, torch.float64])
magnitudes = st.sampled_from([1e-3, 1.0, 30.0, 1e4])


# ---- preference ---------------------------------------------------------------------------------------


@fast(40)
@given(
    N=st.integers(0, 9),
    V=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    scale=magnitudes,
    temperature=st.sampled_from([1.0, 0.7, 3.0, 1e-3]),
    ignore_p=st.floats(0, 1),
    seed=seeds,
)
def test_selective_logprobs_matches_reference(N, V, dtype, scale, temperature, ignore_p, seed):
    logits = randn((N, V), dtype, seed, scale)
    targets = torch.randint(0, V, (N,), generator=gen(seed + 1))
    targets[torch.rand(N, generator=gen(seed + 2)) < ignore_p] = -100
    got = alignops.selective_logprobs(logits, targets, temperature=temperature, backend="native")
    exp = ref_pref.selective_logprobs(logits.double(), targets, -100, temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The log-prob is a difference of terms of size |z| / T: its rounding error scales with them.
    mag = float(logits.double().abs().amax()) / temperature if N else 0.0
    if dtype == torch.bfloat16:
        close(got, ref_pref.selective_logprobs(logits.float(), targets, -100, temperature), torch.float32, mag)
    else:
        close(got, exp, dtype, mag * (1e-2 if dtype == torch.float32 else 1e-5))
    assert torch.equal(got[targets == -100], torch.zeros_like(got[targets == -100]))


@fast(25)
@given(
    N=st.integers(1, 6),
    V=st.integers(1, 70),
    where=st.sampled_from(["target", "other", "last"]),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    dtype=fdtypes,
    seed=seeds,
)
def test_selective_logprobs_non_finite_logits(N, V, where, value, dtype, seed):
    logits = randn((N, V), dtype, seed)
    targets = torch.randint(0, V, (N,), generator=gen(seed + 1))
    row = N // 2
    col = {"target": int(targets[row]), "other": (int(targets[row]) + 1) % V, "last": V - 1}[where]
    logits[row, col] = value
    out = nan_or_raises(lambda: alignops.selective_logprobs(logits, targets, backend="native"), "selective_logprobs")
    if out is None:
        return
    exp = ref_pref.selective_logprobs(logits.double(), targets, -100, 1.0)
    others = torch.arange(N) != row
    close(out[others], exp[others], dtype)
    if math.isnan(value):
        assert out[row].isnan(), f"NaN logit gave {out[row]}"
    else:
        # torch's log_softmax is the contract here: +inf on the target gives NaN (inf - inf), -inf on the
        # target gives -inf, an infinity elsewhere gives -inf (+inf) or the finite value (-inf).
        assert torch.equal(out[row].isnan(), exp[row].isnan()) and (
            exp[row].isnan() or out[row] == exp[row] or torch.isclose(out[row], exp[row].to(out.dtype))
        )


@fast(20)
@given(B=st.integers(0, 4), T=st.integers(1, 9), V=st.integers(1, 33), dtype=fdtypes, seed=seeds)
def test_sequence_logprobs_padded_matches_reference(B, T, V, dtype, seed):
    logits = randn((B, T, V), dtype, seed, 3.0)
    targets = torch.randint(0, V, (B, T), generator=gen(seed + 1))
    mask = torch.rand(B, T, generator=gen(seed + 2)) < 0.7
    got = alignops.sequence_logprobs(logits, targets, completion_mask=mask, backend="native")
    per_tok = ref_pref.selective_logprobs(logits.reshape(B * T, V).double(), targets.reshape(-1), -100, 1.0)
    per_tok = per_tok.reshape(B, T) * mask
    close(got.per_token, per_tok, dtype)
    close(got.sum, per_tok.sum(-1), dtype, T)
    assert torch.equal(got.num_tokens, mask.sum(-1))
    close(got.mean, per_tok.sum(-1) / mask.sum(-1).clamp(min=1), dtype, T)


@fast(20)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=5), V=st.integers(1, 20), seed=seeds)
def test_sequence_logprobs_packed_matches_reference(lengths, V, seed):
    N = sum(lengths)
    logits = randn((N, V), torch.float64, seed)
    targets = torch.randint(0, V, (N,), generator=gen(seed + 1))
    cu = torch.tensor([0] + lengths).cumsum(0)
    got = alignops.sequence_logprobs(logits, targets, cu_seqlens=cu, backend="native")
    per_tok = ref_pref.selective_logprobs(logits, targets, -100, 1.0)
    exp = torch.stack([per_tok[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    close(got.sum, exp, torch.float64)
    assert got.num_tokens.tolist() == lengths


_SIMPLE_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "simpo",
    "cpo",
    "aot",
    "aot_unpaired",
    "exo_pair",
    "sigmoid_norm",
]


@fast(40)
@given(
    B=st.integers(0, 9),
    loss_type=st.sampled_from(_SIMPLE_TYPES),
    beta=st.sampled_from([0.01, 0.1, 2.5]),
    smoothing=st.sampled_from([0.0, 0.1, 0.3]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    scale=st.sampled_from([1.0, 50.0, 1e3]),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    fdiv=st.sampled_from(["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]),
    seed=seeds,
)
def test_preference_loss_matches_reference(B, loss_type, beta, smoothing, dtype, scale, reduction, fdiv, seed):
    if loss_type == "exo_pair" and smoothing == 0.0:
        smoothing = 1e-3
    if fdiv != "reverse_kl" and loss_type not in ("sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"):
        fdiv = "reverse_kl"
    if fdiv == "forward_kl":
        scale = min(scale, 30.0)  # e^{-x} overflows fp32 beyond |x| ~ 88, in the reference as in the kernel
    pc, pr, rc, rr = (randn((B,), dtype, seed + i, scale) for i in range(4))
    lengths = {}
    if loss_type in ("sigmoid_norm", "simpo") or (loss_type == "ipo" and seed % 2):
        lengths = dict(
            chosen_lengths=torch.randint(1, 40, (B,), generator=gen(seed + 5)),
            rejected_lengths=torch.randint(1, 40, (B,), generator=gen(seed + 6)),
        )
    kw = dict(
        loss_type=loss_type,
        beta=beta,
        label_smoothing=smoothing,
        f_divergence_type=fdiv,
        reduction=reduction,
        **lengths,
    )
    got = alignops.preference_loss(pc, pr, rc, rr, backend="native", **kw)
    exp = ref_pref.preference_loss(pc, pr, rc, rr, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.loss.dtype == acc
    mag = beta * scale * 4 * (B if reduction == "sum" else 1)
    if loss_type in ("ipo", "sppo_hard"):
        mag = mag * (scale + 1 / beta) * 4  # squares of scaled terms
    close(got.loss, exp[0], acc, mag * (1e-2 if acc == torch.float32 else 1e-5))
    close(got.chosen_rewards, exp[1], acc, beta * scale * 4)
    close(got.rejected_rewards, exp[2], acc, beta * scale * 4)


@fast(20)
@given(
    B=st.integers(1, 6),
    loss_type=st.sampled_from(["sigmoid", "hinge", "ipo", "robust", "apo_zero", "discopop", "cpo"]),
    which=st.integers(0, 3),
    dtype=fdtypes,
    seed=seeds,
)
def test_preference_loss_nan_propagates(B, loss_type, which, dtype, seed):
    ins = [randn((B,), dtype, seed + i) for i in range(4)]
    if loss_type == "cpo":
        which = which % 2  # reference-free: the ref log-probs do not enter
    row = seed % B
    ins[which][row] = math.nan
    out = nan_or_raises(
        lambda: alignops.preference_loss(
            *ins,
            loss_type=loss_type,
            reduction="none",
            label_smoothing=0.1 if loss_type == "robust" else 0.0,
            backend="native",
        ),
        "preference_loss",
    )
    if out is not None:
        assert out.loss[row].isnan(), f"a NaN log-prob gave loss {out.loss[row]}"
        assert not out.loss[torch.arange(B) != row].isnan().any()


@fast(20)
@given(
    N=st.integers(0, 7),
    H=st.integers(1, 19),
    V=st.integers(1, 41),
    dtype=fdtypes,
    temperature=st.sampled_from([1.0, 0.5]),
    softcap=st.sampled_from([None, 5.0]),
    entropy=st.booleans(),
    seed=seeds,
)
def test_fused_linear_logprobs_matches_reference(N, H, V, dtype, temperature, softcap, entropy, seed):
    h = randn((N, H), dtype, seed)
    w = randn((V, H), dtype, seed + 1, 1 / math.sqrt(H))
    t = torch.randint(0, V, (N,), generator=gen(seed + 2))
    if N:
        t[0] = -100
    got = alignops.fused_linear_logprobs(
        h, w, t, temperature=temperature, softcap=softcap, return_entropy=entropy, backend="native"
    )
    exp = ref_pref.fused_linear_logprobs(h, w, t, temperature=temperature, softcap=softcap, return_entropy=entropy)
    if entropy:
        close(got.logp, exp[0], dtype, 10)
        close(got.entropy, exp[1], dtype, 10)
    else:
        close(got.logp, exp, dtype, 10)
        assert got.entropy is None


# ---- ctc ----------------------------------------------------------------------------------------------


def ctc_batch(B, T, C, L, seed, dtype=torch.float32, scale=1.0):
    """Log-softmax emissions and feasible targets (no blank, lengths with room for repeats)."""
    lp = torch.log_softmax(randn((B, T, C), torch.float64, seed, scale), -1).to(dtype)
    targets = torch.randint(1, C, (B, max(L, 0)), generator=gen(seed + 1))
    in_len = torch.randint(0, T + 1, (B,), generator=gen(seed + 2))
    tl = torch.minimum(torch.randint(0, L + 1, (B,), generator=gen(seed + 3)), in_len // 2)
    in_len = torch.maximum(in_len, 2 * tl)  # 2L frames always fit L tokens with their repeats
    return lp, targets, in_len.clamp(max=T), tl


@fast(25)
@given(
    B=st.integers(0, 4),
    T=st.integers(0, 13),
    C=st.integers(2, 7),
    L=st.integers(0, 5),
    dtype=fdtypes,
    scale=st.sampled_from([1.0, 10.0]),
    seed=seeds,
)
def test_forced_align_matches_reference(B, T, C, L, dtype, scale, seed):
    L = min(L, T // 2)
    lp, targets, il, tl = ctc_batch(B, T, C, L, seed, dtype, scale)
    paths, scores = alignops.forced_align(lp, targets, il, tl, backend="native")
    assert paths.shape == scores.shape == (B, T)
    if B == 0 or T == 0:
        return
    if L == 0:  # no target: every frame inside the length is blank (the reference needs L >= 1)
        inside = torch.arange(T)[None, :] < il[:, None]
        assert (paths[inside] == 0).all() and (paths[~inside] == -1).all()
        return
    rp, rs, feasible = ref_ctc.forced_align(lp, targets, il, tl)
    assert feasible.all()
    # Random continuous scores leave no ties: the paths are the same, and their total scores.
    assert torch.equal(paths, rp)
    close(scores, rs, dtype)
    for b in range(B):
        n = int(il[b])
        p = paths[b, :n]
        assert (
            torch.equal(p[p != 0].unique_consecutive(), targets[b, : int(tl[b])].unique_consecutive())
            or int(tl[b]) != targets[b, : int(tl[b])].unique_consecutive().numel()
        )
        assert (paths[b, n:] == -1).all()


@fast(10)
@given(T=st.integers(1, 12), C=st.integers(2, 6), L=st.integers(1, 4), seed=seeds)
def test_forced_align_matches_torchaudio(T, C, L, seed):
    F = pytest.importorskip("torchaudio.functional")
    L = min(L, T // 2)
    if L == 0:
        return
    lp, targets, _, _ = ctc_batch(1, T, C, L, seed)
    targets = targets[:, :L]
    paths, scores = alignops.forced_align(lp, targets, backend="native")
    ta_paths, ta_scores = F.forced_align(lp, targets.int(), blank=0)
    # Same maximum (the paths agree up to ties, which continuous scores do not produce).
    torch.testing.assert_close(scores.sum(), ta_scores.sum(), rtol=1e-5, atol=1e-5)
    assert torch.equal(paths, ta_paths.long())


@fast(20)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 9),
    C=st.integers(2, 6),
    L=st.integers(0, 4),
    row=st.integers(0, 2),
    frame=st.integers(0, 8),
    cls=st.integers(0, 5),
    dtype=fdtypes,
    seed=seeds,
)
def test_forced_align_nan_emission(B, T, C, L, row, frame, cls, dtype, seed):
    """A NaN emission on a frame that every path crosses: NaN scores (no argmax over NaN is right) or an error."""
    L = min(L, T // 2)
    lp, targets, il, tl = ctc_batch(B, T, C, L, seed, dtype)
    row, frame, cls = row % B, frame % T, cls % C
    il[row] = T
    lp[row, frame, :] = math.nan
    try:
        paths, scores = alignops.forced_align(lp, targets, il, tl, on_infeasible="skip", backend="native")
    except ValueError:
        return
    assert scores[row].isnan().any() or (paths[row] == -1).all(), "a NaN frame gave a finite alignment"


@fast(20)
@given(
    B=st.integers(0, 4),
    T=st.integers(0, 11),
    C=st.integers(2, 6),
    L=st.integers(0, 4),
    dtype=fdtypes,
    reduction=st.sampled_from(["none", "sum", "mean"]),
    seed=seeds,
)
def test_ctc_loss_matches_reference_and_torch(B, T, C, L, dtype, reduction, seed):
    lp, targets, il, tl = ctc_batch(B, T, C, L, seed, dtype)
    got = alignops.ctc_loss(lp, targets, il, tl, reduction=reduction, backend="native")
    if T == 0:  # every row has L = 0 and no frame: loss 0 (torch's value)
        assert torch.equal(got, torch.zeros_like(got)) and got.shape == ((B,) if reduction == "none" else ())
        return
    exp = ref_post.ctc_loss(lp.double(), targets, il, tl, reduction=reduction)
    close(got, exp, dtype, 10 * max(T, 1))
    if B:
        theirs = torch.nn.functional.ctc_loss(lp.double().transpose(0, 1), targets, il, tl, reduction=reduction)
        close(got, theirs, dtype, 10 * max(T, 1))


@fast(15)
@given(B=st.integers(1, 3), T=st.integers(1, 10), C=st.integers(2, 6), L=st.integers(0, 4), seed=seeds)
def test_ctc_posteriors_match_reference(B, T, C, L, seed):
    lp, targets, il, tl = ctc_batch(B, T, C, L, seed, torch.float64)
    got = alignops.ctc_posteriors.ctc_posteriors(lp, targets, il, tl, output="both", backend="native")
    loss, gamma = ref_post.forward_backward(lp, targets, il, tl)
    close(got.loss, loss, torch.float64)
    close(got.states, gamma, torch.float64)
    sums = got.states.sum(-1)
    inside = torch.arange(T)[None, :] < il[:, None]
    close(sums[inside], torch.ones_like(sums[inside]), torch.float32)
    assert (sums[~inside] == 0).all()


def test_ctc_loss_nan_emission_gives_nan():
    """Issue 13 item 5: NaN in, NaN out, and zero_infinity must not hide it."""
    lp, targets, il, tl = ctc_batch(2, 8, 5, 3, 7)
    lp[0, 3, :] = math.nan
    out = nan_or_raises(
        lambda: alignops.ctc_loss(lp, targets, il.fill_(8), tl, reduction="none", zero_infinity=True, backend="native"),
        "ctc_loss",
    )
    assert out is None or (out[0].isnan() and not out[1].isnan())


def merge_tokens(path, frame_scores, blank=0):
    """torchaudio's merge_tokens loop: one span per run of a non-blank id."""
    spans, t, T = [], 0, len(path)
    while t < T:
        tok = path[t]
        e = t
        while e < T and path[e] == tok:
            e += 1
        if tok >= 0 and tok != blank:
            spans.append((tok, t, e, sum(frame_scores[t:e]) / (e - t)))
        t = e
    return spans


@fast(25)
@given(B=st.integers(0, 4), T=st.integers(0, 15), C=st.integers(1, 5), pad=st.integers(0, 15), seed=seeds)
def test_token_spans_match_merge_tokens(B, T, C, pad, seed):
    paths = torch.randint(0, C, (B, T), generator=gen(seed))
    if T:
        paths[:, T - min(pad, T) :] = -1
    fs = randn((B, T), torch.float64, seed + 1)
    spans = alignops.ctc.token_spans(paths, fs)
    for b in range(B):
        exp = merge_tokens(paths[b].tolist(), fs[b].tolist())
        n = int(spans.count[b])
        assert n == len(exp)
        assert spans.token[b, :n].tolist() == [e[0] for e in exp]
        assert spans.start[b, :n].tolist() == [e[1] for e in exp]
        assert spans.end[b, :n].tolist() == [e[2] for e in exp]
        close(spans.score[b, :n], torch.tensor([e[3] for e in exp], dtype=torch.float64), torch.float64)
        assert (spans.token[b, n:] == -1).all() and spans.score[b, n:].isnan().all()


# ---- ot -----------------------------------------------------------------------------------------------


def marginal(n, seed, mass=1.0):
    w = torch.rand(n, generator=gen(seed), dtype=torch.float64) + 0.05
    return w / w.sum() * mass


@fast(12)
@given(
    N=st.integers(1, 7),
    M=st.integers(1, 7),
    eps=st.sampled_from([0.2, 0.5, 2.0]),
    dtype=fdtypes,
    scale=st.sampled_from([1.0, 3.0]),
    seed=seeds,
)
def test_sinkhorn_matches_reference_and_pot(N, M, eps, dtype, scale, seed):
    C = (torch.rand(N, M, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)
    a, b = marginal(N, seed + 1).to(dtype), marginal(M, seed + 2).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    kw = dict(eps=eps, n_iters=30, tol=0.0, return_plan=True)
    torch.testing.assert_close(
        O.sinkhorn(C, a, b, backend="native", **kw).plan.double(),
        O.sinkhorn(C, a, b, backend="torch", **kw).plan.double(),
        **tol,
    )
    got = O.sinkhorn(
        C,
        a,
        b,
        backend="native",
        eps=eps,
        n_iters=20000,
        tol=1e-12 if dtype == torch.float64 else 1e-6,
        return_plan=True,
    )
    # Both marginals fitted (the check runs after a full (f, g) update).
    torch.testing.assert_close(got.plan.double().sum(1), a.double(), **tol)
    torch.testing.assert_close(got.plan.double().sum(0), b.double(), **tol)
    pot = pytest.importorskip("ot")
    P = pot.bregman.sinkhorn_log(
        a.double().numpy(), b.double().numpy(), C.double().numpy(), eps, numItermax=20000, stopThr=1e-13
    )
    torch.testing.assert_close(got.plan.double(), torch.from_numpy(P), **tol)


@fast(15)
@given(N=st.integers(1, 5), M=st.integers(1, 5), value=st.sampled_from([math.nan, -math.inf]), seed=seeds)
def test_sinkhorn_nan_or_minus_inf_cost_raises(N, M, value, seed):
    C = torch.rand(N, M, generator=gen(seed), dtype=torch.float64)
    C[seed % N, seed % M] = value
    with pytest.raises(ValueError, match="NaN|-inf"):
        O.sinkhorn(C, marginal(N, 1), marginal(M, 2), eps=0.1, backend="native")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_sinkhorn_fits_rows_when_columns_start_fitted(backend):
    """Issue 13 item 1: the convergence check must not fire before the first row update."""
    C = torch.tensor([[5.0, 0.0], [0.0, 5.0], [3.0, 3.0]], dtype=torch.float64)
    b = torch.exp(-C).sum(0)
    a = torch.full((3,), float(b.sum()) / 3, dtype=torch.float64)
    out = O.sinkhorn(C, a, b, eps=1.0, return_plan=True, backend=backend)
    torch.testing.assert_close(out.plan.sum(1), a, rtol=1e-5, atol=1e-6)
    C = torch.tensor([[8.336076], [0.0]])
    a, b = torch.tensor([0.9881461, 0.01185385]), torch.tensor([1.0])
    out = O.sinkhorn(C, a, b, eps=0.01, return_plan=True, backend=backend)
    torch.testing.assert_close(out.plan.sum(1), a, rtol=1e-4, atol=1e-6)


@fast(8)
@given(
    N=st.integers(1, 6),
    M=st.integers(1, 6),
    d=st.integers(1, 4),
    p=st.sampled_from([1, 2]),
    eps=st.sampled_from([0.1, 1.0]),
    debias=st.booleans(),
    seed=seeds,
)
def test_sinkhorn_distance_matches_reference(N, M, d, p, eps, debias, seed):
    x, y = randn((N, d), torch.float64, seed), randn((M, d), torch.float64, seed + 1)
    kw = dict(eps=eps, p=p, debias=debias, n_iters=30, tol=0.0)
    got = O.sinkhorn_distance(x, y, backend="native", **kw)
    exp = O.sinkhorn_distance(x, y, backend="torch", **kw)
    torch.testing.assert_close(got.value, exp.value, rtol=1e-7, atol=1e-9)


@fast(10)
@given(N=st.integers(1, 5), M=st.integers(1, 5), value=st.sampled_from([math.nan, math.inf, -math.inf]), seed=seeds)
def test_sinkhorn_distance_non_finite_points_raise(N, M, value, seed):
    x, y = randn((N, 2), torch.float64, seed), randn((M, 2), torch.float64, seed + 1)
    x[seed % N, seed % 2] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        O.sinkhorn_distance(x, y, eps=0.1, backend="native")


# ---- skip ---------------------------------------------------------------------------------------------


@fast(20)
@given(
    B=st.integers(0, 3),
    T=st.integers(0, 9),
    H=st.integers(1, 24),
    I=st.integers(1, 20),
    activation=st.sampled_from(["swiglu", "gelu", "gelu_tanh"]),
    norm=st.booleans(),
    bias=st.booleans(),
    keep_p=st.floats(0, 1),
    dtype=fdtypes,
    seed=seeds,
)
def test_skip_ffn_matches_reference(B, T, H, I, activation, norm, bias, keep_p, dtype, seed):
    G = 2 * I if activation == "swiglu" else I
    x = randn((B, T, H), dtype, seed)
    w1, w2 = randn((G, H), dtype, seed + 1, H**-0.5), randn((H, I), dtype, seed + 2, I**-0.5)
    nw = (torch.rand(H, generator=gen(seed + 3), dtype=torch.float64) + 0.5).to(dtype) if norm else None
    b1, b2 = (randn((G,), dtype, seed + 4), randn((H,), dtype, seed + 5)) if bias else (None, None)
    keep = torch.rand(B, T, generator=gen(seed + 6)) < keep_p
    y = alignops.skip_ffn(x, w1, w2, nw, keep=keep, b_gate_up=b1, b_down=b2, activation=activation, backend="native")
    exp = ref_skip.skip_ffn(x, w1, w2, nw, keep, b1, b2, activation)
    close(y, exp, dtype, 10)
    assert torch.equal(y[~keep], x[~keep])


# ---- wasserstein --------------------------------------------------------------------------------------


@fast(30)
@given(
    lead=st.sampled_from([(), (3,), (2, 1)]),
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    p=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    weighted=st.booleans(),
    ties=st.booleans(),
    dtype=fdtypes,
    scale=magnitudes,
    seed=seeds,
)
def test_wasserstein_1d_matches_reference_and_scipy(lead, n, m, p, weighted, ties, dtype, scale, seed):
    u, v = randn((*lead, n), dtype, seed, scale), randn((*lead, m), dtype, seed + 1, scale)
    if ties:  # repeated atoms, shared between u and v
        u, v = u.round(), v.round()
    uw = (torch.rand(u.shape, generator=gen(seed + 2), dtype=torch.float64) + 0.01).to(dtype) if weighted else None
    vw = (torch.rand(v.shape, generator=gen(seed + 3), dtype=torch.float64) + 0.01).to(dtype) if weighted else None
    got = alignops.wasserstein_1d(u, v, uw, vw, p, backend="native")
    exp = ref_w.wasserstein_1d(
        u.double(), v.double(), None if uw is None else uw.double(), None if vw is None else vw.double(), p
    )
    mag = (2 * scale + 1) ** p
    close(got, exp, dtype, mag * (1e-1 if dtype == torch.float32 else 1e-4))
    if p == 1.0 and lead == ():
        sps = pytest.importorskip("scipy.stats")
        theirs = sps.wasserstein_distance(
            u.double().numpy(),
            v.double().numpy(),
            None if uw is None else uw.double().numpy(),
            None if vw is None else vw.double().numpy(),
        )
        close(got, torch.tensor(theirs, dtype=torch.float64), dtype, mag * (1e-1 if dtype == torch.float32 else 1e-4))


@fast(15)
@given(
    n=st.integers(1, 7),
    m=st.integers(1, 7),
    which=st.sampled_from(["u", "v"]),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    seed=seeds,
)
def test_wasserstein_1d_non_finite_atoms(n, m, which, value, seed):
    """NaN or an infinite atom: NaN / inf out, or a clear error; never a finite distance."""
    u, v = randn((n,), torch.float64, seed), randn((m,), torch.float64, seed + 1)
    (u if which == "u" else v)[seed % (n if which == "u" else m)] = value
    out = nan_or_raises(lambda: alignops.wasserstein_1d(u, v, backend="native"), "wasserstein_1d")
    if out is not None:
        assert not torch.isfinite(out), f"a non-finite atom gave the finite distance {float(out)}"


@fast(15)
@given(n=st.integers(1, 7), m=st.integers(1, 7), seed=seeds)
def test_wasserstein_1d_nan_weight_raises(n, m, seed):
    u, v = randn((n,), torch.float64, seed), randn((m,), torch.float64, seed + 1)
    w = torch.rand(n, dtype=torch.float64, generator=gen(seed + 2))
    w[seed % n] = math.nan
    with pytest.raises(ValueError, match="weight"):
        alignops.wasserstein_1d(u, v, w, None, backend="native")


@fast(15)
@given(
    n=st.integers(1, 8),
    m=st.integers(1, 8),
    d=st.integers(1, 5),
    L=st.integers(1, 6),
    p=st.sampled_from([1.0, 2.0]),
    dtype=fdtypes,
    seed=seeds,
)
def test_sliced_wasserstein_matches_reference_and_pot(n, m, d, L, p, dtype, seed):
    X, Y = randn((n, d), dtype, seed), randn((m, d), dtype, seed + 1)
    th = alignops.wasserstein.random_projections(d, L, seed, dtype=dtype)
    got = alignops.sliced_wasserstein(X, Y, projections=th, p=p, backend="native")
    close(got, ref_w.sliced_wasserstein(X, Y, th, p), dtype, 10)
    pot = pytest.importorskip("ot")
    theirs = pot.sliced_wasserstein_distance(
        X.double().numpy(), Y.double().numpy(), n_projections=L, p=p, projections=th.double().numpy()
    )
    close(got, torch.tensor(float(theirs), dtype=torch.float64), dtype, 10)


@fast(10)
@given(n=st.integers(1, 6), d=st.integers(1, 4), seed=seeds)
def test_sliced_wasserstein_self_distance_has_zero_gradient(n, d, seed):
    X = randn((n, d), torch.float64, seed).requires_grad_()
    th = alignops.wasserstein.random_projections(d, 3, seed, dtype=torch.float64)
    out = alignops.sliced_wasserstein(X, X, projections=th)
    out.backward()
    assert float(out) == 0.0 and torch.equal(X.grad, torch.zeros_like(X))


@fast(15)
@given(lead=st.sampled_from([(), (2,)]), d=st.integers(1, 4), dtype=fdtypes, seed=seeds)
def test_gaussian_w2_matches_reference(lead, d, dtype, seed):
    A1, A2 = randn((*lead, d, d), torch.float64, seed), randn((*lead, d, d), torch.float64, seed + 1)
    S1 = (A1 @ A1.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=torch.float64)).to(dtype)
    S2 = (A2 @ A2.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=torch.float64)).to(dtype)
    mu1, mu2 = randn((*lead, d), dtype, seed + 2), randn((*lead, d), dtype, seed + 3)
    got = alignops.gaussian_w2(mu1, S1, mu2, S2)
    close(
        got,
        ref_w.gaussian_w2(mu1.double(), S1.double(), mu2.double(), S2.double()),
        dtype,
        1e3 if dtype == torch.float32 else 1e2,
    )


# ---- metrics / watermark / represent / rewards / objectives --------------------------------------------


@fast(15)
@given(n=st.integers(3, 30), ties=st.booleans(), scale=st.sampled_from([1.0, 1e-3, 1e6]), seed=seeds)
def test_pearson_spearman_match_scipy(n, ties, scale, seed):
    sps = pytest.importorskip("scipy.stats")
    x, y = randn((n,), torch.float64, seed, scale), randn((n,), torch.float64, seed + 1, scale)
    if ties:
        x, y = (x / scale).round(), (y / scale).round()
    for ours, theirs in ((alignops.metrics.pearson, sps.pearsonr), (alignops.metrics.spearman, sps.spearmanr)):
        got = ours(x, y).value
        if x.unique().numel() < 2 or y.unique().numel() < 2:
            assert got.isnan()
            continue
        exp = theirs(x.numpy(), y.numpy())[0]
        close(got, torch.tensor(float(exp), dtype=torch.float64), torch.float32)


@fast(15)
@given(
    N=st.integers(0, 5),
    V=st.integers(2, 50),
    width=st.integers(1, 3),
    gamma=st.sampled_from([0.1, 0.25, 0.5]),
    delta=st.sampled_from([0.0, 2.0]),
    key=st.integers(0, 2**40),
    seed=seeds,
)
def test_kgw_process_and_gumbel_sample_match_reference(N, V, width, gamma, delta, key, seed):
    logits = randn((N, V), torch.float32, seed, 3.0)
    context = torch.randint(0, V, (N, width), generator=gen(seed + 1))
    got = alignops.watermark.kgw_process(logits, context, key, gamma=gamma, delta=delta, backend="native")
    close(got, ref_wm.kgw_logits(logits, context, key, gamma, delta), torch.float32)
    tokens = alignops.watermark.gumbel_sample(logits, context, key, backend="native")
    assert torch.equal(tokens, ref_wm.gumbel_argmax(logits, context, key, 1.0))


@fast(15)
@given(
    n=st.integers(2, 12), d1=st.integers(1, 6), d2=st.integers(1, 6), debiased=st.booleans(), dtype=fdtypes, seed=seeds
)
def test_linear_cka_matches_reference(n, d1, d2, debiased, dtype, seed):
    if debiased and n < 4:
        n = 4
    X, Y = randn((n, d1), dtype, seed), randn((n, d2), dtype, seed + 1)
    close(alignops.linear_cka(X, Y, debiased=debiased), ref_rep.linear_cka(X.double(), Y.double(), debiased), dtype, 10)


@fast(15)
@given(B=st.integers(1, 5), N=st.integers(1, 6), nan_at=st.one_of(st.none(), st.integers(0, 29)), seed=seeds)
def test_best_of_n_matches_argmax(B, N, nan_at, seed):
    r = randn((B, N), torch.float64, seed)
    if nan_at is not None:
        r.view(-1)[nan_at % (B * N)] = math.nan
    out = nan_or_raises(lambda: alignops.rewards.best_of_n(r), "best_of_n")
    if out is None:
        return
    # torch.argmax treats NaN as the maximum (NaN propagates to the selected value).
    assert torch.equal(out.indices, r.argmax(-1))
    assert torch.equal(out.values.isnan(), r.isnan().any(-1))


@fast(20)
@given(
    B=st.integers(0, 8),
    beta=st.sampled_from([0.05, 0.5, 3.0]),
    lengths=st.booleans(),
    dtype=fdtypes,
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=seeds,
)
def test_orpo_loss_matches_reference(B, beta, lengths, dtype, scale, seed):
    pc = -randn((B,), dtype, seed, scale).abs() - 1e-3
    pr = -randn((B,), dtype, seed + 1, scale).abs() - 1e-3
    nc = torch.randint(1, 30, (B,), generator=gen(seed + 2)) if lengths else None
    nr = torch.randint(1, 30, (B,), generator=gen(seed + 3)) if lengths else None
    got = alignops.orpo_loss(
        pc, pr, beta=beta, chosen_lengths=nc, rejected_lengths=nr, compute_nll_loss=False, reduction="none"
    )
    exp = ref_obj.orpo_loss(pc.double(), pr.double(), beta, nc, nr)
    close(got.log_odds_chosen, exp[2], dtype, 10 * scale)
    close(got.loss, exp[1], dtype, 10 * scale)


@fast(20)
@given(n=st.integers(0, 20), dtype=fdtypes, seed=seeds)
def test_log1mexp_matches_float64_formula(n, dtype, seed):
    x = -(randn((n,), torch.float64, seed, 10).abs() + 1e-6)
    got = alignops.log1mexp(x.to(dtype))
    exp = torch.log(-torch.expm1(x.to(dtype).double()))
    close(got, exp, dtype, 1)


@fast(10)
@given(x=st.floats(1e-30, 1e30), dtype=fdtypes)
def test_log1mexp_positive_argument_is_not_a_number(x, dtype):
    """Issue 13 item 10: log(1 - e^x) has no real value for x > 0 (it returned log(tiny) = -87.3)."""
    out = nan_or_raises(lambda: alignops.log1mexp(torch.tensor([x], dtype=dtype)), "log1mexp")
    assert out is None or out.isnan().all()
