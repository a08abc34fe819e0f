"""Fake kernel of forced_align (schema in csrc/ctc/forced_align_cpu.cpp). Alignment is not differentiable."""

from __future__ import annotations

import torch

from ._registration import register_fake


@register_fake("alignops::forced_align")
def forced_align_fake(log_probs, targets, input_lengths, target_lengths, blank, star_scores, star_id, checkpoint):
    B, T, _ = log_probs.shape
    return (
        log_probs.new_empty((B, T), dtype=torch.long),
        log_probs.new_empty((B, T)),
        log_probs.new_empty((B,), dtype=torch.bool),
    )
