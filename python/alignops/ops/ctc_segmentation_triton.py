"""Triton op of the ctc_segmentation family: ``alignops::ctc_segmentation_utterance_score_triton``, the same
arguments and output as the native ``alignops::ctc_segmentation_utterance_score`` of
csrc/registration.cpp, computed by kernels/ctc_segmentation.py. On CPU tensors it runs only in the Triton
interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from .._checks import check_triton_device
from ..kernels.ctc_segmentation import launch_utterance_score
from ._registration import register_triton_twin


@register_triton_twin("alignops::ctc_segmentation_utterance_score")
def ctc_segmentation_utterance_score_triton(
    frame_logprobs: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, window: int
) -> torch.Tensor:
    """Triton twin of ``alignops::ctc_segmentation_utterance_score``: [B, U] fp64.

    Spans are not range-checked on the device (that would need a host sync): a non-empty span must lie in
    [0, T], as for the native op; the public ``utterance_score`` checks it for CPU tensors."""
    check_triton_device(frame_logprobs, "frame_logprobs")
    out = frame_logprobs.new_empty(starts.shape, dtype=torch.float64)
    launch_utterance_score(frame_logprobs.contiguous(), starts.contiguous(), ends.contiguous(), window, out)
    return out
