"""Triton op of the ctc_segmentation family: ``alignops::ctc_segmentation_utterance_score_triton``, the same
arguments and output as the native ``alignops::ctc_segmentation_utterance_score`` of
csrc/registration.cpp, computed by kernels/ctc_segmentation.py. On CPU tensors it runs only in the Triton
interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from .._errors import AlignopsError
from ..kernels.ctc_segmentation import launch_utterance_score
from ._registration import register_triton_twin


def _check_args(frame_logprobs, starts, ends, window):
    """The checks of the native op (csrc/ctc_segmentation/ctc_segmentation_cpu.cpp), with its messages."""
    if frame_logprobs.dim() != 2:
        raise AlignopsError(
            f"frame_logprobs must be a 2-D tensor of shape [B, T], got shape {list(frame_logprobs.shape)}"
        )
    if frame_logprobs.dtype not in (torch.float32, torch.float64):
        raise AlignopsError(f"frame_logprobs must be float32 or float64, got {frame_logprobs.dtype}")
    check_triton_device(frame_logprobs, "frame_logprobs")
    if starts.dim() != 2:
        raise AlignopsError(f"starts must be a 2-D tensor of shape [B, U], got shape {list(starts.shape)}")
    if ends.shape != starts.shape:
        raise AlignopsError(f"ends must have the shape of starts {list(starts.shape)}, got {list(ends.shape)}")
    for t, name in ((starts, "starts"), (ends, "ends")):
        if t.dtype != torch.int64:
            raise AlignopsError(f"{name} must be int64, got {t.dtype}")
        if t.device != frame_logprobs.device:
            raise AlignopsError(
                f"{name} must be on the device of frame_logprobs ({frame_logprobs.device}), got {t.device}"
            )
    if starts.shape[0] != frame_logprobs.shape[0]:
        raise AlignopsError(
            f"starts must have B = {frame_logprobs.shape[0]} rows (frame_logprobs'), got {starts.shape[0]}"
        )
    if window < 1:
        raise AlignopsError(f"window must be >= 1, got {window}")


@register_triton_twin("alignops::ctc_segmentation_utterance_score")
def ctc_segmentation_utterance_score_triton(
    frame_logprobs: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, window: int
) -> torch.Tensor:
    """Triton twin of ``alignops::ctc_segmentation_utterance_score``: [B, U] fp64.

    Spans are not range-checked on the device (that would need a host sync): a non-empty span must lie in
    [0, T], as for the native op; the public ``utterance_score`` checks it for CPU tensors."""
    _check_args(frame_logprobs, starts, ends, window)
    out = frame_logprobs.new_empty(starts.shape, dtype=torch.float64)
    launch_utterance_score(frame_logprobs.contiguous(), starts.contiguous(), ends.contiguous(), window, out)
    return out
