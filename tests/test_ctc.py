"""ctc family on the CPU: forced_align vs the reference, torchaudio and a brute-force fp64 Viterbi; memory
modes, the star state, infeasible rows, bad input, opcheck, compile; token_spans vs torchaudio."""

import itertools
import math

import pytest
import torch

import alignops
from alignops import ctc
from alignops.reference import ctc as ref


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


def random_batch(B, T, C, L, blank=0, dtype=torch.float32, peaky=False, repeat_rate=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    if peaky:
        logits = logits * 6
        logits[..., blank] += 4
    lp = logits.log_softmax(-1).to(dtype)
    others = torch.tensor([c for c in range(C) if c != blank])
    targets = others[torch.randint(0, len(others), (B, L), generator=g)]
    if repeat_rate > 0:
        rep = torch.rand(B, L, generator=g) < repeat_rate
        rep[:, 0] = False
        for j in range(1, L):
            targets[:, j] = torch.where(rep[:, j], targets[:, j - 1], targets[:, j])
    target_lengths = torch.randint(max(0, L // 2), L + 1, (B,), generator=g)
    need = target_lengths + ref.repeats(targets, target_lengths)
    input_lengths = torch.minimum(torch.full((B,), T), need + torch.randint(0, T, (B,), generator=g))
    input_lengths = torch.maximum(input_lengths, need)
    return lp, targets, input_lengths, target_lengths


def collapse(path, blank):
    out, prev = [], None
    for c in path:
        if c != prev and c != blank:
            out.append(c)
        prev = c
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blank", [0, 3])
def test_matches_reference_varlen(cpu_capability, dtype, blank):
    lp, tg, il, tl = random_batch(6, 57, 7, 19, blank=blank, dtype=dtype, repeat_rate=0.3)
    paths, scores = ctc.forced_align(lp, tg, il, tl, blank=blank)
    rp, rs, ok = ref.forced_align(lp, tg, il, tl, blank)
    assert ok.all()
    assert torch.equal(paths, rp)
    assert torch.equal(scores, rs)
    assert scores.dtype == dtype and paths.dtype == torch.int64
    for b in range(6):
        assert collapse(paths[b, : il[b]].tolist(), blank) == tg[b, : tl[b]].tolist()
        assert (paths[b, il[b] :] == -1).all() and (scores[b, il[b] :] == 0).all()


@pytest.mark.parametrize("interval", [1, 2, 7, 56, 57, None])
def test_checkpointed_equals_full(cpu_capability, interval):
    lp, tg, il, tl = random_batch(5, 57, 9, 15, repeat_rate=0.2, seed=3)
    full = ctc.forced_align(lp, tg, il, tl)
    ck = ctc.forced_align(lp, tg, il, tl, memory="checkpointed", checkpoint_interval=interval)
    assert torch.equal(full[0], ck[0]) and torch.equal(full[1], ck[1])


def test_tight_inputs_T_equals_L_plus_repeats():
    tg = torch.tensor([[1, 1, 2, 2, 2, 3]])
    T = 6 + 3
    lp = torch.randn(1, T, 5).log_softmax(-1)
    paths, _ = ctc.forced_align(lp, tg)
    assert paths[0].tolist() == [1, 0, 1, 2, 0, 2, 0, 2, 3]  # the only path that fits


def brute_force_best(lp, targets, blank):
    """max over every frame-level labelling that collapses to targets of the summed log-probs (fp64)."""
    T, C = lp.shape
    best = -math.inf
    for labels in itertools.product(range(C), repeat=T):
        if collapse(labels, blank) == targets:
            best = max(best, sum(float(lp[t, c]) for t, c in enumerate(labels)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_optimal_vs_brute_force_fp64(seed):
    g = torch.Generator().manual_seed(seed)
    T, C = 7, 3
    lp = torch.randn(T, C, generator=g, dtype=torch.float64).log_softmax(-1)
    L = int(torch.randint(1, 4, (), generator=g))
    tg = torch.randint(1, C, (L,), generator=g)
    paths, scores = ctc.forced_align(lp[None], tg[None], on_infeasible="skip")
    best = brute_force_best(lp, tg.tolist(), 0)
    if best == -math.inf:
        assert (paths == -1).all()
        return
    assert collapse(paths[0].tolist(), 0) == tg.tolist()
    assert math.isclose(float(scores.sum()), best, rel_tol=0, abs_tol=1e-12)


@pytest.mark.parametrize("peaky", [False, True])
@pytest.mark.parametrize("blank", [0, 4])
def test_matches_torchaudio(peaky, blank):
    F = pytest.importorskip("torchaudio.functional")
    lp, tg, il, tl = random_batch(8, 80, 6, 25, blank=blank, peaky=peaky, repeat_rate=0.25, seed=7)
    paths, scores = ctc.forced_align(lp, tg, il, tl, blank=blank)
    for b in range(8):
        T, L = int(il[b]), int(tl[b])
        ta_paths, ta_scores = F.forced_align(
            lp[b : b + 1, :T].contiguous(),
            tg[b : b + 1, :L].contiguous(),
            torch.tensor([T]),
            torch.tensor([L]),
            blank=blank,
        )
        assert torch.equal(paths[b, :T], ta_paths[0].long())
        assert torch.equal(scores[b, :T], ta_scores[0])


def test_better_than_or_equal_to_torchaudio_on_long_input():
    """torchaudio's band can miss the optimum on long inputs; our path is never worse (fp64 sums)."""
    F = pytest.importorskip("torchaudio.functional")
    lp, tg, _, _ = random_batch(1, 20000, 32, 6000, seed=1)
    paths, scores = ctc.forced_align(lp, tg)
    ta_paths, ta_scores = F.forced_align(lp, tg, blank=0)
    assert collapse(ta_paths[0].tolist(), 0) == tg[0].tolist() == collapse(paths[0].tolist(), 0)
    assert scores.double().sum() >= ta_scores.double().sum()


def test_star_token_matches_reference_and_absorbs_extra_speech():
    B, T, C = 3, 60, 6
    lp, tg, il, tl = random_batch(B, T, C, 12, seed=5)
    star = C
    tg[:, 0] = star  # a wildcard at the start of every transcript
    paths, scores = ctc.forced_align(lp, tg, il, tl, star_token=star, star_penalty=-0.5)
    masked = lp.index_fill(2, torch.tensor([0]), float("-inf"))
    star_scores = masked.amax(2) - 0.5
    rp, rs, ok = ref.forced_align(lp, tg, il, tl, 0, star_scores, star)
    assert ok.all() and torch.equal(paths, rp) and torch.equal(scores, rs)
    assert (paths == star).any(1).all()
    given = ctc.forced_align(lp, tg, il, tl, star_token=star, star_scores=star_scores)
    assert torch.equal(given[0], paths)
    const = ctc.forced_align(lp, tg, il, tl, star_token=star, star_scores="constant", star_penalty=-1.0)
    rp2, _, _ = ref.forced_align(lp, tg, il, tl, 0, torch.full((B, T), -1.0), star)
    assert torch.equal(const[0], rp2)


def test_infeasible_rows_raise_or_skip():
    lp = torch.randn(2, 4, 4).log_softmax(-1)
    tg = torch.tensor([[1, 2, 3], [1, 1, 1]])  # row 1 needs 3 + 2 repeats = 5 frames
    with pytest.raises(ValueError, match=r"no alignment fits rows \[1\]"):
        ctc.forced_align(lp, tg)
    paths, scores = ctc.forced_align(lp, tg, on_infeasible="skip")
    assert (paths[1] == -1).all() and torch.isinf(scores[1]).all() and (scores[1] < 0).all()
    assert collapse(paths[0].tolist(), 0) == [1, 2, 3]
    neg = torch.full((1, 4, 3), float("-inf"))
    with pytest.raises(ValueError, match="finite"):
        ctc.forced_align(neg, torch.tensor([[1]]))


def test_empty_targets_and_empty_batch():
    lp = torch.randn(2, 6, 4).log_softmax(-1)
    paths, scores = ctc.forced_align(lp, torch.zeros(2, 0, dtype=torch.long))
    assert (paths == 0).all()
    torch.testing.assert_close(scores, lp[..., 0])
    p, s = ctc.forced_align(torch.randn(0, 6, 4), torch.zeros(0, 3, dtype=torch.long))
    assert p.shape == (0, 6) and s.shape == (0, 6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=torch.tensor([[1, 0, 2]])), r"targets\[0, 1\] is the blank id 0"),
        (dict(targets=torch.tensor([[1, 7, 2]])), r"targets\[0, 1\] = 7 is outside \[0, 5\)"),
        (dict(input_lengths=torch.tensor([31])), r"input_lengths\[0\] must be in \[0, 30\]"),
        (dict(input_lengths=torch.tensor([-1])), r"input_lengths\[0\] must be in \[0, 30\]"),
        (dict(target_lengths=torch.tensor([4])), r"target_lengths\[0\] must be in \[0, 3\]"),
        (dict(target_lengths=torch.tensor([-2])), r"target_lengths\[0\] must be in \[0, 3\]"),
        (dict(input_lengths=torch.tensor([3.0])), "input_lengths must be int64 or int32"),
        (dict(input_lengths=[30.0]), "input_lengths must be int64 or int32, got torch.float32"),
        (dict(input_lengths=torch.tensor([3, 4])), r"input_lengths must have shape \[1\], got \[2\]"),
        (dict(star_token=5, star_scores=torch.zeros(1, 29)), r"star_scores must have shape \[1, 30\], got \[1, 29\]"),
        (dict(targets=torch.tensor([[1.0, 2.0, 3.0]])), "targets must be int64 or int32"),
        (dict(log_probs=torch.randn(1, 30, 5).int()), "log_probs must be float32, float64, float16 or bfloat16"),
        (dict(log_probs=torch.randn(30, 5)), r"log_probs must be a 3-D tensor \[B, T, C\]"),
        (dict(targets=torch.tensor([[1, 2, 3]] * 2)), "targets must have the batch size of log_probs"),
        (dict(blank=5), r"blank must be in \[0, 5\)"),
        (dict(memory="band"), "memory must be one of"),
        (dict(input_lengths=torch.tensor([2])), r"no alignment fits rows \[0\]"),
    ],
)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_input(kwargs, match, backend):
    """The same checks and messages on the C++ kernel and the reference (both run the op's C++ checks)."""
    args = dict(
        backend=backend,
        log_probs=torch.randn(1, 30, 5).log_softmax(-1),
        targets=torch.tensor([[1, 2, 3]]),
        input_lengths=None,
        target_lengths=None,
        blank=0,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ctc.forced_align(**args)


def test_reference_backend_checks_values_too():
    with pytest.raises(ValueError, match=r"targets\[0, 0\] is the blank id 0"):
        ctc.forced_align(torch.randn(1, 9, 4).log_softmax(-1), torch.tensor([[0, 1]]), backend="torch")


def test_opcheck_and_compile():
    lp, tg, il, tl = random_batch(3, 20, 5, 6)
    for ck in (0, 4):
        torch.library.opcheck(torch.ops.alignops.forced_align, (lp, tg, il, tl, 0, None, -1, ck))
    star = torch.randn(3, 20)
    torch.library.opcheck(torch.ops.alignops.forced_align, (lp, tg, il, tl, 0, star, 9, 0))

    @torch.compile(fullgraph=True, backend="eager")
    def f(lp, tg, il, tl):
        return torch.ops.alignops.forced_align(lp, tg, il, tl, 0, None, -1, 0)

    out = f(lp, tg, il, tl)
    exp = torch.ops.alignops.forced_align(lp, tg, il, tl, 0, None, -1, 0)
    assert all(torch.equal(a, b) for a, b in zip(out, exp))


def test_int64_indexing_past_2_31_states_checkpointed():
    """30 minutes at 50 frames/s with 27000 characters: T * S = 4.9e9 trellis cells (torchaudio's CPU
    kernel indexes them with int and crashes). Checkpointed mode gives the full mode's path."""
    T, L, C = 90000, 27000, 30
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(1, T, C, generator=g).log_softmax(-1)
    tg = torch.randint(1, C, (1, L), generator=g)
    assert T * (2 * L + 1) > 2**31
    ck = ctc.forced_align(lp, tg, memory="checkpointed")
    full = ctc.forced_align(lp, tg)
    assert torch.equal(ck[0], full[0]) and torch.equal(ck[1], full[1])
    assert collapse(ck[0][0].tolist(), 0) == tg[0].tolist()


def test_token_spans_match_torchaudio_merge_tokens():
    F = pytest.importorskip("torchaudio.functional")
    lp, tg, il, tl = random_batch(4, 70, 6, 20, repeat_rate=0.3, seed=11)
    paths, scores = ctc.forced_align(lp, tg, il, tl)
    spans = ctc.token_spans(paths, scores.exp(), num_spans=tg.shape[1])
    assert torch.equal(spans.count, tl)
    for b in range(4):
        T = int(il[b])
        ta = F.merge_tokens(paths[b, :T], scores[b, :T].exp(), blank=0)
        assert len(ta) == int(tl[b])
        for k, s in enumerate(ta):
            assert (int(spans.token[b, k]), int(spans.start[b, k]), int(spans.end[b, k])) == (s.token, s.start, s.end)
            assert math.isclose(float(spans.score[b, k]), s.score, rel_tol=1e-6)
        assert torch.equal(spans.token[b, : tl[b]], tg[b, : tl[b]])
        assert (spans.start[b, tl[b] :] == -1).all() and spans.score[b, tl[b] :].isnan().all()


def test_token_spans_mean_logprob_and_bad_input():
    paths = torch.tensor([[0, 3, 3, 0, 2, -1]])
    scores = torch.tensor([[-0.1, -1.0, -2.0, -0.3, -0.5, 0.0]])
    spans = ctc.token_spans(paths, scores)
    assert spans.token.tolist() == [[3, 2]] and spans.start.tolist() == [[1, 4]] and spans.end.tolist() == [[3, 5]]
    torch.testing.assert_close(spans.score, torch.tensor([[-1.5, -0.5]]))
    with pytest.raises(ValueError, match="paths must be a"):
        ctc.token_spans(paths.float())
    with pytest.raises(ValueError, match="frame_scores must have the shape of paths"):
        ctc.token_spans(paths, scores[:, :3])


def test_public_api_exports():
    assert alignops.ctc.forced_align is ctc.forced_align


def test_word_spans_group_tokens():
    paths = torch.tensor([[0, 3, 3, 0, 2, 4, 4, 0, 1, -1]])
    scores = torch.tensor([[-0.1, -1.0, -2.0, -0.3, -0.5, -0.2, -0.4, -0.3, -0.7, 0.0]])
    spans = ctc.token_spans(paths, scores)
    words = ctc.word_spans(spans, torch.tensor([[2, 2, 0]]))
    assert words.start.tolist() == [[1, 5, -1]] and words.end.tolist() == [[5, 9, -1]]
    assert words.token.tolist() == [[3, 4, -1]] and words.count.tolist() == [2]
    # frame-weighted: word 0 = frames 1, 2, 4 (-1, -2, -0.5); word 1 = frames 5, 6, 8
    torch.testing.assert_close(words.score[0, :2], torch.tensor([-3.5 / 3, -1.3 / 3]))
    assert words.score[0, 2].isnan()
    with pytest.raises(ValueError, match="asks for more tokens than a row has spans"):
        ctc.word_spans(spans, torch.tensor([[3, 2]]))
    with pytest.raises(ValueError, match=r"word_lengths must be a \[B, W\]"):
        ctc.word_spans(spans, torch.tensor([2, 2]))


def test_padding_values_in_targets_are_ignored():
    lp = torch.randn(2, 12, 5).log_softmax(-1)
    tg = torch.tensor([[1, 2, -1, 99], [3, 3, 4, 1]])
    tl = torch.tensor([2, 4])
    for backend in ("native", "torch"):
        paths, _ = ctc.forced_align(lp, tg, None, tl, backend=backend)
        assert collapse(paths[0].tolist(), 0) == [1, 2] and collapse(paths[1].tolist(), 0) == [3, 3, 4, 1]


def test_token_spans_num_spans_too_small():
    with pytest.raises(ValueError, match="num_spans=1 is fewer than the spans of a row"):
        ctc.token_spans(torch.tensor([[1, 2, 3]]), num_spans=1)


def test_triton_backend_is_refused():
    with pytest.raises(RuntimeError, match="forced_align: there is no Triton kernel"):
        ctc.forced_align(torch.randn(1, 5, 3).log_softmax(-1), torch.tensor([[1]]), backend="triton")


def test_span_occupancy_is_the_mean_posterior_over_the_span():
    lp, tg, il, tl = random_batch(3, 40, 6, 10, peaky=True, seed=2)
    paths, scores = ctc.forced_align(lp, tg, il, tl)
    spans = ctc.token_spans(paths, scores, num_spans=tg.shape[1])
    post = ctc.ctc_posteriors(lp, tg, il, tl, output="tokens")
    occ = ctc.span_occupancy(spans, post.tokens)
    for b in range(3):
        for k in range(int(tl[b])):
            s, e = int(spans.start[b, k]), int(spans.end[b, k])
            expected = post.tokens[b, s:e, k].double().mean()
            torch.testing.assert_close(occ[b, k], expected)
        assert occ[b, tl[b] :].isnan().all()
    assert ((occ[~occ.isnan()] > 0) & (occ[~occ.isnan()] <= 1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_paths_in_the_targets_dtype(dtype, backend):
    # torchaudio.functional.forced_align returns the alignment in the dtype of its targets.
    lp = torch.randn(2, 7, 4).log_softmax(-1)
    paths, _ = ctc.forced_align(lp, torch.tensor([[1, 2], [3, 3]], dtype=dtype), backend=backend)
    assert paths.dtype == dtype


@pytest.mark.parametrize(
    "targets, match",
    [
        (torch.tensor([[0, 1]]), "targets\\[0, 0\\] is the blank id 0"),
        (torch.tensor([[1, 7]]), "targets\\[0, 1\\] = 7 is outside \\[0, 3\\)"),
    ],
)
def test_kernel_argument_errors_are_runtime_errors_too(targets, match):
    # torchaudio raises these as RuntimeError; the C++ check's ValueError comes back as an AlignopsError.
    with pytest.raises(RuntimeError, match=match) as info:
        ctc.forced_align(torch.randn(1, 5, 3).log_softmax(-1), targets, backend="native")
    assert isinstance(info.value, alignops.AlignopsError)


def test_negative_star_token_is_refused():
    # -1 is the kernel's "no star" sentinel: a negative star_token used to drop the wildcard silently.
    with pytest.raises(ValueError, match="star_token must be an id >= 0 .* got -1"):
        ctc.forced_align(torch.randn(1, 5, 3).log_softmax(-1), torch.tensor([[1, -1]]), star_token=-1)


def test_span_occupancy_of_fewer_frames_than_the_paths_is_refused():
    paths = torch.tensor([[0, 1, 1, 0, 2, 2, 0, 0]])
    spans = ctc.token_spans(paths)
    with pytest.raises(ValueError, match="token_occupancy has T = 4 frames but spans reach frame 6"):
        ctc.span_occupancy(spans, torch.rand(1, 4, 2))


def test_compile_fullgraph_with_on_infeasible_raise():
    """The default on_infeasible="raise" branched on the feasibility flags, a data-dependent guard that
    fullgraph=True refused (issue 13); compiled, the check is an assert in the graph."""
    f = torch.compile(lambda lp, t: alignops.ctc.forced_align(lp, t), fullgraph=True)
    lp = torch.randn(2, 12, 5).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [4, 4, 1]])
    paths, scores = f(lp, targets)
    want_paths, want_scores = alignops.reference.ctc.forced_align(
        lp, targets, torch.tensor([12, 12]), torch.tensor([3, 3]), 0, None, -1
    )[:2]
    torch.testing.assert_close(paths, want_paths.to(paths.dtype))
    torch.testing.assert_close(scores, want_scores)
    with pytest.raises(RuntimeError, match=r"forced_align: no alignment fits some rows \(on_infeasible='raise'\)"):
        f(torch.randn(1, 4, 5).log_softmax(-1), torch.tensor([[1, 1, 1]]))
