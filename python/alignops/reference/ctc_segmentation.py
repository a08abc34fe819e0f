"""Pure-Python/PyTorch ctc-segmentation (Kürzinger et al. 2020; the trellis of the pseudo-forced alignment
paper of López & Luque): the spec and the test oracle of alignops.ctc_segmentation.

It mirrors the ``ctc-segmentation`` package (1.7.x) statement by statement, one problem at a time:

* the symbol-only trellis ``k[t, c]`` over a window of ``W = min(window, T)`` frames that is re-centred
  per ground-truth position ``c`` (offset ``min(max(0, argmax_t k[t, c-1] - W // 2), min(int((T - W) / C)
  + 1, T - W - sum of offsets))``), switch ``k[t-1+o, c-1-s] + lpz[t, gt[c, s]]``, stay ``k[t-1, c] +
  max(lpz[t, blank], max_s lpz[t, gt[c, s]])``, free preamble (``k[t, 0] = 0``), fp32 arithmetic;
* the backtrace that picks, at each cell, the transition whose lpz best explains the table difference,
  including the package's Python index wrap-around; an IndexError doubles the window;
* ``determine_utterance_segments`` and its min-mean score.

Shapes follow the package: lpz [T, V], ground truth [C, S] with -1 for "no symbol". Timings are frame
indices (the package multiplies them by ``index_duration``).
"""

from __future__ import annotations

import numpy as np
import torch

from .._codes import CtcSegmentationFlag
from .._errors import AlignopsError

FILL_FLOOR = -1e9  # the fill's "prob_max"
TABLE_FLOOR = -1e10  # the backtrace's "max_prob", the initial table value and the empty-utterance score
STAY, NOT_ON_PATH = -1, -2


def _f32(x: float) -> float:
    # float32 + float32 done in float64 and rounded once is the correctly rounded float32 sum.
    return float(np.float32(x))


def fill_table(lpz: torch.Tensor, gt: torch.Tensor, window: int, blank: int, flags: int):
    """The package's cython_fill_table: (table [W, C] fp32, offsets [C] int64, first argmax of the last column)."""
    T, C, S = lpz.shape[0], gt.shape[0], gt.shape[1]
    W = window
    lpz32 = lpz.to(torch.float32)
    table = torch.full((W, C), TABLE_FLOOR, dtype=torch.float32)
    table[0, 0] = 0.0
    offsets = torch.zeros(C, dtype=torch.int64)
    mean_offset = float(np.float32((T - W) / float(C)))
    higher_offset = int(mean_offset) + 1
    cur_offset = [-1] * S
    offset_sum, last_arg_max = 0, -1
    rows = torch.arange(W)
    for c in range(C):
        if c > 0:
            offset = min(max(0, last_arg_max - W // 2), min(higher_offset, (T - W) - offset_sum))
            for s in range(S - 1):
                cur_offset[s + 1] = cur_offset[s] + offset
            cur_offset[0] = offset
            offset_sum += offset
        offsets[c] = offset_sum
        toks = gt[c].tolist()
        stay_zero = (flags & CtcSegmentationFlag.BLANK_TRANSITION_COST_ZERO) and any(v == 0 for v in toks)
        preamble = (flags & CtcSegmentationFlag.PREAMBLE_TRANSITION_COST_ZERO) and c == 0
        frames = lpz32[offset_sum : offset_sum + W]
        switch = torch.full((W,), FILL_FLOOR, dtype=torch.float32)
        sym = torch.full((W,), FILL_FLOOR, dtype=torch.float32)
        for s, tok in enumerate(toks):
            if tok == -1:
                continue
            emis = frames[:, tok]
            sym = torch.where(emis > sym, emis, sym)
            if c == 0:
                continue
            src = rows - 1 + cur_offset[s]
            ok = (src >= 0) & (src < W)
            p = torch.full((W,), FILL_FLOOR, dtype=torch.float32)
            p[ok] = table[src[ok], c - (s + 1)] + emis[ok]
            switch = torch.where(p > switch, p, switch)
        blank_col = frames[:, blank]
        emit = torch.where(sym > blank_col, sym, blank_col).tolist()
        sw = switch.tolist()
        col = table[:, c].tolist()
        x, last_max, last_arg_max = 0.0, 0.0, -1
        for t in range(1 if c == 0 else 0, W):
            if t == 0:
                stay = FILL_FLOOR
            elif preamble:
                stay = 0.0
            elif stay_zero:
                stay = x
            else:
                stay = _f32(x + emit[t])
            x = stay if stay > sw[t] else sw[t]
            col[t] = x
            if last_arg_max == -1 or last_max < x:
                last_max, last_arg_max = x, t
        table[:, c] = torch.tensor(col, dtype=torch.float32)
    return table, offsets, int(table[:, C - 1].argmax())


def backtrace(
    lpz: torch.Tensor, gt: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, t: int, c: int, blank: int
):
    """The package's backtracking loop from (t, c): (timings [C], char_probs [T] fp64, states [T]) or None
    where the package raises IndexError. numpy scalars give the package's dtype promotion exactly."""
    lpz_np, table_np, gt_np = lpz.numpy(), table.numpy(), gt.numpy()
    off = offsets.tolist()
    T, S = lpz_np.shape[0], gt_np.shape[1]
    timings = np.zeros(gt_np.shape[0], dtype=np.int64)
    char_probs = np.zeros(T)
    states = np.full(T, NOT_ON_PATH, dtype=np.int64)
    offset = 0
    try:
        while t != 0 or c != 0:
            min_s, min_delta, max_lpz = None, np.inf, TABLE_FLOOR
            for s in range(S):
                if gt_np[c, s] != -1:
                    offset = off[c] - (off[c - 1 - s] if c - s > 0 else 0)
                    switch = lpz_np[t + off[c], gt_np[c, s]] if c > 0 else TABLE_FLOOR
                    est = table_np[t, c] - table_np[t - 1 + offset, c - 1 - s]
                    if abs(switch - est) < min_delta:
                        min_delta, min_s = abs(switch - est), s
                    max_lpz = max(max_lpz, switch)
            stay = max(lpz_np[t + off[c], blank], max_lpz) if t > 0 else TABLE_FLOOR
            est_stay = table_np[t, c] - table_np[t - 1, c]
            if abs(stay - est_stay) > min_delta:
                if c > 0:
                    for s in range(min_s + 1):
                        timings[c - s] = off[c] + t
                    char_probs[off[c] + t] = max_lpz
                    states[off[c] + t] = gt_np[c, min_s]
                c -= 1 + min_s
                t -= 1 - offset
            else:
                char_probs[off[c] + t] = stay
                states[off[c] + t] = STAY
                t -= 1
    except IndexError:
        return None
    return torch.from_numpy(timings), torch.from_numpy(char_probs), torch.from_numpy(states)


def ctc_segmentation(
    lpz: torch.Tensor,
    ground_truth: torch.Tensor,
    blank: int = 0,
    min_window_size: int = 8000,
    max_window_size: int = 100000,
    flags: int = 2,
    backtrack_from_max_t: bool = False,
):
    """One problem, as the package's ctc_segmentation: (timings [C] frames, char_probs [T] fp64, states [T],
    window used). lpz [T, V] fp32/fp64, ground_truth [C, S] int64. Raises ValueError where the package
    raises AssertionError (text longer than audio) or IndexError (every window failed)."""
    T, C = lpz.shape[0], ground_truth.shape[0]
    if C > T:
        raise AlignopsError(f"audio is shorter than text ({C} ground-truth positions for {T} frames)")
    window = min_window_size
    while True:
        W = min(window, T)
        table, offsets, t = fill_table(lpz, ground_truth, W, blank, flags)
        if backtrack_from_max_t:
            t = W - 1
        out = backtrace(lpz, ground_truth, table, offsets, t, C - 1, blank)
        if out is not None:
            return (*out, window)
        window *= 2
        if not window < max_window_size:
            raise AlignopsError(f"ctc_segmentation: backtracking failed with every window size up to {window // 2}")


def prepare_token_list(utterances, blank: int = 0):
    """The package's prepare_token_list: (ground_truth [C, 1] int64, utterance begin indices [U + 1])."""
    gt = [-1]
    begins = []
    for utt in utterances:
        if gt[-1] != blank:
            gt.append(blank)
        begins.append(len(gt) - 1)
        gt += [int(v) for v in torch.as_tensor(utt).reshape(-1).tolist()]
    if gt[-1] != blank:
        gt.append(blank)
    begins.append(len(gt) - 1)
    return torch.tensor(gt, dtype=torch.int64).reshape(-1, 1), begins


def utterance_score(frame_logprobs: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, window: int = 30):
    """The package's confidence of frames [s, e): mean(cp[s:e]) if e - s <= n, else min(0, min over t in
    [s, e - n) of mean(cp[t:t+n])), NaN windows skipped as the package's fold skips them; e <= s gives -1e10.
    [..., T] x [..., U] -> [..., U] fp64."""
    cp = frame_logprobs.to(torch.float64)
    lead = starts.shape[:-1]
    cp2 = cp.reshape(-1, cp.shape[-1])
    s2, e2 = starts.reshape(cp2.shape[0], -1), ends.reshape(cp2.shape[0], -1)
    out = torch.empty(s2.shape, dtype=torch.float64)
    for b in range(s2.shape[0]):
        for u in range(s2.shape[1]):
            s, e = int(s2[b, u]), int(e2[b, u])
            if e <= s:
                out[b, u] = TABLE_FLOOR
            elif e - s <= window:
                out[b, u] = cp2[b, s:e].mean()
            else:
                means = cp2[b, s : e - 1].unfold(0, window, 1).mean(-1)  # windows starting at s .. e - n - 1
                # the package folds min(running, mean) from 0: a NaN window never compares lower, so it is
                # skipped (a short span's plain mean keeps its NaN)
                means = means[~means.isnan()]
                out[b, u] = min(0.0, float(means.min())) if means.numel() else 0.0
    return out.reshape(*lead, -1)


def utterance_segments(
    timings: torch.Tensor, char_probs: torch.Tensor, utt_begin_indices, index_duration: float, window: int = 30
):
    """The package's determine_utterance_segments: a list of (start s, end s, score) per utterance."""
    tim = (timings.to(torch.float64) * index_duration).tolist()

    def compute_time(index, align_type):
        middle = (tim[index] + tim[index - 1]) / 2
        if align_type == "begin":
            return max(tim[index + 1] - 0.5, middle)
        return min(tim[index - 1] + 0.5, middle)

    segments = []
    for i in range(len(utt_begin_indices) - 1):
        start = compute_time(utt_begin_indices[i], "begin")
        end = compute_time(utt_begin_indices[i + 1], "end")
        s, e = int(round(start / index_duration)), int(round(end / index_duration))
        score = float(utterance_score(char_probs, torch.tensor([s]), torch.tensor([e]), window)[0])
        segments.append((start, end, score))
    return segments
