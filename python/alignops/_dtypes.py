"""The accumulation dtype of every family's kernels, in one place (torch only: build_tools/stable_abi.py imports it
under a torch that has no alignops build)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every floating dtype, fp64 kept as fp64 (``acc_type_of`` in csrc/common/checks.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
