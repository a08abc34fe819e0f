"""alignops.ctc_segmentation vs the ctc-segmentation package (the oracle for segments and scores), the
pure-Python reference, both CPU capabilities; batching, prefixes, pseudo-forced alignment, writers,
opcheck, torch.compile, bad input."""

import functools
import io
import json
import logging

import numpy as np
import pytest
import torch

import alignops
from alignops import ctc_segmentation as cseg
from alignops.reference import ctc_segmentation as ref

cs = pytest.importorskip("ctc_segmentation")
logging.getLogger("ctc_segmentation").setLevel(logging.ERROR)


@pytest.fixture(params=["avx2", "default"])
def capability(request, monkeypatch):
    """Both compiled copies of the CPU trellis kernel (AVX2+FMA and portable)."""
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


def speech(seed, utts, V, *, frames_per_token=3, gap=(5, 30), noise=1.0, dtype=np.float32):
    """Synthetic CTC log-probs: each utterance spoken at about frames_per_token, blank-dominated gaps."""
    rng = np.random.default_rng(seed)
    frames, spans = [], []
    t = int(rng.integers(*gap))
    frames += [0] * t
    for u in utts:
        start = t
        for tok in u:
            frames.append(int(tok))
            pad = int(rng.integers(1, 2 * frames_per_token))
            frames += [0] * pad
            t += 1 + pad
        spans.append((start, t))
        g = int(rng.integers(*gap))
        frames += [0] * g
        t += g
    T = len(frames)
    logits = rng.standard_normal((T, V)) * noise
    logits[np.arange(T), frames] += 6.0
    lpz = torch.log_softmax(torch.tensor(logits), -1).numpy().astype(dtype)
    return lpz, spans


def random_problem(seed, dtype=np.float32, V=None, n_utt=None, noise=None):
    rng = np.random.default_rng(seed)
    V = V or int(rng.integers(4, 14))
    n_utt = n_utt or int(rng.integers(1, 6))
    utts = [rng.integers(1, V, size=int(rng.integers(1, 14))) for _ in range(n_utt)]
    lpz, _ = speech(
        seed, utts, V, noise=noise if noise is not None else float(rng.choice([0.5, 1.5, 3.0])), dtype=dtype
    )
    return lpz, utts


def package(lpz, ground_truth, **cfg):
    """The package's (timings in seconds, char_probs), or None where it raises."""
    config = cs.CtcSegmentationParameters(char_list=[str(i) for i in range(lpz.shape[1])], **cfg)
    try:
        timings, char_probs, _ = cs.ctc_segmentation(config, lpz, ground_truth)
    except (IndexError, AssertionError):
        return None
    return timings, char_probs


def token_gt(utts, V):
    config = cs.CtcSegmentationParameters(char_list=[str(i) for i in range(V)])
    return cs.prepare_token_list(config, utts)


def assert_same_as_package(out, b, pk, T, C):
    timings, char_probs = pk
    np.testing.assert_array_equal(out.timings[b, :C].numpy() * 0.025, timings)  # the package's seconds
    np.testing.assert_array_equal(out.char_probs[b, :T].numpy(), char_probs)


# ---- utterance_score ---------------------------------------------------------------------------------


def test_utterance_score_definition():
    cp = torch.arange(100, dtype=torch.float64) * -0.1  # decreasing: the last window is the lowest
    starts = torch.tensor([10, 10, 10, 50, 7])
    ends = torch.tensor([20, 40, 41, 50, 3])
    got = alignops.ctc.utterance_score(cp, starts, ends, window=30)
    # e - s <= n: the mean of the span; e - s = 31: only the window starting at s (the package's range
    # leaves the last one out); e <= s: -1e10.
    assert got[0] == cp[10:20].mean()
    assert got[1] == cp[10:40].mean()
    assert got[2] == cp[10:40].mean()
    assert got[3] == -1e10 and got[4] == -1e10
    assert (
        alignops.ctc.utterance_score(
            torch.full((60,), 0.5, dtype=torch.float64), torch.tensor([0]), torch.tensor([60])
        )[0]
        == 0.0
    )  # min(0, ...) clamps positive means


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_utterance_score_batched_matches_reference(dtype):
    cp = torch.randn(3, 257, dtype=dtype) - 1
    starts = torch.randint(0, 257, (3, 11))
    ends = (starts + torch.randint(-5, 120, (3, 11))).clamp(max=257)
    got = alignops.ctc.utterance_score(cp, starts, ends, window=30)
    want = ref.utterance_score(cp, starts, ends, window=30)
    assert got.dtype == torch.float64 and got.shape == (3, 11)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        alignops.ctc.utterance_score(cp, starts, ends, window=7, backend="torch"),
        alignops.ctc.utterance_score(cp, starts, ends, window=7),
        rtol=1e-12,
        atol=1e-12,
    )


# ---- ctc_segmentation vs the package --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_columns", [-1, 3])
def test_ctc_segmentation_matches_package(seed, dtype, block_columns, capability):
    lpz, utts = random_problem(seed, dtype)
    gt, _ = token_gt(utts, lpz.shape[1])
    rng = np.random.default_rng(seed)
    cfg = dict(
        min_window_size=int(rng.choice([8000, 24, 60])),
        max_window_size=int(rng.choice([100000, 300])),
        blank_transition_cost_zero=bool(seed % 3 == 0),
        preamble_transition_cost_zero=bool(seed % 4 != 1),
        backtrack_from_max_t=bool(seed % 5 == 2),
    )
    pk = package(lpz, gt, **cfg)
    kw = dict(cfg, block_columns=block_columns)  # 3: the checkpointed table, refilled block by block
    if pk is None:
        with pytest.raises(ValueError, match="backtracking failed|audio is shorter"):
            cseg.ctc_segmentation(torch.from_numpy(lpz), torch.from_numpy(gt), **kw)
        return
    out = cseg.ctc_segmentation(torch.from_numpy(lpz), torch.from_numpy(gt), **kw)
    assert_same_as_package(out, 0, pk, lpz.shape[0], gt.shape[0])


def test_window_recentring_and_retries_match_package(capability):
    # A long recording with a small window: re-centring on every position, and windows that fail
    # and double (the package's IndexError path).
    hits = 0
    for seed in range(20):
        lpz, utts = random_problem(100 + seed, V=6, n_utt=8, noise=1.0)
        gt, _ = token_gt(utts, 6)
        for window in (16, 40):
            pk = package(lpz, gt, min_window_size=window)
            if pk is None:
                continue
            for block_columns in (0, 7):
                out = cseg.ctc_segmentation(
                    torch.from_numpy(lpz), torch.from_numpy(gt), min_window_size=window, block_columns=block_columns
                )
                assert_same_as_package(out, 0, pk, lpz.shape[0], gt.shape[0])
            hits += int(out.window_sizes[0] > window)
    assert hits > 0  # some problems needed a doubled window


@pytest.mark.parametrize("replace_spaces", [False, True])
def test_multi_character_symbols_match_package(replace_spaces, capability):
    # prepare_text with multi-character entries in the char list: S = 3 spans per position.
    chars = ["_", "a", "b", "c", "d", "ab", "bc", "cd", "abc", "e"]
    for seed in range(10):
        rng = np.random.default_rng(seed)
        text = ["".join(rng.choice(list("abcde "), size=int(rng.integers(2, 12)))) for _ in range(3)]
        config = cs.CtcSegmentationParameters(
            char_list=chars, replace_spaces_with_blanks=replace_spaces, min_window_size=int(rng.choice([8000, 50]))
        )
        gt, _ = cs.prepare_text(config, text)
        assert gt.shape[1] == 3
        T = int(rng.integers(gt.shape[0] + 5, 200))
        lpz = torch.log_softmax(torch.randn(T, len(chars), dtype=torch.float64) * 2, -1).numpy()
        try:
            timings, char_probs, _ = cs.ctc_segmentation(config, lpz, gt)
        except IndexError:
            continue
        for block_columns in (0, 2, 5):  # S = 3: blocks narrower than S widen to S
            out = cseg.ctc_segmentation(
                torch.from_numpy(lpz),
                torch.from_numpy(gt),
                min_window_size=config.min_window_size,
                block_columns=block_columns,
            )
            assert_same_as_package(out, 0, (timings, char_probs), T, gt.shape[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_log_probs_match_package(dtype):
    # log(0) entries: -inf emissions, infinite backtrace deltas; still the package's result.
    for seed in range(8):
        rng = np.random.default_rng(700 + seed)
        lpz = torch.log_softmax(torch.randn(int(rng.integers(40, 150)), 6, dtype=torch.float64) * 3, -1).numpy()
        lpz = lpz.astype(dtype)
        lpz[rng.random(lpz.shape) < 0.2] = -np.inf
        utts = [rng.integers(1, 6, size=int(rng.integers(1, 8))) for _ in range(3)]
        gt, _ = token_gt(utts, 6)
        pk = package(lpz, gt, min_window_size=30)
        assert pk is not None  # seeds whose problems align
        for block_columns in (0, 3):
            out = cseg.ctc_segmentation(
                torch.from_numpy(lpz), torch.from_numpy(gt), min_window_size=30, block_columns=block_columns
            )
            assert_same_as_package(out, 0, pk, lpz.shape[0], gt.shape[0])


def test_empty_batches_and_half_precision_inputs():
    none = torch.zeros(0, dtype=torch.int64)
    out = torch.ops.alignops.ctc_segmentation(
        torch.zeros(0, 5, 3), none, torch.zeros(0, 3, 1, dtype=torch.int64), none, 0, 8000, 100000, 2, False, -1
    )
    assert [tuple(o.shape) for o in out] == [(0, 3), (0, 5), (0, 5), (0,)]
    assert alignops.ctc.utterance_score(
        torch.zeros(2, 10), torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64)
    ).shape == (2, 0)
    # bf16 / fp16 log-probs are read as fp32: the package's result on the same (widened) values.
    lpz, utts = random_problem(800, V=8, n_utt=3)
    gt, _ = token_gt(utts, 8)
    for half in (torch.bfloat16, torch.float16):
        x = torch.from_numpy(lpz).to(half)
        pk = package(x.float().numpy(), gt)
        out = cseg.ctc_segmentation(x, torch.from_numpy(gt))
        assert_same_as_package(out, 0, pk, lpz.shape[0], gt.shape[0])


def test_batch_of_problems_matches_package_one_by_one():
    problems = [random_problem(200 + i, np.float32, V=9) for i in range(7)]
    lpzs = [torch.from_numpy(lpz) for lpz, _ in problems]
    gts = [torch.from_numpy(token_gt(u, 9)[0]) for _, u in problems]
    out = cseg.ctc_segmentation(lpzs, gts, min_window_size=50)
    for b, (lpz, _) in enumerate(problems):
        pk = package(lpz, gts[b].numpy(), min_window_size=50)
        assert_same_as_package(out, b, pk, lpz.shape[0], gts[b].shape[0])
        # padding past the lengths stays untouched
        assert (out.states[b, lpz.shape[0] :] == cseg.NOT_ON_PATH).all()
    # segments of the whole batch at once (ragged utterance counts), as the package's one by one
    begins = [token_gt(u, 9)[1] for _, u in problems]
    seg = cseg.utterance_segments(out.timings, out.char_probs, begins)
    for b, (lpz, utts) in enumerate(problems):
        config = cs.CtcSegmentationParameters(char_list=[str(i) for i in range(9)])
        pk = package(lpz, gts[b].numpy(), min_window_size=50)
        want = cs.determine_utterance_segments(config, begins[b], pk[1], pk[0], utts)
        U = len(utts)
        assert list(zip(seg.start[b, :U].tolist(), seg.end[b, :U].tolist(), seg.score[b, :U].tolist())) == [
            tuple(float(v) for v in w) for w in want
        ]
        assert seg.score[b, U:].isnan().all() and (seg.start_frame[b, U:] == -1).all()


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_package_and_native(seed):
    lpz, utts = random_problem(300 + seed, np.float64 if seed % 2 else np.float32)
    gt, _ = token_gt(utts, lpz.shape[1])
    pk = package(lpz, gt, min_window_size=40)
    assert pk is not None  # seeds whose problems align
    ref_out = cseg.ctc_segmentation(torch.from_numpy(lpz), torch.from_numpy(gt), min_window_size=40, backend="torch")
    assert_same_as_package(ref_out, 0, pk, lpz.shape[0], gt.shape[0])
    nat = cseg.ctc_segmentation(torch.from_numpy(lpz), torch.from_numpy(gt), min_window_size=40)
    assert torch.equal(nat.states, ref_out.states) and torch.equal(nat.window_sizes, ref_out.window_sizes)


@pytest.mark.parametrize("seed", range(6))
def test_utterance_segments_match_package(seed):
    lpz, utts = random_problem(400 + seed, V=10, n_utt=5)
    config = cs.CtcSegmentationParameters(
        char_list=[str(i) for i in range(10)], index_duration=0.02, score_min_mean_over_L=int(4 + 7 * seed)
    )
    gt, begins = cs.prepare_token_list(config, utts)
    timings, char_probs, _ = cs.ctc_segmentation(config, lpz, gt)
    want = cs.determine_utterance_segments(config, begins, char_probs, timings, utts)
    out = cseg.ctc_segmentation(torch.from_numpy(lpz), torch.from_numpy(gt))
    seg = cseg.utterance_segments(
        out.timings[0], out.char_probs[0], begins, index_duration=0.02, window=config.score_min_mean_over_L
    )
    got = list(zip(seg.start.tolist(), seg.end.tolist(), seg.score.tolist()))
    assert got == [tuple(float(v) for v in s) for s in want]  # bit for bit, scores included
    seg_ref = cseg.utterance_segments(
        out.timings[0],
        out.char_probs[0],
        begins,
        index_duration=0.02,
        window=config.score_min_mean_over_L,
        backend="torch",
    )
    torch.testing.assert_close(seg_ref.score, seg.score, rtol=1e-12, atol=1e-12)


def test_prefixes_equal_package_on_each_prefix():
    lpz, utts = random_problem(500, V=7, n_utt=5, noise=1.0)
    gt, begins = token_gt(utts, 7)
    T = lpz.shape[0]
    ends = torch.tensor([begins[1:]])
    tim, cp, _, ok, table = torch.ops.alignops.ctc_segmentation_prefixes(
        torch.from_numpy(lpz)[None],
        torch.tensor([T]),
        torch.from_numpy(gt)[None],
        torch.tensor([gt.shape[0]]),
        ends,
        0,
        2,
        False,
        None,
        None,
        True,
    )
    for j, k in enumerate(range(1, len(utts) + 1)):
        gt_k, _ = token_gt(utts[:k], 7)
        pk = package(lpz, gt_k, min_window_size=T)
        assert ok[0, j]
        np.testing.assert_array_equal(tim[0, j, : gt_k.shape[0]].numpy() * 0.025, pk[0])
        np.testing.assert_array_equal(cp[0, j].numpy(), pk[1])
    # The full-window table is the reference's, column by column.
    ref_table, _, _ = ref.fill_table(torch.from_numpy(lpz), torch.from_numpy(gt), T, 0, 2)
    assert torch.equal(table[0], ref_table.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefixes_extend_a_shorter_table(dtype):
    # A grown window: the table of lpz[:T1] extended by rows T1..T equals a fresh fill of lpz[:T], and
    # the prefixes that fit only the longer lpz (the ground truth outgrows lpz[:T1]) are backtracked.
    lpz, utts = random_problem(510, dtype, V=7, n_utt=5, noise=1.0)
    gt, begins = token_gt(utts, 7)
    T = lpz.shape[0]
    T1 = begins[3] + 5
    x, g = torch.from_numpy(lpz)[None], torch.from_numpy(gt)[None]
    C = torch.tensor([gt.shape[0]])
    ends_short = torch.tensor([[b if b + 1 <= T1 else -1 for b in begins[1:]]])
    _, _, _, ok1, t1 = torch.ops.alignops.ctc_segmentation_prefixes(
        x[:, :T1], torch.tensor([T1]), g, C, ends_short, 0, 2, False, None, None, True
    )
    assert ok1[0, :3].all() and not ok1[0, 4]
    ends = torch.tensor([begins[1:]])
    fresh = torch.ops.alignops.ctc_segmentation_prefixes(
        x, torch.tensor([T]), g, C, ends, 0, 2, False, None, None, True
    )
    grown = torch.ops.alignops.ctc_segmentation_prefixes(
        x, torch.tensor([T]), g, C, ends, 0, 2, False, t1, torch.tensor([T1]), True
    )
    for a, b in zip(fresh, grown):
        assert torch.equal(a, b)
    pk = package(lpz, gt, min_window_size=T)
    np.testing.assert_array_equal(grown[1][0, -1].numpy(), pk[1])


# ---- pseudo-forced alignment -------------------------------------------------------------------------


def long_recording(seed=7, n_utt=30, V=12, missing=(5, 17)):
    """A recording of n_utt utterances, and a transcript that also holds utterances never spoken."""
    rng = np.random.default_rng(seed)
    spoken = [rng.integers(1, V, size=int(rng.integers(8, 25))) for _ in range(n_utt)]
    lpz, spans = speech(seed, spoken, V, noise=0.7, gap=(20, 60))
    transcript, truth = [], []
    for i, u in enumerate(spoken):
        if i in missing:
            transcript.append(rng.integers(1, V, size=12))  # caption text that was never said
            truth.append(None)
        transcript.append(u)
        truth.append(spans[i])
    return torch.from_numpy(lpz), transcript, truth


def test_pseudo_forced_align_finds_spoken_utterances():
    lpz, transcript, truth = long_recording()
    res = cseg.pseudo_forced_align(lpz, transcript, index_duration=0.025, group_size=6, max_window=1500)
    assert len(res.segments) == len(transcript)
    kept = {s.index for s in res.kept()}
    spoken = {i for i, t in enumerate(truth) if t is not None}
    assert len(kept & spoken) >= 0.9 * len(spoken)
    assert not kept - spoken  # the never-spoken captions are filtered out
    for s in res.kept():
        t0, t1 = truth[s.index]
        assert abs(s.start / 0.025 - t0) < 30 and abs(s.end / 0.025 - t1) < 30
    assert res.anchors == sorted(res.anchors) and res.anchors[0] == 0
    # one fill per step and window: fewer fills than the backtraces the drops needed
    assert res.fills < len(transcript)


def test_pseudo_forced_align_step_is_the_package_on_the_chunk():
    lpz, transcript, _ = long_recording(n_utt=6, missing=())
    res = cseg.pseudo_forced_align(lpz, transcript, group_size=3, window=600, max_window=600)
    first = res.segments[:3]
    assert all(s.aligned for s in first) and res.anchors[0] == 0
    k = sum(1 for s in first if s.aligned)
    chunk = lpz[: min(600, lpz.shape[0])].numpy()
    config = cs.CtcSegmentationParameters(char_list=[str(i) for i in range(12)], min_window_size=8000)
    gt, begins = cs.prepare_token_list(config, transcript[:k])
    timings, char_probs, _ = cs.ctc_segmentation(config, chunk, gt)
    want = cs.determine_utterance_segments(config, begins, char_probs, timings, transcript[:k])
    assert [(s.start, s.end, s.score) for s in first[:k]] == [tuple(float(v) for v in w) for w in want]


def test_pseudo_forced_align_backends_agree_and_writers():
    lpz, transcript, _ = long_recording(n_utt=8, missing=(3,))
    kw = dict(group_size=4, max_window=900, texts=["x" * 40] * len(transcript))
    nat = cseg.pseudo_forced_align(lpz, transcript, **kw)
    tor = cseg.pseudo_forced_align(lpz, transcript, backend="torch", **kw)
    assert [(s.start, s.end, s.aligned, s.kept) for s in nat.segments] == [
        (s.start, s.end, s.aligned, s.kept) for s in tor.segments
    ]
    np.testing.assert_allclose([s.score for s in nat.segments], [s.score for s in tor.segments], rtol=1e-12)
    f = io.StringIO()
    cseg.write_kaldi_segments(nat, f, "rec", utt_ids=[f"u{i}" for i in range(len(transcript))])
    lines = f.getvalue().splitlines()
    assert len(lines) == len(nat.kept()) > 0
    uid, rec, start, end = lines[0].split()
    assert rec == "rec" and uid.startswith("u") and float(end) > float(start)
    f = io.StringIO()
    cseg.write_ctm(nat, f, "rec", [f"t{i}" for i in range(12)], transcript)
    ctm = f.getvalue().splitlines()
    assert len(ctm) == sum(len(transcript[s.index]) for s in nat.kept())
    assert all(len(line.split()) == 5 and line.split()[4].startswith("t") for line in ctm)
    data = json.loads(cseg.to_json(nat))
    assert len(data["segments"]) == len(transcript) and data["anchors"][0] == 0


def test_pseudo_forced_align_grown_windows_extend_the_table():
    # A first window far too short: every step grows it; the native loop extends its table, the torch
    # backend refills, and both give the same alignment.
    lpz, transcript, truth = long_recording(n_utt=10, missing=(4,))
    kw = dict(group_size=4, window=40, max_window=1200, growth=1.5)
    nat = cseg.pseudo_forced_align(lpz, transcript, **kw)
    tor = cseg.pseudo_forced_align(lpz, transcript, backend="torch", **kw)
    assert nat.fills > len(nat.anchors)  # windows grew
    assert [(s.start, s.end, s.aligned, s.kept, s.token_frames) for s in nat.segments] == [
        (s.start, s.end, s.aligned, s.kept, s.token_frames) for s in tor.segments
    ]
    np.testing.assert_allclose([s.score for s in nat.segments], [s.score for s in tor.segments], rtol=1e-12)
    assert sum(s.kept for s in nat.segments) >= 8


def test_pseudo_forced_align_equals_the_loop_driven_by_the_package():
    # Every step aligned by the package instead (one package call per candidate drop and window size, the
    # bench's baseline): the same segments, scores and token frames, windows growing included.
    from alignops.bench.bench_ctc_segmentation import V, _with_package_steps, recording

    lpz, utts = recording(90.0, 3)
    transcript = []
    for i, u in enumerate(utts):
        transcript += [u, torch.randint(1, V, (40,))] if i % 4 == 1 else [u]
    run = lambda: cseg.pseudo_forced_align(lpz, transcript, index_duration=0.02, window=150, group_size=5)  # noqa
    ours, theirs = run(), _with_package_steps(cs, run)
    assert ours.fills > len(ours.anchors)  # windows grew
    assert [(s.start, s.end, s.score, s.aligned, s.kept, s.token_frames) for s in ours.segments] == [
        (s.start, s.end, s.score, s.aligned, s.kept, s.token_frames) for s in theirs.segments
    ]
    assert sum(s.kept for s in ours.segments) > 0


def test_short_utterances_use_the_stricter_threshold():
    lpz, transcript, _ = long_recording(n_utt=6, missing=())
    loose = cseg.pseudo_forced_align(lpz, transcript, texts=["x" * 40] * 6, threshold=-50.0, short_threshold=0.0)
    strict = cseg.pseudo_forced_align(lpz, transcript, texts=["x" * 10] * 6, threshold=-50.0, short_threshold=0.0)
    assert all(s.kept for s in loose.segments)
    assert not any(s.kept for s in strict.segments)  # scores are < 0, short ones need >= 0


# ---- ops: opcheck, compile, bad input ----------------------------------------------------------------


def test_opcheck():
    lpz, utts = random_problem(600, V=6, n_utt=2)
    gt, begins = token_gt(utts, 6)
    args = (
        torch.from_numpy(lpz)[None],
        torch.tensor([lpz.shape[0]]),
        torch.from_numpy(gt)[None],
        torch.tensor([gt.shape[0]]),
    )
    torch.library.opcheck(torch.ops.alignops.ctc_segmentation.default, (*args, 0, 8000, 100000, 2, False, -1))
    torch.library.opcheck(torch.ops.alignops.ctc_segmentation.default, (*args, 0, 8000, 100000, 2, False, 2))
    torch.library.opcheck(
        torch.ops.alignops.ctc_segmentation_prefixes.default,
        (*args, torch.tensor([begins[1:]]), 0, 2, False, None, None, False),
    )
    _, _, _, _, table = torch.ops.alignops.ctc_segmentation_prefixes(
        *args, torch.tensor([begins[1:]]), 0, 2, False, None, None, True
    )
    torch.library.opcheck(
        torch.ops.alignops.ctc_segmentation_prefixes.default,
        (*args, torch.tensor([begins[1:]]), 0, 2, False, table[:, :, :20], torch.tensor([20]), True),
    )
    torch.library.opcheck(
        torch.ops.alignops.ctc_segmentation_utterance_score.default,
        (
            torch.randn(2, 50, dtype=torch.float64),
            torch.tensor([[0, 3], [10, 5]]),
            torch.tensor([[40, 20], [50, 2]]),
            30,
        ),
    )


def test_utterance_score_compiles_fullgraph():
    cp = torch.randn(2, 90, dtype=torch.float64)
    s, e = torch.tensor([[0, 30], [5, 60]]), torch.tensor([[40, 50], [80, 90]])
    fn = torch.compile(
        lambda c, a, b: alignops.ctc.utterance_score(c, a, b, window=30) * 2, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(cp, s, e), alignops.ctc.utterance_score(cp, s, e, window=30) * 2)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_input(backend):
    lpz = torch.log_softmax(torch.randn(40, 5), -1)
    gt = torch.tensor([-1, 0, 1, 2, 0])
    run = lambda lp, g, **kw: cseg.ctc_segmentation(lp, g, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="audio is shorter than text"):
        run(lpz[:3], gt)
    with pytest.raises(ValueError, match=r"must be -1 or a token in \[0, 5\)"):
        run(lpz, torch.tensor([-1, 0, 7, 0]))
    with pytest.raises(ValueError, match="start-of-ground-truth marker"):
        run(lpz, torch.tensor([3, 0, 1, 0]))
    with pytest.raises(ValueError, match="blank must be in"):
        run(lpz, gt, blank=5)
    bad = lpz.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        run(bad, gt)
    with pytest.raises(ValueError, match="lpz must be float32 or float64"):
        run(lpz.to(torch.int64), gt)
    with pytest.raises(ValueError, match="ground_truth must"):
        run(lpz, gt[None, None, None])
    with pytest.raises(ValueError, match="lpz must be a"):
        run(lpz[0], gt)
    if backend == "native":
        with pytest.raises(ValueError, match="block_columns must be"):
            run(lpz, gt, block_columns=-2)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_utterance_score_spans_out_of_range(backend):
    # the reference indexes frames with the spans: they are checked by the op's value check first
    score = functools.partial(alignops.ctc.utterance_score, backend=backend)
    with pytest.raises(ValueError, match=r"utterance 0, 0: a non-empty span \[start, end\) must lie in \[0, T\] = "):
        score(torch.zeros(10), torch.tensor([2]), torch.tensor([11]))
    with pytest.raises(ValueError, match=r"utterance 1, 1: .* got \[-3, 4\)"):
        score(torch.zeros(2, 10), torch.tensor([[0, 0], [1, -3]]), torch.tensor([[5, 5], [2, 4]]))
    # check_values=False leaves the spans unread on the reference (the C++ kernel reads them on the host anyway)
    if backend == "torch":
        assert score(torch.zeros(10), torch.tensor([-2]), torch.tensor([1]), check_values=False).shape == (1,)
    # an empty span (end <= start) scores -1e10 wherever it points
    torch.testing.assert_close(
        score(torch.zeros(10, dtype=torch.float64), torch.tensor([20]), torch.tensor([-4])),
        torch.tensor([-1e10], dtype=torch.float64),
    )


def test_bad_input_ops_and_failure():
    with pytest.raises(ValueError, match="ends must have the shape of starts"):
        alignops.ctc.utterance_score(torch.zeros(10), torch.tensor([2]), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="window must be >= 1"):
        alignops.ctc.utterance_score(torch.zeros(10), torch.tensor([2]), torch.tensor([5]), window=0)
    with pytest.raises(ValueError, match="utt_begin_indices must lie in"):
        cseg.utterance_segments(torch.zeros(6, dtype=torch.int64), torch.zeros(20), [0, 5])
    prefixes = torch.ops.alignops.ctc_segmentation_prefixes
    one = (torch.zeros(1, 9, 3), torch.tensor([9]), torch.tensor([[[-1], [0], [1]]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="end_columns"):
        prefixes(*one, torch.tensor([[3]]), 0, 2, False, None, None, False)
    with pytest.raises(ValueError, match="previous_lengths"):
        prefixes(*one, torch.tensor([[2]]), 0, 2, False, torch.zeros(1, 3, 20), torch.tensor([10]), False)
    with pytest.raises(ValueError, match="previous_table must be a float32 tensor"):
        prefixes(*one, torch.tensor([[2]]), 0, 2, False, torch.zeros(1, 4, 20), torch.tensor([5]), False)
    with pytest.raises(ValueError, match="every utterance must have at least one token"):
        cseg.pseudo_forced_align(torch.zeros(20, 3), [[1], []])
    # A text that needs more frames than every window offers: the package's IndexError, here a ValueError.
    failures = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        lpz = torch.log_softmax(torch.randn(200, 4, generator=gen) * 2, -1)
        gt = torch.tensor([-1, 0] + [1, 2, 3, 0] * 12)
        if package(lpz.numpy(), gt.numpy()[:, None], min_window_size=8, max_window_size=12) is None:
            failures += 1
            with pytest.raises(ValueError, match="backtracking failed for problem 0"):
                cseg.ctc_segmentation(lpz, gt, min_window_size=8, max_window_size=12)
        else:
            cseg.ctc_segmentation(lpz, gt, min_window_size=8, max_window_size=12)
    assert failures > 0


def _package_min_mean(cp, s, e, n):
    """ctc-segmentation's determine_utterance_segments score, transcribed: Python's min fold from 0."""
    if e <= s:
        return -1e10
    if e - s <= n:
        return cp[s:e].mean()
    m = np.float64(0.0)
    for t in range(s, e - n):
        m = min(m, cp[t : t + n].mean())
    return m


def check_nan_frame_as_the_package(backend, device, seed, trials, T, max_window):
    """utterance_score on T frames with one NaN, random spans and windows, against the package's loop."""
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        cp = -rng.random(T) * 3
        cp[rng.integers(0, T)] = np.nan
        s = int(rng.integers(0, T - 1))
        e, n = int(rng.integers(s, T + 1)), int(rng.integers(1, max_window))
        got = float(
            cseg.utterance_score(
                torch.from_numpy(cp).to(device),
                torch.tensor([s], device=device),
                torch.tensor([e], device=device),
                window=n,
                backend=backend,
            )[0]
        )
        exp = _package_min_mean(cp, s, e, n)
        assert (np.isnan(got) and np.isnan(exp)) or got == pytest.approx(exp, rel=1e-12, abs=0), (s, e, n)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_utterance_score_nan_frame_as_the_package(backend):
    check_nan_frame_as_the_package(backend, "cpu", seed=3, trials=200, T=40, max_window=10)
