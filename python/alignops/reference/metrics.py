"""Pure-PyTorch references of the metrics family: the counter-based hash (bit-identical to
csrc/common/counter_hash.h and kernels/metrics.py), the seeded bootstrap indices, and the bootstrap confusion
matrices of ``alignops::bootstrap_confusion`` computed the obvious way (an [P, R + 1, N] gather).

The hash works on int64 tensors (or Python ints) holding 32-bit words: every multiply is masked back to 32
bits; the product of two words may wrap int64, which leaves its low 32 bits intact.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
SALT_BOOTSTRAP = 0x13198A2E
SALT_KGW = 0x243F6A88
SALT_GUMBEL = 0x85A308D3


def mix32(x):
    """lowbias32 on 32-bit words (int64 tensor or Python int)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def combine(h, x):
    """mix32(h ^ mix32(x)): folds the counter x into the state h."""
    return mix32(h ^ mix32(x & MASK32))


def key_state(salt: int, key: int) -> int:
    """State of a 64-bit key under a salt (two's complement for negative keys)."""
    k = key & 0xFFFFFFFFFFFFFFFF
    return combine(combine(salt, k & MASK32), k >> 32)


def bounded(h, n: int):
    """floor(h * n / 2^32) for 32-bit words h: an index in [0, n)."""
    return (h * n) >> 32 if isinstance(h, int) else torch.div(h * n, 2**32, rounding_mode="floor")


def unit_float(h: torch.Tensor) -> torch.Tensor:
    """((h >> 8) + 0.5) / 2^24 in fp32: in (0, 1), exact."""
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24


def bootstrap_indices(seed: int, num_resamples: int, n: int, device=None) -> torch.Tensor:
    """[R + 1, n] int64 item indices: row 0 is arange(n) (the sample), row r >= 1 the r-th resample."""
    state = key_state(SALT_BOOTSTRAP, seed)
    r = torch.arange(1, num_resamples + 1, dtype=torch.int64, device=device)
    j = torch.arange(n, dtype=torch.int64, device=device)
    hr = combine(torch.full_like(r, state), r)
    idx = bounded(combine(hr[:, None], j[None, :]), n)
    return torch.cat([j[None, :], idx], dim=0)


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
