r"""CTC alignment: batched forced alignment (Viterbi), posteriors and loss, token / word spans, confidences,
and the ctc-segmentation algorithm with the paper's pseudo-forced alignment loop for long audio.

``forced_align`` follows ``torchaudio.functional.forced_align`` (same arguments, same paths on inputs
without ties, same tie rule as its CPU kernel) and adds what it lacks: batches with per-utterance lengths,
int64 indexing (torchaudio's CPU kernel keeps T*S int8 backpointers and crashes past 2^31 of them),
1.5-bit backpointers, an exact checkpointed mode for hours of audio, a wildcard ``<star>`` state, and
fp32 accumulation for half / bfloat16 emissions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_has_values, check_not_nan, check_same_device
from ._dtypes import acc_dtype
from ._errors import AlignopsError
from .ctc_posteriors import CTCPosteriors, ctc_loss, ctc_posteriors
from .ctc_segmentation import (
    CtcSegmentationOutput,
    PseudoAlignedSegment,
    PseudoForcedAlignment,
    UtteranceSegments,
    ctc_segmentation,
    prepare_token_list,
    pseudo_forced_align,
    to_json,
    utterance_score,
    utterance_segments,
    write_ctm,
    write_kaldi_segments,
)
from .ops._registration import run_checks, run_value_checks
from .reference import ctc as _ref

MEMORY_MODES = ("full", "checkpointed")


def _to_log_probs_device(t: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    """An index tensor on the device of log_probs, or on the CPU (copied over, as torchaudio takes lengths)."""
    if t.device != device and t.device.type != "cpu":
        raise AlignopsError(f"{name} must be on the device of log_probs ({device}) or the CPU, got {t.device}")
    return _backend.to_device(t, device)


def _lengths(lengths: torch.Tensor | None, B: int, full: int, device: torch.device, name: str) -> torch.Tensor:
    if lengths is None:
        return torch.full((B,), full, dtype=torch.long, device=device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    return _to_log_probs_device(lengths, device, name)  # its dtype and shape: the op's checks


def _star_scores(log_probs: torch.Tensor, blank: int, star_scores, star_penalty: float) -> torch.Tensor:
    acc = acc_dtype(log_probs.dtype)
    B, T, C = log_probs.shape
    if isinstance(star_scores, torch.Tensor):  # its shape: the op's checks
        return (_to_log_probs_device(star_scores, log_probs.device, "star_scores").to(acc) + star_penalty).contiguous()
    if star_scores == "constant":
        return torch.full((B, T), star_penalty, dtype=acc, device=log_probs.device)
    if star_scores == "max":
        if C < 2:
            raise AlignopsError("star_scores='max' needs a class besides blank")
        is_blank = torch.arange(C, device=log_probs.device) == blank  # no host-to-device copy of an index
        masked = torch.where(is_blank, float("-inf"), log_probs.to(acc))
        return (masked.amax(2) + star_penalty).contiguous()
    raise AlignopsError(f"star_scores must be 'max', 'constant' or a [B, T] tensor, got {star_scores!r}")


class ForcedAlignOutput(NamedTuple):
    """torchaudio.functional.forced_align's ``(alignments, scores)``, named; unpacks as the same pair."""

    alignments: torch.Tensor  # [B, T] class id per frame, in the dtype of targets; -1 past the length
    scores: torch.Tensor  # [B, T] emission score of that class, in the dtype of log_probs; 0 past the length


def forced_align(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor | None = None,
    target_lengths: torch.Tensor | None = None,
    blank: int = 0,
    *,
    star_token: int | None = None,
    star_scores: str | torch.Tensor = "max",
    star_penalty: float = 0.0,
    memory: str = "full",
    checkpoint_interval: int | None = None,
    on_infeasible: str = "raise",
    backend: str = "auto",
    check_values: bool = True,
) -> ForcedAlignOutput:
    r"""Batched CTC forced alignment: the best path through the 2L+1 trellis of each utterance.

    Over states (blank, y_1, blank, ..., y_L, blank), with fp32 accumulation (fp64 for fp64 input):

    .. math:: \alpha_t(s) = \max(\alpha_{t-1}(s), \alpha_{t-1}(s-1), \alpha_{t-1}(s-2)) + \log p_t(\ell_s)

    where the s-2 move exists only from a token to a different token. Ties go to the earlier candidate
    in that order (stay, then one state back, then two) — torchaudio's CPU rule, identical in our CPU
    and CUDA kernels — and the path ends on the last token unless the trailing blank is strictly better.

    Args:
        log_probs: [B, T, C] emission scores (log-softmax output, or any scores: the path maximises
            their sum), float32 / float64 / float16 / bfloat16.
        targets: [B, L] int64 / int32 target ids, padded past ``target_lengths``; never ``blank``. On the
            device of ``log_probs`` or the CPU.
        input_lengths, target_lengths: [B] int lengths (default: T and L for every row). Like
            torchaudio, on the device of ``log_probs`` or the CPU.
        blank: the blank id.
        star_token: an id in ``targets`` that stands for a wildcard ``<star>`` state (any speech not
            in the transcript), e.g. ``C``. Its score per frame is ``star_scores`` + ``star_penalty`` (not NaN):
            ``"max"`` (the best non-blank class of the frame), ``"constant"`` (0), or a [B, T] tensor.
        memory: ``"full"`` keeps 1.5 bits of backpointers per trellis state (three bit planes; T*S*3/16
            bytes, torchaudio keeps T*S). ``"checkpointed"`` keeps every K-th row of scores and recomputes
            K-frame segments while tracing back: exact (same path), about 2x the time, memory
            O(S (T/K + K)); K = ``checkpoint_interval`` (default about 4.6 sqrt(T), the memory optimum).
        on_infeasible: ``"raise"`` (ValueError naming the rows with T_b < L_b + repeats or no finite
            path) or ``"skip"`` (those rows come back as path -1, score -inf). Under
            ``torch.compile(fullgraph=True)`` "raise" is an assert in the graph: RuntimeError, rows unnamed.
        backend: ``"auto"`` (C++ on the CPU, CUDA C++ on a GPU), ``"native"``, ``"torch"`` (reference).
        check_values: ``False`` skips the checks that read tensor values on the device (lengths and target
            ids in range), so the call neither syncs nor breaks CUDA-graph capture (with
            ``on_infeasible="skip"``, which reads nothing back either). The CPU kernel checks them itself
            whatever the flag; the CUDA kernel makes a row with a length or target id out of range
            infeasible (it reads nothing out of bounds), so it is reported as such.

    Returns:
        ``ForcedAlignOutput(alignments, scores)``, which unpacks like torchaudio's pair: alignments [B, T]
        in the dtype of ``targets`` (torchaudio's contract) — the class id aligned to each frame
        (``star_token`` on wildcard frames), -1 past ``input_lengths``; scores [B, T] in the dtype of
        ``log_probs`` — the emission score of that class at that frame (torchaudio's second output), 0 past
        the length.

    Devices: CPU (threaded over the batch; the trellis loop is vectorised over states) and CUDA (one
    block per utterance, the whole time loop and the backtrace inside one kernel launch). On CUDA the
    value checks of the lengths and ``targets`` and the infeasibility check read back a few scalars
    (host syncs; ``check_values=False`` with ``on_infeasible="skip"`` reads none).

    Raises:
        AlignopsError (a ValueError and a RuntimeError, so torchaudio code that catches either keeps
        working): wrong ranks / shapes / dtypes / devices, a target equal to ``blank`` or outside [0, C),
        lengths outside [0, T] / [0, L], a negative ``star_token``, infeasible rows (with
        ``on_infeasible="raise"``).
    """
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 3:
        raise AlignopsError(
            f"log_probs must be a 3-D tensor [B, T, C], got {getattr(log_probs, 'shape', type(log_probs))}"
        )
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise AlignopsError(f"targets must be a 2-D tensor [B, L], got {getattr(targets, 'shape', type(targets))}")
    if memory not in MEMORY_MODES:
        raise AlignopsError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if on_infeasible not in ("raise", "skip"):
        raise AlignopsError(f"on_infeasible must be 'raise' or 'skip', got {on_infeasible!r}")
    B, T, C = log_probs.shape
    dev = log_probs.device
    input_lengths = _lengths(input_lengths, B, T, dev, "input_lengths")
    target_lengths = _lengths(target_lengths, B, targets.shape[1], dev, "target_lengths")
    targets = _to_log_probs_device(targets, dev, "targets")
    # the op's checks of the tensors (ranks, dtypes, sizes, devices, blank) before anything is built from them; the
    # star scores and the checkpoint interval are checked with the op's full arguments below (or by the op itself)
    run_checks("alignops::forced_align", log_probs, targets, input_lengths, target_lengths, blank, None, -1, 0)
    input_lengths, target_lengths = input_lengths.long(), target_lengths.long()
    check_not_nan(star_penalty, "star_penalty")
    star = None
    star_id = -1
    if star_token is not None:
        star_id = int(star_token)
        if star_id < 0:  # -1 is the op's "no star" sentinel: a negative id would silently drop the wildcard
            raise AlignopsError(f"star_token must be an id >= 0 (e.g. C = {C}, one past the classes), got {star_id}")
        if star_id == blank:
            raise AlignopsError(f"star_token must differ from blank ({blank})")
        star = _star_scores(log_probs, blank, star_scores, float(star_penalty))
    checkpoint = 0
    if memory == "checkpointed":
        checkpoint = (
            int(checkpoint_interval)
            if checkpoint_interval is not None
            else max(1, math.ceil(4.6 * math.sqrt(max(T, 1))))
        )
        if checkpoint < 1:
            raise AlignopsError(f"checkpoint_interval must be >= 1, got {checkpoint_interval}")
    # asked before resolve(), which would first complain of a missing triton package
    impl = "triton" if backend == "triton" else _backend.resolve(backend, dev, "forced_align")
    if impl == "triton":
        raise RuntimeError(
            "forced_align: there is no Triton kernel (its GPU kernel is CUDA C++); build alignops "
            "with ALIGNOPS_ENABLE_CUDA=ON, or use backend='torch'"
        )
    if impl == "torch" or (check_values and dev.type == "cuda"):
        # The native op checks its arguments and, on the CPU, the values it reads; the reference and the CUDA
        # kernel (which reads nothing out of bounds, but would report a bad row as infeasible) get the same checks.
        args = (log_probs, targets, input_lengths, target_lengths, blank, star, star_id)
        run_checks("alignops::forced_align", *args, checkpoint)
        if check_values:
            run_value_checks("alignops::forced_align", *args)
    if impl == "torch":
        paths, scores, feasible = _ref.forced_align(
            log_probs, targets, input_lengths, target_lengths, blank, star, star_id
        )
    else:
        try:
            paths, scores, feasible = torch.ops.alignops.forced_align(
                log_probs, targets, input_lengths, target_lengths, blank, star, star_id, checkpoint
            )
        except ValueError as e:  # the C++ checks (csrc/common/checks.h) raise a plain ValueError
            raise AlignopsError(str(e)) from None
    if on_infeasible == "raise" and torch.compiler.is_compiling():
        # A traced graph cannot branch on the flags: the check becomes an assert in the graph, which raises
        # RuntimeError at run time (it cannot say which rows; the eager call does).
        torch._assert_async(feasible.all(), "forced_align: no alignment fits some rows (on_infeasible='raise')")
    elif on_infeasible == "raise" and not feasible.is_meta and not bool(feasible.all()):
        rows = (~feasible).nonzero().flatten().tolist()
        raise AlignopsError(
            f"forced_align: no alignment fits rows {rows[:10]}{'...' if len(rows) > 10 else ''}: "
            "they need input_lengths >= target_lengths + repeated neighbours, and a path of finite "
            "score (pass on_infeasible='skip' to get -1 paths for them instead)"
        )
    return ForcedAlignOutput(paths.to(targets.dtype), scores)


class TokenSpans(NamedTuple):
    """Per-target spans of aligned paths, padded to the longest row (-1 / 0 / nan past ``count``)."""

    token: torch.Tensor  # [B, K] int64, the class id of span k
    start: torch.Tensor  # [B, K] int64, first frame
    end: torch.Tensor  # [B, K] int64, one past the last frame
    score: torch.Tensor  # [B, K] float, mean frame score over [start, end)
    count: torch.Tensor  # [B] int64, spans in each row


def token_spans(
    paths: torch.Tensor,
    frame_scores: torch.Tensor | None = None,
    blank: int = 0,
    num_spans: int | None = None,
    *,
    check_values: bool = True,
) -> TokenSpans:
    """Merge aligned paths into one span per target token, batched (torchaudio's ``merge_tokens``).

    A span is a maximal run of frames with the same non-blank id; in a CTC path the k-th run is the k-th
    target (a repeated target needs a blank in between). ``score`` is the mean of ``frame_scores`` over
    the run in fp32 (fp64 for fp64) — the per-token mean log-prob with :func:`forced_align`'s scores,
    torchaudio's ``TokenSpan.score`` when given ``scores.exp()``. Frames with path -1 (padding) belong
    to no span. ``num_spans`` fixes K (e.g. ``targets.shape[1]``); by default K is the longest row (one
    host sync). Vectorised tensor code (cumsum + scatter) on any device. A row with more than ``num_spans``
    spans raises ValueError; ``check_values=False`` skips that check (it reads the counts), so that with
    ``num_spans`` the call neither syncs nor breaks CUDA-graph capture: such a row then keeps its first
    ``num_spans`` spans (``count`` still counts them all).
    """
    if not isinstance(paths, torch.Tensor) or paths.dim() != 2 or paths.dtype not in (torch.int32, torch.int64):
        raise AlignopsError(f"paths must be a [B, T] int64 / int32 tensor, got {getattr(paths, 'shape', type(paths))}")
    B, T = paths.shape
    if frame_scores is None:
        frame_scores = torch.zeros(paths.shape, device=paths.device)
    if frame_scores.shape != paths.shape:
        raise AlignopsError(
            f"frame_scores must have the shape of paths {tuple(paths.shape)}, got {tuple(frame_scores.shape)}"
        )
    check_same_device([("paths", paths), ("frame_scores", frame_scores)])
    if num_spans is None:
        check_has_values("token_spans", "paths", paths, "pass num_spans to fix the number of span columns")
    paths = paths.long()
    pad = paths.new_full((B, 1), -1)
    valid = (paths >= 0) & (paths != blank)
    starts = valid & (paths != torch.cat([pad, paths[:, :-1]], 1))
    ends = valid & (paths != torch.cat([paths[:, 1:], pad], 1))
    count = starts.sum(1)
    K = int(count.max()) if num_spans is None and B > 0 and T > 0 else (num_spans or 0)
    if (
        check_values
        and num_spans is not None
        and B > 0
        and T > 0
        and not paths.is_meta
        and bool((count > num_spans).any())
    ):
        raise AlignopsError(f"num_spans={num_spans} is fewer than the spans of a row ({int(count.max())})")
    k = torch.where(valid, (starts.long().cumsum(1) - 1).clamp(max=K), K)  # K: a dump column, cut below
    frames = torch.arange(T, device=paths.device).expand(B, T)
    acc = acc_dtype(frame_scores.dtype)
    at_start = torch.where(starts, k, K)
    token = paths.new_full((B, K + 1), -1).scatter(1, at_start, paths)[:, :K]
    start = paths.new_full((B, K + 1), -1).scatter(1, at_start, frames)[:, :K]
    end = paths.new_full((B, K + 1), -1).scatter(1, torch.where(ends, k, K), frames + 1)[:, :K]
    total = torch.zeros((B, K + 1), dtype=acc, device=paths.device).scatter_add(1, k, frame_scores.to(acc))[:, :K]
    length = (end - start).clamp(min=1).to(acc)
    score = torch.where(start >= 0, total / length, torch.nan)
    return TokenSpans(token, start, end, score, count)


def word_spans(spans: TokenSpans, word_lengths: torch.Tensor, *, check_values: bool = True) -> TokenSpans:
    """Group token spans into words: word w of row b is its next ``word_lengths[b, w]`` tokens.

    ``word_lengths`` [B, W] int (0 = padding). start / end are the first token's start and the last
    token's end; score is the frame-weighted mean of the token scores (the mean frame score over the
    word's tokens). ``token`` holds the word's first token id; ``count`` the words with at least one
    token. Rows with fewer spans than the lengths ask for raise ValueError. Vectorised (cumsum + gather).
    ``check_values=False`` skips the checks that read tensor values on the device (lengths >= 0, enough
    spans), so the call neither syncs nor breaks CUDA-graph capture; words past a row's spans then get
    meaningless values (never an index out of bounds).
    """
    if (
        not isinstance(word_lengths, torch.Tensor)
        or word_lengths.dim() != 2
        or word_lengths.dtype not in (torch.int32, torch.int64)
    ):
        raise AlignopsError(
            f"word_lengths must be a [B, W] int64 / int32 tensor, got "
            f"{getattr(word_lengths, 'shape', type(word_lengths))}"
        )
    B, K = spans.start.shape
    if word_lengths.shape[0] != B:
        raise AlignopsError(f"word_lengths must have one row per utterance (B = {B}), got {word_lengths.shape[0]}")
    lengths = word_lengths.long().to(spans.start.device)
    if check_values and bool((lengths < 0).any()):
        raise AlignopsError("word_lengths must be >= 0")
    last = lengths.cumsum(1)  # one past each word's last token
    if check_values and lengths.shape[1] > 0 and bool((last[:, -1] > spans.count).any()):
        raise AlignopsError("word_lengths asks for more tokens than a row has spans")
    first = last - lengths
    real = lengths > 0
    # [lo, hi): the word's tokens, padding words read column 0; clamped to the K columns, which only unchecked
    # lengths (check_values=False) can pass
    lo = torch.where(real, first, 0).clamp(0, K)
    hi = torch.where(real, last, 0).clamp(0, K)
    safe_first = lo.clamp(max=max(K - 1, 0))
    safe_last = (hi - 1).clamp(min=0, max=max(K - 1, 0))
    # fp64 prefix sums: a word is a difference of two of them, exact enough over hours of frames.
    frames = (spans.end - spans.start).clamp(min=0).double()
    weighted = torch.where(spans.start >= 0, spans.score.double(), 0.0) * frames
    csum = torch.cat([weighted.new_zeros(B, 1), weighted.cumsum(1)], 1)
    fsum = torch.cat([frames.new_zeros(B, 1), frames.cumsum(1)], 1)
    total = csum.gather(1, hi) - csum.gather(1, lo)
    n = fsum.gather(1, hi) - fsum.gather(1, lo)
    minus = torch.full_like(lengths, -1)
    return TokenSpans(
        torch.where(real, spans.token.gather(1, safe_first), minus) if K else minus,
        torch.where(real, spans.start.gather(1, safe_first), minus) if K else minus,
        torch.where(real, spans.end.gather(1, safe_last), minus) if K else minus,
        torch.where(real, total / n.clamp(min=1), torch.nan).to(spans.score.dtype),
        real.sum(1),
    )


def span_occupancy(spans: TokenSpans, token_occupancy: torch.Tensor) -> torch.Tensor:
    """Per-token posterior confidence: the mean occupancy of target k's state over its aligned frames.

    ``token_occupancy`` [B, T, L] is :func:`ctc_posteriors`'s ``output="tokens"`` (gamma of each token's
    state per frame); ``spans`` come from :func:`token_spans` on the same utterances. Returns [B, K] in
    fp64 (nan past ``spans.count``): near 1 where the whole posterior mass agrees with the Viterbi span.
    A span that ends past T (an occupancy of fewer frames than the paths) raises AlignopsError; that check
    reads one value (a host sync on a GPU).
    """
    if token_occupancy.dim() != 3 or token_occupancy.shape[0] != spans.start.shape[0]:
        raise AlignopsError(
            f"token_occupancy must be [B, T, L] with B = {spans.start.shape[0]}, got {tuple(token_occupancy.shape)}"
        )
    B, T, L = token_occupancy.shape
    if spans.end.numel() and not spans.end.is_meta:
        last = int(spans.end.max())
        if last > T:
            raise AlignopsError(
                f"token_occupancy has T = {T} frames but spans reach frame {last}: the occupancy "
                "must come from the utterances the paths were aligned on"
            )
    K = spans.start.shape[1]
    if K > L:
        raise AlignopsError(f"spans has {K} columns but token_occupancy only {L} tokens")
    occ = token_occupancy[..., :K].double()
    csum = torch.cat([occ.new_zeros(B, 1, K), occ.cumsum(1)], 1)  # [B, T + 1, K]
    real = spans.start >= 0
    start = torch.where(real, spans.start, 0).clamp(max=T)[:, None, :]
    end = torch.where(real, spans.end, 0).clamp(max=T)[:, None, :]
    total = (csum.gather(1, end) - csum.gather(1, start))[:, 0]
    return torch.where(real, total / (end - start)[:, 0].clamp(min=1), torch.nan)


__all__ = [
    "MEMORY_MODES",
    "ForcedAlignOutput",
    "CTCPosteriors",
    "CtcSegmentationOutput",
    "PseudoAlignedSegment",
    "PseudoForcedAlignment",
    "TokenSpans",
    "UtteranceSegments",
    "ctc_loss",
    "ctc_posteriors",
    "ctc_segmentation",
    "forced_align",
    "prepare_token_list",
    "pseudo_forced_align",
    "span_occupancy",
    "to_json",
    "token_spans",
    "utterance_score",
    "utterance_segments",
    "word_spans",
    "write_ctm",
    "write_kaldi_segments",
]
