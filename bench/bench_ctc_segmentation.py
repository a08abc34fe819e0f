"""ctc_segmentation family: alignops.ctc_segmentation (+ utterance_segments) vs the ctc-segmentation
package (baseline: ctc_segmentation + determine_utterance_segments, its default 8000-frame window), on
synthetic CTC log-probs at 50 frames/s with ~15 characters/s transcripts split into utterances; and
pseudo_forced_align over the longest recording, against the same loop whose steps the package aligns
(one package call per candidate drop and window: what the loop costs without the shared trellis).
Target (issue, item 4): >= 10x the package on the CPU.
The pure-Python reference is left out: it runs the trellis cell by cell in Python (hours at these sizes)."""

from __future__ import annotations

import statistics
import time

import torch

from alignops import ctc_segmentation as cseg

from .common import Case

FAMILY = "ctc_segmentation"
FPS, CHARS_PER_S, V = 50, 15, 40
# CPU seconds of every call per (shape, provider): on a shared machine the wall clock of a call depends on
# what else runs, its CPU time much less; summary() reports both.
_CPU: dict[tuple[str, str], list[float]] = {}


def _cpu_timed(shape: str, provider: str, fn):
    def run():
        c0 = time.process_time()
        out = fn()
        _CPU.setdefault((shape, provider), []).append(time.process_time() - c0)
        return out

    return run


def _case(op: str, shape: str, provider: str, fn, baseline: bool = False) -> Case:
    """A CPU fwd case of this family whose calls' CPU seconds are recorded under (shape, provider) for summary()."""
    return Case(FAMILY, op, shape, "float32", provider, "fwd", _cpu_timed(shape, provider, fn), baseline=baseline)


def _one_thread(fn):
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)

    return run


def recording(seconds: float, seed: int):
    """(lpz [T, V] fp32, utterances): utterances of 4-10 s spoken at CHARS_PER_S with short pauses."""
    g = torch.Generator().manual_seed(seed)
    T = int(seconds * FPS)
    frames = torch.zeros(T, dtype=torch.int64)
    utts, t = [], 10
    while True:
        n = int(torch.randint(4 * CHARS_PER_S, 10 * CHARS_PER_S, (1,), generator=g))
        toks = torch.randint(1, V, (n,), generator=g)
        step = FPS / CHARS_PER_S
        pos = t + (torch.arange(n) * step).long()
        if pos[-1] + 25 >= T:
            break
        frames[pos] = toks
        utts.append(toks)
        t = int(pos[-1]) + int(torch.randint(5, 25, (1,), generator=g))
    logits = torch.randn(T, V, generator=g)
    logits[torch.arange(T), frames] += 6.0
    return torch.log_softmax(logits, -1), utts


def _package(cs, config, lpz_np, utts_np):
    gt, begins = cs.prepare_token_list(config, utts_np)
    timings, char_probs, _ = cs.ctc_segmentation(config, lpz_np, gt)
    return cs.determine_utterance_segments(config, begins, char_probs, timings, utts_np)


def _alignops(batch, begins):
    lpz, gt, lpz_lengths, gt_lengths = batch
    out = cseg.ctc_segmentation(lpz, gt, lpz_lengths=lpz_lengths, gt_lengths=gt_lengths)
    return cseg.utterance_segments(out.timings, out.char_probs, begins)


def _padded(lpzs, gts):
    """[B, T, V] log-probs and [B, C, 1] ground truth with their lengths, as a batched acoustic model
    gives them (padding is not part of the timed alignment)."""
    lengths = torch.tensor([x.shape[0] for x in lpzs]), torch.tensor([g.shape[0] for g in gts])
    lpz = torch.nn.utils.rnn.pad_sequence(lpzs, batch_first=True)
    gt = torch.nn.utils.rnn.pad_sequence(gts, batch_first=True, padding_value=-1)
    return lpz, gt, *lengths


def groups(device: str, quick: bool):
    if device != "cpu":
        return
    try:
        import ctc_segmentation as cs
    except ImportError:
        cs = None
    shapes = (
        [("1 x 60 s", 1, 60.0), ("4 x 20 s", 4, 20.0)]
        if quick
        else [("1 x 5 min", 1, 300.0), ("1 x 15 min", 1, 900.0), ("32 x 20 s", 32, 20.0)]
    )
    for name, B, seconds in shapes:
        recs = [recording(seconds, seed) for seed in range(B)]
        lpzs = [lpz for lpz, _ in recs]
        preps = [cseg.prepare_token_list(utts) for _, utts in recs]
        gts, begins = [p[0] for p in preps], [p[1] for p in preps]
        chars = sum(int(g.shape[0]) for g in gts)
        shape = f"{name} T={sum(x.shape[0] for x in lpzs)} C={chars}"
        cases = []
        if cs is not None:
            config = cs.CtcSegmentationParameters(char_list=[str(i) for i in range(V)])
            np_recs = [(lpz.numpy(), [u.numpy() for u in utts]) for lpz, utts in recs]
            cases.append(
                _case(
                    "ctc_segmentation+segments",
                    shape,
                    "ctc-segmentation (package)",
                    lambda np_recs=np_recs, config=config: [_package(cs, config, lp, u) for lp, u in np_recs],
                    baseline=True,
                )
            )
        run = lambda batch=_padded(lpzs, gts), begins=begins: _alignops(batch, begins)  # noqa: E731
        cases.append(_case("ctc_segmentation+segments", shape, "alignops", run))
        if B > 1:
            cases.append(_case("ctc_segmentation+segments", shape, "alignops (1 thread)", _one_thread(run)))
        yield cases
    lpz, utts = recording(60.0 if quick else 900.0, 99)
    # A transcript with captions that were never spoken, as TV captions have.
    noisy = []
    for i, u in enumerate(utts):
        noisy += [u, torch.randint(1, V, (60,))] if i % 7 == 3 else [u]
    shape = f"T={lpz.shape[0]} U={len(noisy)}"
    run = lambda: cseg.pseudo_forced_align(lpz, noisy, index_duration=1 / FPS, max_window=8000)  # noqa: E731
    cases = []
    if cs is not None:
        cases.append(
            _case(
                "pseudo_forced_align",
                shape,
                "ctc-segmentation (package) steps",
                lambda: _with_package_steps(cs, run),
                baseline=True,
            )
        )
    cases.append(_case("pseudo_forced_align", shape, "alignops", run))
    yield cases


def _with_package_steps(cs, run):
    """The same loop with each step aligned by the package: one ctc_segmentation per candidate drop and
    window size, as a loop over the package would do it (min_window_size = the chunk: no re-centring)."""

    def best_prefix(lpz, gt, begins, limits, blank, flags, index_duration, score_window, impl, table, filled):
        config = cs.CtcSegmentationParameters(
            char_list=[str(i) for i in range(V)],
            index_duration=index_duration,
            min_window_size=lpz.shape[0],
            score_min_mean_over_L=score_window,
        )
        lpz_np = lpz.numpy()
        for k in range(len(limits), 0, -1):
            if begins[k] + 1 > lpz.shape[0]:
                continue
            gt_k = gt[: begins[k] + 1].numpy()
            timings, char_probs, _ = cs.ctc_segmentation(config, lpz_np, gt_k)
            segs = cs.determine_utterance_segments(config, begins[: k + 1], char_probs, timings, [None] * k)
            if segs[-1][2] >= limits[k - 1]:
                start, end, score = (torch.tensor([x[j] for x in segs], dtype=torch.float64) for j in range(3))
                frames = torch.round(end / index_duration).long()
                seg = cseg.UtteranceSegments(start, end, score, torch.round(start / index_duration).long(), frames)
                return (k, seg, torch.from_numpy(timings / index_duration).round().long()), None
        return None, None

    original = cseg._best_prefix
    cseg._best_prefix = best_prefix
    try:
        return run()
    finally:
        cseg._best_prefix = original


def summary(results) -> list[str]:
    """Aligned frames/s (wall and CPU time), peak memory and the >= 10x target, from this run."""
    lines = []
    cpu = {k: statistics.median(v) for k, v in _CPU.items()}
    for r in results:
        frames = int(r.shape.split("T=")[1].split()[0])
        line = f"{r.op} {r.shape} {r.provider}: {frames / (r.median_ms / 1e3):,.0f} frames/s, peak {r.peak_mb:.0f} MB"
        c = cpu.get((r.shape, r.provider))
        base = next(
            (
                v
                for (shape, provider), v in cpu.items()
                if shape == r.shape and provider.startswith("ctc-segmentation (package)")
            ),
            None,
        )
        if c:
            line += f"; CPU {c:.3f} s/call ({frames / c:,.0f} frames per CPU-s)"
        if r.provider.startswith("alignops") and r.ratio == r.ratio:
            line += f"; wall {r.ratio:.1f}x the package"
            if r.op == "ctc_segmentation+segments":
                line += f" (target >= 10x: {'ok' if r.ratio >= 10 else 'MISSED'})"
            if c and base:
                line += f", CPU time {base / c:.1f}x"
        lines.append(line)
    return lines
