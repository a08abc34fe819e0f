"""The counter-based 32-bit hash of csrc/common/counter_hash.h in PyTorch, bit for bit, and the seeded bootstrap
indices built on it: the host side of the Triton launchers (key states), the torch-composite metrics and
watermarks, and the references (alignops.reference.metrics / watermark) all use this one copy. Torch only.

The hash works on int64 tensors (or Python ints) holding 32-bit words: every multiply is masked back to 32
bits; the product of two words may wrap int64, which leaves its low 32 bits intact. The salts are
:class:`alignops._codes.HashSalt` (tests/test_codes.py reads the C++ constants).
"""

from __future__ import annotations

import torch

from ._codes import HashSalt

MASK32 = 0xFFFFFFFF
SALT_BOOTSTRAP = int(HashSalt.BOOTSTRAP)
SALT_KGW = int(HashSalt.KGW)
SALT_GUMBEL = int(HashSalt.GUMBEL)


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
