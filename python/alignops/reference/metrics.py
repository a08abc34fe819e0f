"""Pure-PyTorch reference of the metrics family: the bootstrap confusion matrices of
``alignops::bootstrap_confusion`` computed the obvious way (an [P, R + 1, N] gather), on the seeded bootstrap
indices of ``alignops._counter_hash`` (re-exported here with the hash)."""

from __future__ import annotations

import torch

# The counter hash and the bootstrap indices are alignops._counter_hash's (the Python mirror of
# csrc/common/counter_hash.h, shared with the launchers); re-exported here, where the reference has always had them.
from .._counter_hash import (  # noqa: F401
    MASK32,
    SALT_BOOTSTRAP,
    SALT_GUMBEL,
    SALT_KGW,
    bootstrap_indices,
    bounded,
    combine,
    key_state,
    mix32,
    unit_float,
)


def bootstrap_confusion(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, num_resamples: int, seed: int
) -> torch.Tensor:
    """int32 [P, R + 1, C, C] confusion matrices (rows: a's label, columns: b's) of each pair on each resample."""
    P, N = a.shape
    b = b.expand(P, N)
    C = num_classes
    idx = bootstrap_indices(seed, num_resamples, N, a.device)  # [R + 1, N]
    codes = (a.long() * C + b.long())[:, idx]  # [P, R + 1, N]
    out = torch.zeros(P, num_resamples + 1, C * C, dtype=torch.int64, device=a.device)
    out.scatter_add_(2, codes, torch.ones_like(codes))
    return out.view(P, num_resamples + 1, C, C).to(torch.int32)
