r"""Decoding-time watermarks (KGW, Gumbel / Aaronson), their detectors, and Alignment Resampling.

The watermarks of "Watermarking Degrades Alignment in Language Models" (Verma et al.):

- **KGW** (Kirchenbauer et al.): the previous ``h`` tokens and a secret key seed a pseudo-random split of the
  vocabulary; a fraction ``gamma`` is *green* and gets ``+delta`` on its logits. Detection counts green
  tokens: :math:`z = (G - \gamma n) / \sqrt{n \gamma (1 - \gamma)}`.
- **Gumbel** (Aaronson): with pseudo-random :math:`u_v \in (0, 1)` per vocabulary entry, emit
  :math:`\arg\max_v u_v^{1/p_v}`. Since :math:`\log u < 0`, maximising :math:`\log(u_v)/p_v` is minimising
  :math:`-\log(u_v)/p_v`, i.e. minimising :math:`\log(-\log u_v) - \log p_v`, i.e. maximising
  :math:`\log p_v - \log(-\log u_v) = \text{logit}_v/T - \log Z - \log(-\log u_v)`; :math:`\log Z` is the same
  for every v, so the token is :math:`\arg\max_v\ \text{logit}_v / T + g_v` with :math:`g_v = -\log(-\log u_v)`
  Gumbel(0, 1) noise -- the Gumbel-max trick with keyed noise: one pass over the logits, no softmax, no
  normaliser. It samples exactly from softmax(logits / T) when u is uniform, and is deterministic given the
  context. Detection: :math:`S = \sum_t -\log(1 - u_{x_t})`, Gamma(n, 1) without the watermark, so
  :math:`z = (S - n)/\sqrt{n}` and p = Q(n, S).

Pseudo-random words are a counter-based hash of (key, context tokens, vocabulary id) (csrc/common/counter_hash.h):
the fused kernels (C++ on the CPU, Triton on the GPU) hash each vocabulary entry next to its logit; no
V-sized random tensor is created. The words are bit-identical across devices and backends; the Gumbel scores
go through fp32 ``log``, whose last-ulp rounding may differ between libraries (an exact near-tie could
resolve differently). Scores are fp32 (fp64 logits are rounded to fp32 for the argmax ops).

**Alignment Resampling**: sample n watermarked responses and keep the one a reward model prefers
(:func:`alignment_resampling`). KGW responses differ when sampled from the processed logits; Gumbel decoding
is deterministic per context, so its n candidates need different keys or prompts (the paper's modified
Gumbel trades strict distortion-freeness for that diversity).

The detectors only hash the n scored tokens; they are torch composite code (any device).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from . import _counter_hash as _hash
from ._checks import check_int64, check_same_device
from ._errors import AlignopsError
from .ops._registration import run_checks
from .reference import watermark as _ref


def _check_key(key: int) -> None:
    check_int64(key, "key")


def _call(name: str, reference, backend: str, logits: torch.Tensor, context: torch.Tensor, key: int, *params):
    """``alignops::<name>`` (native or Triton) or its reference on the call's arguments. The reference path runs
    the op's own checks first (``alignops::<name>_check``), so each check is written once, in C++."""
    _check_key(key)
    if not isinstance(logits, torch.Tensor):
        raise AlignopsError(f"logits must be a tensor, got {type(logits).__name__}")
    params = tuple(float(x) for x in params)
    impl = _backend.resolve(backend, logits.device, name, native_cuda=False)
    if impl == "torch":
        run_checks("alignops::" + name, logits, context, key, *params)
        return reference(logits, context, key, *params)
    return getattr(torch.ops.alignops, name if impl == "native" else name + "_triton")(logits, context, key, *params)


def kgw_process(
    logits: torch.Tensor,
    context: torch.Tensor,
    key: int,
    *,
    gamma: float = 0.25,
    delta: float = 2.0,
    backend: str = "auto",
) -> torch.Tensor:
    """KGW logits processor: ``logits + delta * green`` with ``green[b, v]`` iff
    ``combine(state(key, context[b]), v) < floor(gamma * 2^32)``.

    logits [B, V] fp32 / fp64 / bf16 / fp16 (sum in fp32, fp64 for fp64, rounded once to logits' dtype);
    context [B, h] int64 / int32: the previous h tokens of each row, oldest first (h = 0: a fixed green list
    per key). Differentiable in logits (identity gradient). Backends: native (fused C++, CPU), triton (GPU),
    torch (materialises the [B, V] words). Raises ValueError for bad shapes / dtypes, gamma outside [0, 1],
    non-finite delta.
    """
    return _call("kgw_logits", _ref.kgw_logits, backend, logits, context, key, gamma, delta)


def kgw_greedy(
    logits: torch.Tensor,
    context: torch.Tensor,
    key: int,
    *,
    gamma: float = 0.25,
    delta: float = 2.0,
    backend: str = "auto",
) -> torch.Tensor:
    """int64 [B]: first argmax of :func:`kgw_process`'s logits (scored in fp32), fused: the processed logits
    are never written. NaN follows torch.argmax: a row holding NaN gives the index of its first NaN. Same
    arguments, backends and errors as :func:`kgw_process`."""
    return _call("kgw_argmax", _ref.kgw_argmax, backend, logits, context, key, gamma, delta)


def gumbel_sample(
    logits: torch.Tensor, context: torch.Tensor, key: int, *, temperature: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """Gumbel (Aaronson) watermarked sampling, int64 [B]: ``argmax_v u_v^(1 / p_v)`` with p = softmax(logits / T),
    computed as ``argmax_v logits_v * (1 / T) - log(-log u_v)`` in fp32 in one pass (see the module docstring
    for the derivation). As in torch.argmax, a row holding a NaN logit gives the index of its first NaN.
    Backends as :func:`kgw_process`. Raises ValueError for a temperature that is not finite and > 0, and for
    bad shapes / dtypes."""
    return _call("gumbel_argmax", _ref.gumbel_argmax, backend, logits, context, key, temperature)


class KGWLogitsProcessor:
    """A HuggingFace-style logits processor: ``processor(input_ids [B, L], scores [B, V]) -> scores`` with the
    last ``context_width`` tokens of input_ids as context (L >= context_width)."""

    def __init__(
        self, key: int, gamma: float = 0.25, delta: float = 2.0, context_width: int = 1, backend: str = "auto"
    ):
        _check_key(key)
        # the op's own checks of gamma and delta, on an empty batch: errors at construction, written once
        run_checks("alignops::kgw_logits", torch.empty(0, 1), torch.empty(0, 0, dtype=torch.long), key, gamma, delta)
        if context_width < 0:
            raise AlignopsError(f"context_width must be >= 0, got {context_width}")
        self.key, self.gamma, self.delta, self.h, self.backend = key, gamma, delta, context_width, backend

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] < self.h:
            raise AlignopsError(
                f"input_ids must hold at least context_width = {self.h} tokens, got {input_ids.shape[-1]}"
            )
        context = input_ids[:, input_ids.shape[-1] - self.h :]
        return kgw_process(scores, context, self.key, gamma=self.gamma, delta=self.delta, backend=self.backend)


# ---- detection -------------------------------------------------------------------------------------------


class Detection(NamedTuple):
    """z [B] (fp64), p_value [B] (one-sided), score [B] (green count or Gumbel sum), num_scored [B] (int64)."""

    z: torch.Tensor
    p_value: torch.Tensor
    score: torch.Tensor
    num_scored: torch.Tensor


def _first_occurrences(state: torch.Tensor, token: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """scored, minus the scored (context, token) pairs already scored earlier in the row."""
    pair = (state << 32) | token  # unique per (32-bit state, 32-bit token); int64 wrap keeps the bits
    order = pair.sort(dim=-1, stable=True).indices
    order = order.gather(-1, (~scored).gather(-1, order).to(torch.uint8).sort(dim=-1, stable=True).indices)
    p, s = pair.gather(-1, order), scored.gather(-1, order)
    repeat = torch.zeros_like(s)
    repeat[:, 1:] = (p[:, 1:] == p[:, :-1]) & s[:, 1:] & s[:, :-1]
    return scored & ~torch.empty_like(repeat).scatter_(-1, order, repeat)


def _scored_words(
    tokens: torch.Tensor, key: int, salt: int, context_width: int, mask: torch.Tensor | None, ignore_repeated: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(words [B, T - h] of tokens t >= h under their h-token context, bool mask of the scored ones)."""
    _check_key(key)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise AlignopsError(
            f"tokens must be an int64/int32 tensor of shape [B, T], got "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)} {list(getattr(tokens, 'shape', ()))}"
        )
    if not isinstance(context_width, int) or context_width < 0:
        raise AlignopsError(f"context_width must be an int >= 0, got {context_width!r}")
    B, T = tokens.shape
    if mask is not None and (mask.shape != tokens.shape or mask.dtype != torch.bool):
        raise AlignopsError(f"mask must be a bool tensor of the shape of tokens {list(tokens.shape)}")
    h = context_width
    n = max(T - h, 0)
    t = tokens.long()
    windows = torch.stack([t[:, j : j + n] for j in range(h)], dim=-1) if h else t.new_empty(B, n, 0)
    state = _ref.row_states(windows, salt, key)
    token = t[:, h : h + n] & _hash.MASK32
    words = _hash.combine(state, token)
    scored = torch.ones(B, n, dtype=torch.bool, device=tokens.device) if mask is None else mask[:, h : h + n]
    if ignore_repeated:
        scored = _first_occurrences(state, token, scored)
    return words, scored


def kgw_detect(
    tokens: torch.Tensor,
    key: int,
    *,
    gamma: float = 0.25,
    context_width: int = 1,
    mask: torch.Tensor | None = None,
    ignore_repeated: bool = False,
) -> Detection:
    r"""KGW detector on token ids [B, T]: tokens t >= h (``context_width``) are scored under their previous h
    tokens; ``mask`` [B, T] (bool) drops tokens (padding, prompt); ``ignore_repeated`` scores each
    (context, token) pair once per row (repeated n-grams would otherwise count again). G green of n scored:
    :math:`z = (G - \gamma n)/\sqrt{n\gamma(1-\gamma)}`, one-sided normal p-value. n = 0 gives z = 0, p = 1.
    Hashes only the n scored tokens (torch composite). Raises ValueError for gamma outside (0, 1)."""
    if not 0 < gamma < 1:
        raise AlignopsError(f"gamma must be in (0, 1) for detection, got {gamma}")
    words, scored = _scored_words(tokens, key, _hash.SALT_KGW, context_width, mask, ignore_repeated)
    green = (words < _ref.green_threshold(gamma)) & scored
    n = scored.sum(-1)
    g = green.sum(-1).double()
    nd = n.double()
    z = torch.where(n > 0, (g - gamma * nd) / (nd * gamma * (1 - gamma)).clamp_min(1e-300).sqrt(), 0.0)
    p = torch.where(n > 0, torch.special.ndtr(-z), 1.0)
    return Detection(z, p, g, n)


def gumbel_detect(
    tokens: torch.Tensor,
    key: int,
    *,
    context_width: int = 1,
    mask: torch.Tensor | None = None,
    ignore_repeated: bool = False,
) -> Detection:
    r"""Gumbel (Aaronson) detector on token ids [B, T]: :math:`S = \sum_t -\log(1 - u_t)` over the scored
    tokens (as :func:`kgw_detect`, with its ``mask`` and ``ignore_repeated``: deterministic Gumbel decoding
    repeats n-grams, whose repeats carry no new evidence), Gamma(n, 1) without the watermark:
    :math:`z = (S - n)/\sqrt n`, p = Q(n, S) (regularised upper incomplete gamma). n = 0 gives z = 0, p = 1.
    Torch composite, fp64."""
    words, scored = _scored_words(tokens, key, _hash.SALT_GUMBEL, context_width, mask, ignore_repeated)
    u = ((words >> 8).double() + 0.5) * 2.0**-24
    s = torch.where(scored, -torch.log1p(-u), 0.0).sum(-1)
    n = scored.sum(-1)
    nd = n.double()
    z = torch.where(n > 0, (s - nd) / nd.clamp_min(1).sqrt(), 0.0)
    p = torch.where(n > 0, torch.special.gammaincc(nd.clamp_min(1), s), 1.0)
    return Detection(z, p, s, n)


class Resampled(NamedTuple):
    """The chosen candidates [B, ...] and their index [B] (int64) among the n."""

    candidates: torch.Tensor
    indices: torch.Tensor


def alignment_resampling(candidates: torch.Tensor, rewards: torch.Tensor) -> Resampled:
    """Alignment Resampling (Verma et al.): of n watermarked candidates per prompt, keep the one with the
    highest reward. candidates [B, n, ...] (token ids or anything), rewards [B, n]; returns
    ``Resampled(candidates [B, ...], indices [B])``, which unpacks as the pair it was. Ties go to the first
    candidate. Raises ValueError for mismatched shapes or devices and n = 0."""
    from .rewards import best_of_n

    check_same_device([("candidates", candidates), ("rewards", rewards)])
    if candidates.dim() < 2 or candidates.shape[:2] != rewards.shape:
        raise AlignopsError(
            f"candidates must have shape [B, n, ...] matching rewards [B, n] = {list(rewards.shape)}, "
            f"got {list(candidates.shape)}"
        )
    idx = best_of_n(rewards).indices
    return Resampled(candidates[torch.arange(candidates.shape[0], device=candidates.device), idx], idx)
