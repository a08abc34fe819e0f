"""Pure-PyTorch references of the watermark ops: the per-entry words of the whole [B, V] vocabulary are
materialised (the straightforward implementation the fused kernels avoid) with the hash of
``alignops._counter_hash``, bit-identical to csrc/common/counter_hash.h and kernels/watermark.py.
"""

from __future__ import annotations

import math

import torch

from .._counter_hash import MASK32, SALT_GUMBEL, SALT_KGW, combine, key_state, unit_float


def row_states(context: torch.Tensor, salt: int, key: int) -> torch.Tensor:
    """int64 [...] words: key_state(salt, key) folded with the context tokens [..., h], oldest first."""
    state = torch.full(context.shape[:-1], key_state(salt, key), dtype=torch.int64, device=context.device)
    for j in range(context.shape[-1]):
        state = combine(state, context[..., j].long() & MASK32)
    return state


def vocab_words(state: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [B, V] words combine(state[b], v)."""
    v = torch.arange(vocab_size, dtype=torch.int64, device=state.device)
    return combine(state[:, None], v[None, :])


def green_threshold(gamma: float) -> int:
    return math.floor(gamma * 2**32)


def kgw_green(context: torch.Tensor, key: int, gamma: float, vocab_size: int) -> torch.Tensor:
    """bool [B, V] green lists."""
    return vocab_words(row_states(context, SALT_KGW, key), vocab_size) < green_threshold(gamma)


def kgw_logits(logits: torch.Tensor, context: torch.Tensor, key: int, gamma: float, delta: float) -> torch.Tensor:
    """logits + delta * green, computed in fp32 (fp64 for fp64) and rounded once to logits' dtype."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    green = kgw_green(context, key, gamma, logits.shape[-1])
    return (logits.to(acc) + green.to(acc) * torch.tensor(delta, dtype=torch.float32).to(acc)).to(logits.dtype)


def kgw_argmax(logits: torch.Tensor, context: torch.Tensor, key: int, gamma: float, delta: float) -> torch.Tensor:
    """First argmax of the processed logits, scored in fp32."""
    green = kgw_green(context, key, gamma, logits.shape[-1])
    return (logits.float() + green.float() * float(torch.tensor(delta, dtype=torch.float32))).argmax(-1)


def gumbel_noise(context: torch.Tensor, key: int, vocab_size: int) -> torch.Tensor:
    """fp32 [B, V] Gumbel(0, 1) noise -log(-log u), u = unit_float(word)."""
    u = unit_float(vocab_words(row_states(context, SALT_GUMBEL, key), vocab_size))
    return -torch.log(-torch.log(u))


def gumbel_argmax(logits: torch.Tensor, context: torch.Tensor, key: int, temperature: float) -> torch.Tensor:
    """First argmax of logits * (1 / T) + Gumbel noise, in fp32 (the kernels multiply by the fp32 reciprocal)."""
    inv = torch.tensor(1.0 / temperature, dtype=torch.float32)
    return (logits.float() * inv + gumbel_noise(context, key, logits.shape[-1])).argmax(-1)


def randperm_green(prev_tokens: torch.Tensor, key: int, gamma: float, vocab_size: int) -> torch.Tensor:
    """The original KGW implementation's green lists (bool [B, V]): a CPU generator seeded with key * prev per
    row and randperm(V)[:gamma V] -- one seeded permutation of the vocabulary per row. Different bits from
    the hash above; kept as the benchmark's straightforward baseline."""
    B = prev_tokens.shape[0]
    green = torch.zeros(B, vocab_size, dtype=torch.bool)
    g = torch.Generator()
    for b in range(B):
        g.manual_seed(int(key * int(prev_tokens[b])) % (2**63))
        green[b, torch.randperm(vocab_size, generator=g)[: int(gamma * vocab_size)]] = True
    return green
