"""CTC segmentation: the ``ctc-segmentation`` package's utterance alignment, batched and in C++, and the
iterative pseudo-forced alignment of López & Luque built on it.

* :func:`ctc_segmentation` — the package's algorithm (symbol-only trellis over a window re-centred per
  ground-truth position, free preamble, value-matching backtrace, window doubling), with the same
  timings and frame log-probs as the package, for several problems in one call.
* :func:`utterance_segments` / :func:`utterance_score` — its ``determine_utterance_segments`` and the
  min-mean confidence score.
* :func:`pseudo_forced_align` — the paper's loop over long audio with low-quality transcripts, with
  Kaldi ``segments`` / CTM / JSON writers.

Frame indices are the unit of every tensor output; seconds are ``frames * index_duration`` exactly as
the package computes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import IO

import torch

from . import _backend
from ._api import keyword_only
from ._checks import values_checkable
from ._codes import CtcSegmentationFlag
from ._errors import AlignopsError
from .ops._registration import run_checks, run_value_checks
from .reference import ctc_segmentation as _ref

__all__ = [
    "CtcSegmentationOutput",
    "UtteranceSegments",
    "ctc_segmentation",
    "prepare_token_list",
    "utterance_score",
    "utterance_segments",
    "PseudoAlignedSegment",
    "PseudoForcedAlignment",
    "pseudo_forced_align",
    "write_kaldi_segments",
    "write_ctm",
    "to_json",
]

STAY, NOT_ON_PATH = _ref.STAY, _ref.NOT_ON_PATH


@dataclasses.dataclass
class CtcSegmentationOutput:
    """timings [B, C] int64: frame of each ground-truth position (0 where the path never switches into
    it, as in the package); char_probs [B, T] fp64: the package's per-frame log-prob along the path;
    states [B, T] int64: token id switched into at that frame, -1 (STAY) for a stay, -2 (NOT_ON_PATH);
    window_sizes [B] int64: the window size that succeeded."""

    timings: torch.Tensor
    char_probs: torch.Tensor
    states: torch.Tensor
    window_sizes: torch.Tensor


@dataclasses.dataclass
class UtteranceSegments:
    """start / end [B, U] fp64 seconds, score [B, U] fp64, start_frame / end_frame [B, U] int64 (the
    rounded frames the score is taken over)."""

    start: torch.Tensor
    end: torch.Tensor
    score: torch.Tensor
    start_frame: torch.Tensor
    end_frame: torch.Tensor


def prepare_token_list(utterances: Sequence, blank: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The package's ``prepare_token_list``: ground truth [C, 1] int64 (row 0 = -1, a blank between
    utterances and at the end) and the C-index of each utterance's leading blank, plus the final one."""
    return _ref.prepare_token_list(utterances, blank)


def _flags(blank_transition_cost_zero: bool, preamble_transition_cost_zero: bool) -> int:
    return int(
        CtcSegmentationFlag.BLANK_TRANSITION_COST_ZERO * blank_transition_cost_zero
        | CtcSegmentationFlag.PREAMBLE_TRANSITION_COST_ZERO * preamble_transition_cost_zero
    )


def _as_batch(lpz, ground_truth, lpz_lengths, gt_lengths):
    """Lists of problems are padded; single problems get a batch dimension."""
    if isinstance(lpz, (list, tuple)):
        if not isinstance(ground_truth, (list, tuple)) or len(ground_truth) != len(lpz):
            raise AlignopsError("ground_truth must be a list with one [C_i, S] tensor per lpz [T_i, V] in the list")
        if len(lpz) == 0:
            raise AlignopsError("lpz is an empty list: give at least one problem")
        gts = [g.reshape(-1, 1) if g.dim() == 1 else g for g in ground_truth]
        lpz_lengths = torch.tensor([x.shape[0] for x in lpz], dtype=torch.int64)
        gt_lengths = torch.tensor([g.shape[0] for g in gts], dtype=torch.int64)
        lpz = torch.nn.utils.rnn.pad_sequence(list(lpz), batch_first=True)
        ground_truth = torch.nn.utils.rnn.pad_sequence(gts, batch_first=True, padding_value=-1)
    if not isinstance(lpz, torch.Tensor) or lpz.dim() not in (2, 3):
        raise AlignopsError(
            f"lpz must be a [T, V] or [B, T, V] tensor (or a list of [T_i, V]), got "
            f"{tuple(lpz.shape) if isinstance(lpz, torch.Tensor) else type(lpz).__name__}"
        )
    if lpz.dim() == 2:  # one problem: ground_truth [C] or [C, S]
        lpz, ground_truth = lpz[None], ground_truth[None]
    if ground_truth.dim() == 2:  # token lists [B, C]
        ground_truth = ground_truth[..., None]
    if ground_truth.dim() != 3:
        raise AlignopsError(
            f"ground_truth must have shape [C], [C, S], [B, C] or [B, C, S], got {tuple(ground_truth.shape)}"
        )
    B = lpz.shape[0]
    if lpz_lengths is None:
        lpz_lengths = torch.full((B,), lpz.shape[1], dtype=torch.int64)
    if gt_lengths is None:
        gt_lengths = torch.full((B,), ground_truth.shape[1], dtype=torch.int64)
    if lpz.dtype in (torch.float16, torch.bfloat16):
        lpz = lpz.float()
    return lpz, ground_truth, lpz_lengths, gt_lengths


def ctc_segmentation(
    lpz,
    ground_truth,
    *,
    lpz_lengths: torch.Tensor | None = None,
    gt_lengths: torch.Tensor | None = None,
    blank: int = 0,
    min_window_size: int = 8000,
    max_window_size: int = 100000,
    blank_transition_cost_zero: bool = False,
    preamble_transition_cost_zero: bool = True,
    backtrack_from_max_t: bool = False,
    block_columns: int = -1,
    backend: str = "auto",
) -> CtcSegmentationOutput:
    r"""The ``ctc-segmentation`` package's ``ctc_segmentation(config, lpz, ground_truth)``, batched.

    Trellis (fp32, as the package): ``k[0, 0] = 0``; for position c over a window of W = min(window, T)
    frames starting at frame o_c (re-centred on the previous column's argmax, at most
    ``int((T - W) / C) + 1`` frames per position), ``k[t, c] = max(max_s k[t-1+o_c-o_{c-1-s}, c-1-s] +
    lpz[o_c+t, gt[c, s]], k[t-1, c] + max(lpz[o_c+t, blank], max_s lpz[o_c+t, gt[c, s]]))``, with a free
    preamble ``k[t, 0] = 0`` (``preamble_transition_cost_zero``) and a free stay on blank positions
    (``blank_transition_cost_zero``). The backtrace starts at the argmax of the last column (or the last
    frame with ``backtrack_from_max_t``) and takes, cell by cell, the transition whose log-prob best
    explains the table difference. A failed backtrace doubles the window while it is below
    ``max_window_size``. Results are identical to the package's, bit for bit (tests/test_ctc_segmentation.py).

    Args:
        lpz: [T, V] or [B, T, V] CTC log-probs (fp32 / fp64; fp16 / bf16 are read as fp32), or a list of
            [T_i, V] tensors. The fill runs on lpz rounded to fp32 and the backtrace on lpz as given, like
            the package. CPU tensors (a CUDA lpz is rejected: the DP is sequential per problem).
        ground_truth: [C, S] / [B, C, S] int64 (or a list of [C_i, S] / [C_i]), as ``prepare_text`` /
            ``prepare_token_list`` build it: row 0 is the start marker (all -1), -1 = no symbol.
        lpz_lengths, gt_lengths: [B] int64 valid lengths of padded batches.
        block_columns: memory of the native kernel's [W, C] fp32 table: 0 keeps it whole (the package's
            memory), k > 0 keeps only the columns before every block of k columns and refills each block
            once during the backtrace (same results, twice the fill work, about (k + C / k) * W floats),
            -1 (default) keeps it whole up to 64 MiB and checkpoints every ceil(sqrt(C * S)) columns past
            that. The reference (backend="torch") always keeps it whole.
    Returns:
        :class:`CtcSegmentationOutput` (timings in frames; multiply by ``index_duration`` for seconds).
    Raises:
        ValueError: bad shapes / dtypes / devices, token ids outside [-1, V), a non-empty row 0, NaN or
            +inf in lpz, text longer than audio (the package's AssertionError), or no window size for
            which the backtrace succeeds (the package's IndexError), naming the problem.
    """
    lpz, ground_truth, lpz_lengths, gt_lengths = _as_batch(lpz, ground_truth, lpz_lengths, gt_lengths)
    if lpz.device.type != "cpu":
        raise AlignopsError(
            f"ctc_segmentation: lpz must be a CPU tensor (a sequential DP per problem), got {lpz.device}"
        )
    impl = _backend.resolve(backend, lpz.device, "ctc_segmentation")
    flags = _flags(blank_transition_cost_zero, preamble_transition_cost_zero)
    if impl == "triton":
        raise RuntimeError(
            "ctc_segmentation: there is no Triton kernel (the DP and its backtrace are sequential "
            "per problem; the C++ kernel runs one problem per CPU thread); use backend='native'"
        )
    args = (lpz, lpz_lengths, ground_truth, gt_lengths, blank, min_window_size, max_window_size, flags)
    if impl == "native":
        return CtcSegmentationOutput(*torch.ops.alignops.ctc_segmentation(*args, backtrack_from_max_t, block_columns))
    # The native op's checks, values included (csrc/ctc_segmentation/ctc_segmentation_cpu.cpp), for the reference.
    run_value_checks("alignops::ctc_segmentation", *args, backtrack_from_max_t, block_columns)
    return _reference_batch(
        lpz, ground_truth, lpz_lengths, gt_lengths, blank, min_window_size, max_window_size, flags, backtrack_from_max_t
    )


def _reference_batch(lpz, gt, lpz_lengths, gt_lengths, blank, min_window_size, max_window_size, flags, from_max_t):
    B, T, C = lpz.shape[0], lpz.shape[1], gt.shape[1]
    timings = torch.zeros(B, C, dtype=torch.int64)
    char_probs = torch.zeros(B, T, dtype=torch.float64)
    states = torch.full((B, T), NOT_ON_PATH, dtype=torch.int64)
    windows = torch.empty(B, dtype=torch.int64)
    for b in range(B):
        tl, cl = int(lpz_lengths[b]), int(gt_lengths[b])
        tim, cp, st, win = _ref.ctc_segmentation(
            lpz[b, :tl], gt[b, :cl], blank, min_window_size, max_window_size, flags, from_max_t
        )
        timings[b, :cl], char_probs[b, :tl], states[b, :tl], windows[b] = tim, cp, st, win
    return CtcSegmentationOutput(timings, char_probs, states, windows)


@keyword_only("window")
def utterance_score(
    frame_logprobs: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    *,
    window: int = 30,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    r"""The ctc-segmentation confidence of utterances spanning frames [start, end).

    With n = ``window`` frames: ``score = mean(cp[s:e])`` if ``e - s <= n``, else ``min(0, min over t in
    [s, e - n) of mean(cp[t:t+n]))`` (the package's range: the last full window is left out); ``e <= s``
    gives -1e10. A window whose mean is NaN is skipped, as the package's ``min(running, mean)`` fold skips
    it; a short span (``e - s <= n``) containing a NaN frame scores NaN. Sums in fp64 in numpy's pairwise
    order, so values equal ``determine_utterance_segments``'s bit for bit (the Triton kernel, for CUDA tensors,
    sums in a tree order: a few fp64 ulp apart).

    Args:
        frame_logprobs: [T] or [B, T] fp32 / fp64 (e.g. ``char_probs``); CPU (C++) or CUDA (Triton).
        starts, ends: [U] or [B, U] int64 frame indices; a non-empty span must lie in [0, T].
        check_values: the spans' range is read on every backend (one host read on a GPU); ``False`` skips it
            on the reference and Triton backends (no sync, CUDA-graph capture), where a span outside [0, T] then
            reads outside its row (the C++ kernel always checks: it reads the spans on the host anyway).
    Returns: [U] or [B, U] fp64.
    Raises: ValueError on shapes / dtypes / spans outside [0, T] / window < 1.
    """
    squeeze = frame_logprobs.dim() == 1
    if squeeze:
        frame_logprobs, starts, ends = frame_logprobs[None], starts[None], ends[None]
    impl = _backend.resolve(backend, frame_logprobs.device, "utterance_score", native_cuda=False)
    args = (frame_logprobs, starts, ends, window)
    if impl == "native":
        out = torch.ops.alignops.ctc_segmentation_utterance_score(*args)
    else:
        # the op's checks, then its spans' range (one host sync): the reference and the Triton kernel index frames
        # with them unchecked
        run_checks("alignops::ctc_segmentation_utterance_score", *args)
        if check_values and values_checkable(frame_logprobs):
            run_value_checks("alignops::ctc_segmentation_utterance_score", *args)
        if impl == "triton":
            out = torch.ops.alignops.ctc_segmentation_utterance_score_triton(*args)
        else:
            out = _ref.utterance_score(*args)
    return out[0] if squeeze else out


def utterance_segments(
    timings: torch.Tensor,
    char_probs: torch.Tensor,
    utt_begin_indices,
    *,
    index_duration: float = 0.025,
    window: int = 30,
    backend: str = "auto",
) -> UtteranceSegments:
    """The package's ``determine_utterance_segments`` on frame timings, batched.

    ``utt_begin_indices`` [U + 1] (or [B, U + 1], or one list per problem: then outputs are padded to the
    largest U with NaN, and -1 frames) are prepare_*'s indices. For utterance i with
    b = begin[i], e = begin[i + 1] and s(c) = timings[c] * index_duration: start = max(s(b+1) - 0.5,
    (s(b) + s(b-1)) / 2), end = min(s(e-1) + 0.5, (s(e) + s(e-1)) / 2), frames round(start / index_duration)
    (half to even, as Python's round) and the score of :func:`utterance_score` over them.

    Args: timings [C] / [B, C] int64 frames, char_probs [T] / [B, T].
    Raises: ValueError where an index would leave [1, C - 1] (the package would wrap or raise IndexError).
    """
    squeeze = timings.dim() == 1
    if squeeze:
        timings, char_probs = timings[None], char_probs[None]
    ragged = (
        isinstance(utt_begin_indices, (list, tuple))
        and len(utt_begin_indices) > 0
        and isinstance(utt_begin_indices[0], (list, tuple))
    )
    if ragged:  # one list per problem: padded with copies of the row's first utterance, masked at the end
        n_utts = torch.tensor([len(r) - 1 for r in utt_begin_indices])
        if bool((n_utts < 1).any()):
            raise AlignopsError("utt_begin_indices must hold U + 1 >= 2 indices per problem")
        U = int(n_utts.max())
        b = torch.tensor([list(r[:-1]) + [r[0]] * (U + 1 - len(r)) for r in utt_begin_indices], dtype=torch.int64)
        e = torch.tensor([list(r[1:]) + [r[1]] * (U + 1 - len(r)) for r in utt_begin_indices], dtype=torch.int64)
    else:
        idx = torch.as_tensor(utt_begin_indices, dtype=torch.int64).reshape(timings.shape[0], -1)
        if idx.shape[1] < 2:
            raise AlignopsError("utt_begin_indices must hold U + 1 >= 2 indices per problem")
        b, e = idx[:, :-1], idx[:, 1:]
    C = timings.shape[1]
    # An utterance reads timings[b - 1 .. b + 1] and timings[e - 1 .. e]: the package's Python would wrap
    # or raise IndexError outside these ranges.
    if bool((b < 1).any() or (b > C - 2).any() or (e < 1).any() or (e > C - 1).any()):
        raise AlignopsError(
            f"utt_begin_indices must lie in [1, C - 2] (the last one in [1, C - 1]) with C = {C}, "
            f"got {utt_begin_indices}"
        )
    tim = timings.to(torch.float64) * index_duration
    at = lambda i: tim.gather(1, i)  # noqa: E731
    mid_b = (at(b) + at(b - 1)) / 2
    mid_e = (at(e) + at(e - 1)) / 2
    lo = at(b + 1) - 0.5
    hi = at(e - 1) + 0.5
    start = torch.where(mid_b > lo, mid_b, lo)  # Python's max(lo, mid)
    end = torch.where(mid_e < hi, mid_e, hi)  # Python's min(hi, mid)
    start_f = torch.round(start / index_duration).to(torch.int64)
    end_f = torch.round(end / index_duration).to(torch.int64)
    score = utterance_score(char_probs, start_f, end_f, window=window, backend=backend)
    out = UtteranceSegments(start, end, score, start_f, end_f)
    if ragged:
        pad = torch.arange(U)[None] >= n_utts[:, None]
        out = UtteranceSegments(
            *(x.masked_fill(pad, float("nan") if x.is_floating_point() else -1) for x in dataclasses.astuple(out))
        )
    if squeeze:
        out = UtteranceSegments(*(x[0] for x in dataclasses.astuple(out)))
    return out


# ---- pseudo-forced alignment (López & Luque) ---------------------------------------------------------


@dataclasses.dataclass
class PseudoAlignedSegment:
    """One utterance of :func:`pseudo_forced_align`: absolute start / end seconds, score, whether a step
    aligned it (``aligned``; False: skipped after the window reached its maximum), whether its score
    passes its threshold (``kept``), and the absolute frame of each of its tokens."""

    index: int
    start: float
    end: float
    score: float
    aligned: bool
    kept: bool
    token_frames: list[int]


@dataclasses.dataclass
class PseudoForcedAlignment:
    """segments: one per input utterance, in order; anchors: the start frame of every step (the first is 0);
    fills: trellis fills done (one per step and window size, a grown window filling its new rows only;
    dropping utterances reuses the step's fill)."""

    segments: list[PseudoAlignedSegment]
    anchors: list[int]
    fills: int
    index_duration: float

    def kept(self) -> list[PseudoAlignedSegment]:
        """The filtered segments: aligned, with a score at or above their threshold."""
        return [s for s in self.segments if s.aligned and s.kept]


def pseudo_forced_align(
    lpz: torch.Tensor,
    utterances: Sequence,
    *,
    texts: Sequence[str] | None = None,
    blank: int = 0,
    index_duration: float = 0.025,
    threshold: float = -2.0,
    short_threshold: float = -1.0,
    short_length: int = 30,
    group_size: int = 8,
    window: int | None = None,
    max_window: int = 8000,
    growth: float = 2.0,
    score_window: int = 30,
    blank_transition_cost_zero: bool = False,
    preamble_transition_cost_zero: bool = True,
    backend: str = "auto",
) -> PseudoForcedAlignment:
    r"""Iterative pseudo-forced alignment of a long recording with a low-quality transcript (López & Luque).

    From the last anchor frame a, align the next ``group_size`` utterances to ``lpz[a : a + window]`` with
    the ctc-segmentation trellis; while the last utterance's score is below its threshold (``threshold``,
    or ``short_threshold`` for utterances shorter than ``short_length`` characters of ``texts``, tokens
    without texts), drop it. The first group whose last utterance passes is accepted: its utterances are
    emitted and the next anchor is the end frame of its last one. When every drop fails, the window grows
    by ``growth`` up to ``max_window`` frames; past that, the first utterance is marked not aligned and the
    loop moves on from the same anchor.

    What is reused: each step fills one trellis over the whole chunk (``window = chunk length``, so no
    re-centring) for its group; every drop is a backtrace of that same table from an earlier column
    (``torch.ops.alignops.ctc_segmentation_prefixes``): the trellis of a prefix of the ground truth is the
    prefix of the trellis. A grown window extends the table by its new rows only: with no re-centring a
    cell depends on no later frame. Each step therefore gives exactly the package's result for
    ``lpz[a : a + chunk]`` and the kept utterances (min_window_size >= chunk), without the package's refill
    per drop and per window (``backend="torch"`` refills).

    Args:
        lpz: [T, V] log-probs of the whole recording (fp32 / fp64, CPU).
        utterances: token-id sequences (1-D int tensors / lists), in transcript order.
        texts: the utterance strings, for the short-utterance rule (default: token counts).
        window: first chunk length in frames (default: twice the group's share of the recording's frames
            per token, at least 2 frames per token).
    Returns: :class:`PseudoForcedAlignment`.
    Raises: ValueError on bad shapes / arguments (and the ctc_segmentation op's errors).
    """
    if not isinstance(lpz, torch.Tensor) or lpz.dim() != 2:
        raise AlignopsError(f"lpz must be a [T, V] tensor, got {getattr(lpz, 'shape', type(lpz).__name__)}")
    toks = [torch.as_tensor(u, dtype=torch.int64).reshape(-1) for u in utterances]
    if texts is not None and len(texts) != len(toks):
        raise AlignopsError(f"texts must have one string per utterance ({len(toks)}), got {len(texts)}")
    if any(u.numel() == 0 for u in toks):
        raise AlignopsError("every utterance must have at least one token")
    if group_size < 1 or max_window < 2 or growth <= 1.0 or index_duration <= 0:
        raise AlignopsError(
            f"need group_size >= 1, max_window >= 2, growth > 1, index_duration > 0; got "
            f"{group_size}, {max_window}, {growth}, {index_duration}"
        )
    if lpz.dtype in (torch.float16, torch.bfloat16):
        lpz = lpz.float()
    T = lpz.shape[0]
    lengths = [len(t) for t in texts] if texts is not None else [u.numel() for u in toks]
    limit = [short_threshold if n < short_length else threshold for n in lengths]
    frames_per_token = T / max(1, sum(u.numel() + 1 for u in toks))
    flags = _flags(blank_transition_cost_zero, preamble_transition_cost_zero)
    impl = _backend.resolve(backend, lpz.device, "pseudo_forced_align")
    if impl == "triton":
        raise RuntimeError("pseudo_forced_align: there is no Triton kernel; use backend='native' or 'torch'")

    segments: list[PseudoAlignedSegment | None] = [None] * len(toks)
    anchors, fills = [], 0
    anchor, i = 0, 0
    while i < len(toks):
        K = min(group_size, len(toks) - i)
        gt, begins = prepare_token_list(toks[i : i + K], blank)
        default = max(2.0, 2.0 * frames_per_token) * sum(u.numel() + 1 for u in toks[i : i + K])
        win = min(max_window, int(window if window is not None else default) or 2)
        anchors.append(anchor)
        table, filled = None, 0  # the step's trellis and the frames it covers, kept while the window grows
        while True:
            chunk = min(win, T - anchor)
            best = None
            if begins[1] + 1 <= chunk:  # the first utterance fits in the chunk
                fills += 1
                best, table = _best_prefix(
                    lpz[anchor : anchor + chunk],
                    gt,
                    begins,
                    [limit[i + k] for k in range(K)],
                    blank,
                    flags,
                    index_duration,
                    score_window,
                    impl,
                    table,
                    filled,
                )
                filled = chunk
            if best is not None or chunk >= T - anchor or win >= max_window:
                break
            win = min(max_window, max(win + 1, int(win * growth)))
        if best is None:  # nothing fits or passes even in the largest window: skip one utterance
            segments[i] = PseudoAlignedSegment(
                i, anchor * index_duration, anchor * index_duration, _ref.TABLE_FLOOR, False, False, []
            )
            i += 1
            continue
        k, seg, timings = best
        for j in range(k):
            frames = [anchor + int(f) for f in timings[begins[j] + 1 : begins[j + 1]]]
            segments[i + j] = PseudoAlignedSegment(
                i + j,
                anchor * index_duration + float(seg.start[j]),
                anchor * index_duration + float(seg.end[j]),
                float(seg.score[j]),
                True,
                float(seg.score[j]) >= limit[i + j],
                frames,
            )
        anchor = min(T - 1, anchor + max(int(seg.end_frame[k - 1]), 1))
        i += k
    return PseudoForcedAlignment(segments, anchors, fills, index_duration)


def _best_prefix(lpz, gt, begins, limits, blank, flags, index_duration, score_window, impl, table, filled):
    """((k, segments of the first k utterances, timings) for the largest k whose k-th utterance scores at
    or above its limit, or None; the trellis). One fill, backtracked at every prefix end that fits in the
    chunk; the native path extends ``table`` (filled over the first ``filled`` frames) by the new rows."""
    K, T = len(limits), lpz.shape[0]
    ends = [begins[k] if begins[k] + 1 <= T else -1 for k in range(1, K + 1)]
    if impl == "torch":
        ref_table, offsets, _ = _ref.fill_table(lpz, gt, T, blank, flags)
        results = [
            None if c == -1 else _ref.backtrace(lpz, gt, ref_table, offsets, int(ref_table[:, c].argmax()), c, blank)
            for c in ends
        ]
    else:
        prev = (table, torch.tensor([filled])) if table is not None else (None, None)
        tim, cp, _, ok, table = torch.ops.alignops.ctc_segmentation_prefixes(
            lpz[None],
            torch.tensor([T]),
            gt[None],
            torch.tensor([gt.shape[0]]),
            torch.tensor([ends]),
            blank,
            flags,
            False,
            *prev,
            True,
        )
        results = [(tim[0, j], cp[0, j], None) if ok[0, j] else None for j in range(K)]
    for k in range(K, 0, -1):
        r = results[k - 1]
        if r is None:
            continue
        timings, char_probs = r[0], r[1]
        seg = utterance_segments(
            timings[: begins[k] + 1],
            char_probs,
            begins[: k + 1],
            index_duration=index_duration,
            window=score_window,
            backend="torch" if impl == "torch" else "native",
        )
        if float(seg.score[k - 1]) >= limits[k - 1]:
            return (k, seg, timings), table
    return None, table


def write_kaldi_segments(
    result: PseudoForcedAlignment,
    file: IO[str],
    recording_id: str,
    utt_ids: Sequence[str] | None = None,
    *,
    only_kept: bool = True,
) -> None:
    """Kaldi ``segments`` lines ``<utt-id> <recording-id> <start> <end>`` (seconds, 2 decimals)."""
    for s in result.kept() if only_kept else [s for s in result.segments if s.aligned]:
        uid = utt_ids[s.index] if utt_ids is not None else f"{recording_id}_{s.index:05d}"
        file.write(f"{uid} {recording_id} {s.start:.2f} {s.end:.2f}\n")


def write_ctm(
    result: PseudoForcedAlignment,
    file: IO[str],
    recording_id: str,
    token_names: Sequence[str],
    utterances: Sequence,
    *,
    channel: str = "1",
    only_kept: bool = True,
) -> None:
    """Token-level CTM lines ``<recording> <channel> <start> <duration> <token>``: a token lasts until the
    next token of its utterance starts, the last one one frame."""
    for s in result.kept() if only_kept else [s for s in result.segments if s.aligned]:
        toks = torch.as_tensor(utterances[s.index]).reshape(-1).tolist()
        for j, (tok, f) in enumerate(zip(toks, s.token_frames)):
            nxt = s.token_frames[j + 1] if j + 1 < len(s.token_frames) else f + 1
            dur = max(nxt - f, 1) * result.index_duration
            file.write(f"{recording_id} {channel} {f * result.index_duration:.3f} {dur:.3f} {token_names[tok]}\n")


def to_json(result: PseudoForcedAlignment, utt_ids: Sequence[str] | None = None) -> str:
    """The whole result as JSON: segments (id, start, end, score, aligned, kept, token_frames), anchors, fills."""
    segs = [
        dict(dataclasses.asdict(s), id=utt_ids[s.index] if utt_ids is not None else s.index) for s in result.segments
    ]
    return json.dumps(
        {"index_duration": result.index_duration, "anchors": result.anchors, "fills": result.fills, "segments": segs}
    )
