"""Fake kernels of the ctc_segmentation ops (schemas in csrc/ctc_segmentation/ctc_segmentation_cpu.cpp) and the
Triton twin ``alignops::ctc_segmentation_utterance_score_triton``: the same arguments and output as the native
``alignops::ctc_segmentation_utterance_score``, computed by kernels/ctc_segmentation.py. On CPU tensors it runs
only in the Triton interpreter (TRITON_INTERPRET=1).

None of them is differentiable: the trellis path is an argmax, and the utterance score is a threshold
statistic over that path's frame log-probs, so no autograd is registered.
"""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from ._registration import register_fake, register_triton_twin


@register_fake("alignops::ctc_segmentation")
def _ctc_segmentation_fake(
    lpz,
    lpz_lengths,
    ground_truth,
    gt_lengths,
    blank,
    min_window_size,
    max_window_size,
    flags,
    backtrack_from_max_t,
    block_columns,
):
    B, T, C = lpz.shape[0], lpz.shape[1], ground_truth.shape[1]
    long = dict(dtype=torch.int64)
    return (
        lpz.new_empty((B, C), **long),
        lpz.new_empty((B, T), dtype=torch.float64),
        lpz.new_empty((B, T), **long),
        lpz.new_empty((B,), **long),
    )


@register_fake("alignops::ctc_segmentation_prefixes")
def _ctc_segmentation_prefixes_fake(
    lpz,
    lpz_lengths,
    ground_truth,
    gt_lengths,
    end_columns,
    blank,
    flags,
    backtrack_from_max_t,
    previous_table,
    previous_lengths,
    return_table,
):
    B, T, C, E = lpz.shape[0], lpz.shape[1], ground_truth.shape[1], end_columns.shape[1]
    return (
        lpz.new_empty((B, E, C), dtype=torch.int64),
        lpz.new_empty((B, E, T), dtype=torch.float64),
        lpz.new_empty((B, E, T), dtype=torch.int64),
        lpz.new_empty((B, E), dtype=torch.bool),
        lpz.new_empty((B if return_table else 0, C, T), dtype=torch.float32),
    )


@register_fake("alignops::ctc_segmentation_utterance_score")
def _ctc_segmentation_utterance_score_fake(frame_logprobs, starts, ends, window):
    return frame_logprobs.new_empty(starts.shape, dtype=torch.float64)


@register_triton_twin("alignops::ctc_segmentation_utterance_score")
def ctc_segmentation_utterance_score_triton(
    frame_logprobs: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, window: int
) -> torch.Tensor:
    """Triton twin of ``alignops::ctc_segmentation_utterance_score``: [B, U] fp64.

    Spans are not range-checked on the device (that would need a host sync): a non-empty span must lie in
    [0, T], as for the native op; the public ``utterance_score`` checks it for CPU tensors."""
    from ..kernels.ctc_segmentation import launch_utterance_score

    check_triton_device(frame_logprobs, "frame_logprobs")
    out = frame_logprobs.new_empty(starts.shape, dtype=torch.float64)
    launch_utterance_score(frame_logprobs.contiguous(), starts.contiguous(), ends.contiguous(), window, out)
    return out
