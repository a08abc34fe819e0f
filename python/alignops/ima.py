"""Representation alignment: the implicit multimodal alignment (IMA) score of a multimodal LLM.

IMA [Shukor & Cord, NeurIPS 2024] measures, layer by layer, how close the LLM's representations of
perceptual tokens (image / video / audio) are to those of the textual tokens of the same input, and how
much each modality changes from one layer to the next. :func:`ima_score` scores stacked hidden states
(e.g. HF's ``output_hidden_states=True``); :class:`IMACollector` gathers the same dataset-level numbers
from forward hooks over many batches without keeping the hidden states. The loops in
:mod:`alignops.reference.represent` are the spec and the test oracle.

CCA / CKA / CHES (similarity scores between two sets of representations) live in :mod:`alignops.similarity`.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_floating, check_same_device
from ._errors import AlignopsError

TOKEN_PAIR_MODES = ("mean", "max", "median")
_EPS = 1e-12  # F.normalize's: a zero vector is its own unit vector, so it has cosine 0 with everything


class IMADatasetScore(NamedTuple):
    """Dataset-level IMA terms, fp32 (fp64 for fp64 hidden states); ``k = layer_offset``.

    ``cross``, ``cross_fixed``, ``token_pair`` [L] and ``change_perceptual``, ``change_textual`` [L-k]
    are means over the examples where the per-example term is defined (NaN where none is).
    ``cross_all_pairs`` [L] is the mean over every pair (i, j) of examples, i with perceptual and j with
    textual tokens, of cos(mean perceptual_i, mean textual_j) at layer l; ``cross_fixed_all_pairs`` [L]
    takes the perceptual means at the fixed layer. The counts are 0-dim int64 tensors: examples seen,
    with perceptual tokens, with textual tokens, with both.
    """

    cross: torch.Tensor
    cross_fixed: torch.Tensor
    token_pair: torch.Tensor
    change_perceptual: torch.Tensor
    change_textual: torch.Tensor
    cross_all_pairs: torch.Tensor
    cross_fixed_all_pairs: torch.Tensor
    num_examples: torch.Tensor
    num_perceptual: torch.Tensor
    num_textual: torch.Tensor
    num_paired: torch.Tensor


class IMAScore(NamedTuple):
    """Per-example IMA terms ([L, B]; the changes [L-k, B]) and their :class:`IMADatasetScore`."""

    cross: torch.Tensor
    cross_fixed: torch.Tensor
    token_pair: torch.Tensor
    change_perceptual: torch.Tensor
    change_textual: torch.Tensor
    dataset: IMADatasetScore


# ---- checks -----------------------------------------------------------------------------------------


def _as_layers(hidden_states) -> list[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor):
        if hidden_states.dim() != 4:
            raise AlignopsError(
                "hidden_states must be a 4-D tensor [L, B, T, H] or a sequence of L tensors "
                f"[B, T, H], got a tensor of shape {tuple(hidden_states.shape)}"
            )
        layers = list(hidden_states.unbind(0))
    elif isinstance(hidden_states, (list, tuple)):
        layers = list(hidden_states)
        for i, h in enumerate(layers):
            if not isinstance(h, torch.Tensor) or h.dim() != 3:
                got = f"shape {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
                raise AlignopsError(f"hidden_states[{i}] must be a 3-D tensor [B, T, H], got {got}")
            first = layers[0]
            if h.shape != first.shape or h.dtype != first.dtype or h.device != first.device:
                raise AlignopsError(
                    f"hidden_states[{i}] must match hidden_states[0] (shape {tuple(first.shape)}, "
                    f"{first.dtype}, {first.device}), got shape {tuple(h.shape)}, {h.dtype}, "
                    f"{h.device}"
                )
    else:
        raise AlignopsError(
            "hidden_states must be a 4-D tensor [L, B, T, H] or a sequence of L tensors [B, T, H], "
            f"got {type(hidden_states).__name__}"
        )
    if len(layers) < 1:
        raise AlignopsError("hidden_states must hold at least one layer (L >= 1), got L = 0")
    check_floating(layers[0], "hidden_states")
    return layers


def _check_options(mode: str, layer_offset: int, fixed_perceptual_layer: int, L: int) -> None:
    if mode not in TOKEN_PAIR_MODES:
        raise AlignopsError(f"unknown mode {mode!r}; valid modes: {', '.join(TOKEN_PAIR_MODES)}")
    if isinstance(layer_offset, bool) or not isinstance(layer_offset, int) or not 1 <= layer_offset < L:
        raise AlignopsError(
            f"layer_offset must be an int with 1 <= layer_offset < L = {L} (the number of layers), got {layer_offset!r}"
        )
    if (
        isinstance(fixed_perceptual_layer, bool)
        or not isinstance(fixed_perceptual_layer, int)
        or not -L <= fixed_perceptual_layer < L
    ):
        raise AlignopsError(
            f"fixed_perceptual_layer must be an int with -L <= fixed_perceptual_layer < L = {L}, "
            f"got {fixed_perceptual_layer!r}"
        )


def _check_masks(perceptual_mask, attention_mask) -> None:
    """What can be checked without the hidden states: types, ranks, dtypes, matching shapes."""
    if not isinstance(perceptual_mask, torch.Tensor) or perceptual_mask.dim() != 2:
        got = (
            f"shape {tuple(perceptual_mask.shape)}"
            if isinstance(perceptual_mask, torch.Tensor)
            else type(perceptual_mask).__name__
        )
        raise AlignopsError(f"perceptual_mask must be a 2-D bool tensor [B, T], got {got}")
    if perceptual_mask.dtype != torch.bool:
        raise AlignopsError(
            f"perceptual_mask must be a bool tensor [B, T] (True = perceptual token), got {perceptual_mask.dtype}"
        )
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != perceptual_mask.shape:
        got = (
            f"shape {tuple(attention_mask.shape)}"
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise AlignopsError(
            f"attention_mask must have the shape of perceptual_mask [B, T] = {tuple(perceptual_mask.shape)}, got {got}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise AlignopsError(
            f"attention_mask must be a bool or integer tensor (nonzero = real token), got {attention_mask.dtype}"
        )
    check_same_device([("perceptual_mask", perceptual_mask), ("attention_mask", attention_mask)])


# ---- one batch, layer by layer ------------------------------------------------------------------------


class _Tokens(NamedTuple):
    """Which tokens of a batch are perceptual / textual, as bool masks, weights and counts."""

    keep: torch.Tensor  # [B, T] bool: not padding
    p: torch.Tensor  # [B, T] acc-dtype 0/1 weights
    t: torch.Tensor
    p_bool: torch.Tensor
    t_bool: torch.Tensor
    n_p: torch.Tensor  # [B] int64
    n_t: torch.Tensor
    has_p: torch.Tensor  # [B] bool
    has_t: torch.Tensor
    paired: torch.Tensor
    acc: torch.dtype


def _tokens(perceptual_mask, attention_mask, h: torch.Tensor) -> _Tokens:
    B, T, _ = h.shape
    if perceptual_mask.shape != (B, T):
        raise AlignopsError(
            f"perceptual_mask must have shape [B, T] = {(B, T)} (from the hidden states), "
            f"got {tuple(perceptual_mask.shape)}"
        )
    check_same_device([("the hidden states", h), ("perceptual_mask", perceptual_mask)])
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    keep = torch.ones_like(perceptual_mask) if attention_mask is None else attention_mask != 0
    p_bool = perceptual_mask & keep
    t_bool = ~perceptual_mask & keep
    n_p, n_t = p_bool.sum(-1), t_bool.sum(-1)
    has_p, has_t = n_p > 0, n_t > 0
    return _Tokens(keep, p_bool.to(acc), t_bool.to(acc), p_bool, t_bool, n_p, n_t, has_p, has_t, has_p & has_t, acc)


def _masked_mean(h: torch.Tensor, weight: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, T, H], [B, T], [B] -> [B, H]; 0 where count is 0."""
    return torch.einsum("bt,bth->bh", weight, h) / count.clamp_min(1).unsqueeze(-1).to(h.dtype)


def _nan_where_not(defined: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(defined, x, torch.full_like(x, float("nan")))


def _token_pair(u: torch.Tensor, tok: _Tokens, mode: str) -> torch.Tensor:
    """Mean / max / median over the perceptual x textual token pairs of cos(h_a, h_c), per example [B]."""
    B, T, _ = u.shape
    if mode == "mean":  # mean_{a,c} u_a . u_c = (sum_a u_a) . (sum_c u_c) / (n_p n_t): O(T H), no T x T matrix
        sp = torch.einsum("bt,bth->bh", tok.p, u)
        st = torch.einsum("bt,bth->bh", tok.t, u)
        value = (sp * st).sum(-1) / (tok.n_p * tok.n_t).clamp_min(1).to(u.dtype)
    elif T == 0:
        value = u.new_zeros(B)
    else:
        sim = torch.bmm(u, u.transpose(1, 2))  # [B, T, T]; rows perceptual, columns textual are kept
        pair = tok.p_bool.unsqueeze(2) & tok.t_bool.unsqueeze(1)
        if mode == "max":
            value = sim.masked_fill(~pair, float("-inf")).amax(dim=(1, 2))
        else:  # numpy's median (the paper's): the mean of the two middle values for an even count
            ranked = sim.masked_fill(~pair, float("inf")).reshape(B, T * T).sort(dim=-1).values
            n = tok.n_p * tok.n_t
            lo = ((n - 1).clamp_min(0) // 2).unsqueeze(-1)
            hi = (n // 2).unsqueeze(-1)
            value = (0.5 * (ranked.gather(1, lo) + ranked.gather(1, hi))).squeeze(-1)
    return _nan_where_not(tok.paired, value)


class _LayerTerms(NamedTuple):
    cross: torch.Tensor  # [B]
    token_pair: torch.Tensor  # [B]
    cross_fixed: list[tuple[int, torch.Tensor]]  # (layer, [B]) for the layers that became computable now
    change: tuple[torch.Tensor, torch.Tensor] | None  # (perceptual, textual) [B] for layer l - k
    sum_unit_p: torch.Tensor  # [H]: sum over examples of unit(mean perceptual)
    sum_unit_t: torch.Tensor


class _BatchPass:
    """One batch through the layers in order. Holds the k most recent unit hidden states [B, T, H] (for
    the change), the fixed layer's unit perceptual means [B, H], and the unit textual means [B, H] of the
    layers before the fixed layer until it arrives."""

    def __init__(self, tok: _Tokens, mode: str, layer_offset: int, fixed_layer: int):
        self.tok, self.mode, self.k, self.f = tok, mode, layer_offset, fixed_layer
        self._window: deque[torch.Tensor] = deque()
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._fixed_p: torch.Tensor | None = None

    def layer(self, l: int, h: torch.Tensor) -> _LayerTerms:
        tok = self.tok
        # Padding is zeroed, not just weighted by 0: padded rows can hold NaN (fully masked attention rows).
        h = torch.where(tok.keep.unsqueeze(-1), h.to(tok.acc), 0)
        u = F.normalize(h, dim=-1, eps=_EPS)
        unit_p = F.normalize(_masked_mean(h, tok.p, tok.n_p), dim=-1, eps=_EPS)
        unit_t = F.normalize(_masked_mean(h, tok.t, tok.n_t), dim=-1, eps=_EPS)
        cross = _nan_where_not(tok.paired, (unit_p * unit_t).sum(-1))

        self._pending.append((l, unit_t))
        if l == self.f:
            self._fixed_p = unit_p
        cross_fixed = []
        if self._fixed_p is not None:
            cross_fixed = [(lt, _nan_where_not(tok.paired, (self._fixed_p * ut).sum(-1))) for lt, ut in self._pending]
            self._pending = []

        change = None
        if len(self._window) == self.k:
            c = (self._window.popleft() * u).sum(-1)  # [B, T]: cos(h_{l-k}[t], h_l[t])
            change = (
                _nan_where_not(tok.has_p, (c * tok.p).sum(-1) / tok.n_p.clamp_min(1).to(c.dtype)),
                _nan_where_not(tok.has_t, (c * tok.t).sum(-1) / tok.n_t.clamp_min(1).to(c.dtype)),
            )
        self._window.append(u)

        zero = unit_p.new_zeros(())
        return _LayerTerms(
            cross,
            _token_pair(u, tok, self.mode),
            cross_fixed,
            change,
            torch.where(tok.has_p.unsqueeze(-1), unit_p, zero).sum(0),
            torch.where(tok.has_t.unsqueeze(-1), unit_t, zero).sum(0),
        )


def _new_sums(L: int, k: int, H: int, acc: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The collector's running state: sums of the defined per-example terms, their counts, unit sums."""
    sizes = {"cross": L, "cross_fixed": L, "token_pair": L, "change_perceptual": L - k, "change_textual": L - k}
    sums = {name: torch.zeros(n, dtype=acc, device=device) for name, n in sizes.items()}
    sums.update({"n_" + name: torch.zeros(n, dtype=torch.int64, device=device) for name, n in sizes.items()})
    sums["sum_unit_p"] = torch.zeros(L, H, dtype=acc, device=device)
    sums["sum_unit_t"] = torch.zeros(L, H, dtype=acc, device=device)
    sums.update(
        {
            name: torch.zeros((), dtype=torch.int64, device=device)
            for name in ("num_examples", "num_perceptual", "num_textual", "num_paired")
        }
    )
    return sums


def _all_pairs(sum_unit_p, sum_unit_t, num_p, num_t, fixed_layer):
    """mean_{i,j} cos(p_i, t_j) = (mean_i unit p_i) . (mean_j unit t_j): O(N d) instead of N^2 cosines."""
    mean_p = sum_unit_p / num_p.to(sum_unit_p.dtype)  # 0 / 0 = NaN when no example has the modality
    mean_t = sum_unit_t / num_t.to(sum_unit_t.dtype)
    return (mean_p * mean_t).sum(-1), (mean_p[fixed_layer] * mean_t).sum(-1)


# ---- public API ---------------------------------------------------------------------------------------


def ima_score(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    perceptual_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    mode: str = "mean",
    layer_offset: int = 1,
    fixed_perceptual_layer: int = 0,
) -> IMAScore:
    r"""Implicit multimodal alignment (IMA) scores of a batch, per layer and per example [paper P1].

    ``hidden_states`` is a tensor [L, B, T, H] or a sequence of L tensors [B, T, H] (HF's
    ``output_hidden_states=True`` tuple: entry 0 is the embedding output); layer ``l`` is its position.
    ``perceptual_mask`` [B, T] bool marks perceptual tokens; ``attention_mask`` [B, T] (bool or integer,
    nonzero = real token) drops padding from both modalities. With P_b / T_b the perceptual / textual
    tokens of example b, ``p_b^l`` / ``t_b^l`` their mean hidden state at layer l, ``k = layer_offset``,
    ``f = fixed_perceptual_layer`` and cos(x, y) = x.y / (max(|x|, 1e-12) max(|y|, 1e-12)):

    =================== ========= ====================================================================
    cross               [L, B]    ``cos(p_b^l, t_b^l)``
    cross_fixed         [L, B]    ``cos(p_b^f, t_b^l)`` (perceptual side fixed at layer f, default 0)
    token_pair          [L, B]    ``mode`` (mean / max / median) of ``cos(h_l[a], h_l[c])`` over
                                  a in P_b, c in T_b; the median is numpy's (mean of the two middle
                                  values for an even count)
    change_perceptual   [L-k, B]  mean over t in P_b of ``cos(h_l[t], h_{l+k}[t])``
    change_textual      [L-k, B]  the same over T_b
    =================== ========= ====================================================================

    ``dataset`` (:class:`IMADatasetScore`) holds their means over the examples and ``cross_all_pairs``
    [L]: the mean over every pair (i, j), i with perceptual and j with textual tokens, of
    ``cos(p_i^l, t_j^l)``, computed in O(N H) as ``(mean_i unit(p_i^l)) . (mean_j unit(t_j^l))``
    (``cross_fixed_all_pairs`` the same with ``p_i^f``).

    Undefined terms are NaN: cross terms and ``token_pair`` for an example with no perceptual or no
    textual token, a change for an example without tokens of that modality. The dataset means skip NaN
    (``nanmean``; NaN where no example is defined); the all-pairs means use every example that has the
    modality on that side.

    Cost: O(L B T H) for everything except ``mode="max"`` / ``"median"``, which form the [B, T, T] token
    cosine matrix per layer (O(L B T^2 H), plus a sort for the median). Layers are processed one at a
    time: peak extra memory is about (k + 2) [B, T, H] in the accumulation dtype. Accumulated in fp32
    (fp64 for fp64 inputs; bf16 / fp16 accepted); outputs are in that dtype. Differentiable with
    respect to ``hidden_states``. No host synchronisation.

    Raises ValueError for hidden states that are not [L, B, T, H] / L x [B, T, H] floats of one shape,
    dtype and device, L < 1, a ``perceptual_mask`` that is not a bool [B, T] on their device, an
    ``attention_mask`` of another shape or a float dtype, an unknown ``mode`` (listing the valid ones),
    ``layer_offset`` outside [1, L) (so the
    change needs L >= 2) and ``fixed_perceptual_layer`` outside [-L, L).
    """
    layers = _as_layers(hidden_states)
    L = len(layers)
    _check_options(mode, layer_offset, fixed_perceptual_layer, L)
    _check_masks(perceptual_mask, attention_mask)
    f = fixed_perceptual_layer % L
    tok = _tokens(perceptual_mask, attention_mask, layers[0])
    batch = _BatchPass(tok, mode, layer_offset, f)
    rows: dict[str, list[torch.Tensor]] = {
        name: []
        for name in (
            "cross",
            "cross_fixed",
            "token_pair",
            "change_perceptual",
            "change_textual",
            "sum_unit_p",
            "sum_unit_t",
        )
    }
    for l, h in enumerate(layers):
        terms = batch.layer(l, h)
        rows["cross"].append(terms.cross)
        rows["token_pair"].append(terms.token_pair)
        rows["cross_fixed"].extend(value for _, value in terms.cross_fixed)  # they arrive in layer order
        if terms.change is not None:
            rows["change_perceptual"].append(terms.change[0])
            rows["change_textual"].append(terms.change[1])
        rows["sum_unit_p"].append(terms.sum_unit_p)
        rows["sum_unit_t"].append(terms.sum_unit_t)
    per_example = {
        name: torch.stack(rows[name])
        for name in ("cross", "cross_fixed", "token_pair", "change_perceptual", "change_textual")
    }
    num_p, num_t = tok.has_p.sum(), tok.has_t.sum()
    all_pairs, fixed_all_pairs = _all_pairs(
        torch.stack(rows["sum_unit_p"]), torch.stack(rows["sum_unit_t"]), num_p, num_t, f
    )
    dataset = IMADatasetScore(
        **{name: torch.nanmean(value, dim=1) for name, value in per_example.items()},
        cross_all_pairs=all_pairs,
        cross_fixed_all_pairs=fixed_all_pairs,
        num_examples=torch.full((), tok.keep.shape[0], dtype=torch.int64, device=tok.keep.device),
        num_perceptual=num_p,
        num_textual=num_t,
        num_paired=tok.paired.sum(),
    )
    return IMAScore(**per_example, dataset=dataset)


class InputOf(NamedTuple):
    """An :class:`IMACollector` layer read from a module's input instead of its output.

    The hook reads the module's first positional argument (or its ``hidden_states=`` keyword) as
    [B, T, H]. For a VLM, ``InputOf(<decoder>.layers[0])`` is the language model's input: the text
    embeddings with the image features merged in, which no module outputs (entry 0 of HF's
    ``output_hidden_states``).
    """

    module: nn.Module | str


class IMACollector:
    r"""Dataset-level IMA scores from forward hooks, over any number of forward passes.

    ::

        with alignops.represent.IMACollector(model, [model.model.embed_tokens, *model.model.layers]) as col:
            for batch in loader:
                col.set_masks(batch["perceptual_mask"], batch["attention_mask"])
                model(**batch)
        score = col.result()  # IMADatasetScore

    ``layers`` are modules of ``model`` (or their dotted names), listed in the order the forward pass
    runs them; layer ``l`` is position ``l`` in the list. Each hook reads the module's output (its first
    element when it is a tuple, as HF decoder layers return) as [B, T, H], or its input for an entry
    wrapped in :class:`InputOf`. HF's ``output_hidden_states`` is ``(input of layers[0], layers[0], ...,
    layers[L-2], norm(layers[L-1]))``; the same list of hooks, e.g. for a Qwen2-VL
    ``[InputOf("model.language_model.layers.0"), *(f"model.language_model.layers.{i}" for i in
    range(L - 1)), "model.language_model.norm"]``, gives the scores of ``ima_score`` on that tuple
    (on a text model ``"model.embed_tokens"`` outputs entry 0). The masks are those of
    :func:`ima_score`; ``set_masks`` (or the constructor's masks) applies to the next forward pass only,
    so a stale mask is never reused: set them before every pass.

    ``result()`` equals ``ima_score(...).dataset`` on all the batches concatenated along B (ragged T
    padded with ``attention_mask``). Running state is O(L H): per layer the sums of defined per-example
    terms and their counts, and the sums of unit modality means (for ``cross_all_pairs``). Within a
    pass it also holds the k = ``layer_offset`` most recent unit hidden states [B, T, H] and a few
    [B, H] means; no hidden state outlives its pass. A pass counts only once all L layers have fired;
    one that stopped early (an exception in the model) is dropped, with a warning, by the next
    ``set_masks``. Hooks are registered by ``attach()`` /
    ``__enter__`` and removed by ``detach()`` / ``__exit__``. Statistics are detached; run the model
    under ``torch.no_grad()`` and without activation checkpointing (which re-runs forward hooks).

    Raises ValueError for bad ``layers`` (not modules of ``model``), options or masks (as
    :func:`ima_score`), and RuntimeError when hooks fire out of order, a pass starts without masks, or
    ``result()`` is called with no complete pass or in the middle of one.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module | str | InputOf],
        *,
        perceptual_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "mean",
        layer_offset: int = 1,
        fixed_perceptual_layer: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise AlignopsError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._reads_input = [isinstance(layer, InputOf) for layer in layers]
        self._hooked = [
            self._resolve(model, i, layer.module if isinstance(layer, InputOf) else layer)
            for i, layer in enumerate(layers)
        ]
        self.num_layers = L = len(self._hooked)
        if L < 1:
            raise AlignopsError("layers must name at least one module (L >= 1), got none")
        _check_options(mode, layer_offset, fixed_perceptual_layer, L)
        self.mode, self.layer_offset, self.fixed_layer = mode, layer_offset, fixed_perceptual_layer % L
        self._handles: list = []
        self._masks = None
        self._next = 0
        self._pass: _BatchPass | None = None
        self._passes = 0
        self._current: dict[str, torch.Tensor] | None = None  # sums of the pass in progress
        self._totals: dict[str, torch.Tensor] | None = None
        if perceptual_mask is not None:
            self.set_masks(perceptual_mask, attention_mask)
        elif attention_mask is not None:
            raise AlignopsError("attention_mask was given without perceptual_mask")

    @staticmethod
    def _resolve(model: nn.Module, i: int, layer) -> nn.Module:
        if isinstance(layer, str):
            try:
                return model.get_submodule(layer)
            except AttributeError as e:
                raise AlignopsError(f"layers[{i}] = {layer!r} is not a submodule of model: {e}") from None
        if isinstance(layer, nn.Module):
            if not any(m is layer for m in model.modules()):
                raise AlignopsError(f"layers[{i}] ({type(layer).__name__}) is not a submodule of model")
            return layer
        raise AlignopsError(f"layers[{i}] must be an nn.Module or a submodule name, got {type(layer).__name__}")

    def set_masks(self, perceptual_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Masks [B, T] of the next forward pass (as for :func:`ima_score`)."""
        _check_masks(perceptual_mask, attention_mask)
        if self._next != 0:
            warnings.warn(
                f"IMACollector: the previous forward pass stopped after layers[{self._next - 1}] of "
                f"{self.num_layers} (an exception, or a model that skips layers); it is dropped",
                stacklevel=2,
            )
            self._next, self._pass, self._current = 0, None, None
        self._masks = (perceptual_mask, attention_mask)

    def attach(self) -> IMACollector:
        """Register the forward hooks (idempotent); returns self."""
        if not self._handles:
            self._handles = [
                m.register_forward_pre_hook(self._input_hook_for(i), with_kwargs=True)
                if self._reads_input[i]
                else m.register_forward_hook(self._hook_for(i))
                for i, m in enumerate(self._hooked)
            ]
        return self

    def detach(self) -> None:
        """Remove the hooks; the statistics so far stay readable with ``result()``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> IMACollector:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook_for(self, position: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self._read(position, h, "output a float tensor [B, T, H] (or a tuple starting with one)")

        return hook

    def _input_hook_for(self, position: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            self._read(position, h, "take a float tensor [B, T, H] as its first argument (or hidden_states=)")

        return hook

    def _read(self, position: int, h, expected: str) -> None:
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or not h.is_floating_point():
            got = f"shape {tuple(h.shape)}, {h.dtype}" if isinstance(h, torch.Tensor) else type(h).__name__
            raise AlignopsError(f"IMACollector: layers[{position}] must {expected}, got {got}")
        with torch.no_grad():
            self._layer(position, h.detach())

    def _layer(self, l: int, h: torch.Tensor) -> None:
        L, k = self.num_layers, self.layer_offset
        if l != self._next:
            raise RuntimeError(
                f"IMACollector: expected the output of layers[{self._next}], got layers[{l}]: "
                "list layers in the order the forward pass runs them, one pass at a time"
            )
        if l == 0:
            if self._masks is None:
                raise RuntimeError(
                    "IMACollector: a forward pass started without masks: call "
                    "set_masks(perceptual_mask, attention_mask) before each forward pass"
                )
            tok = _tokens(*self._masks, h)
            self._masks = None
            if self._totals is not None and h.shape[-1] != self._totals["sum_unit_p"].shape[-1]:
                raise AlignopsError(
                    f"IMACollector: layers[0] output hidden size {h.shape[-1]}, expected "
                    f"{self._totals['sum_unit_p'].shape[-1]} (as in earlier passes)"
                )
            self._current = _new_sums(L, k, h.shape[-1], tok.acc, h.device)
            self._current["num_examples"] += h.shape[0]
            self._current["num_perceptual"] += tok.has_p.sum()
            self._current["num_textual"] += tok.has_t.sum()
            self._current["num_paired"] += tok.paired.sum()
            self._pass = _BatchPass(tok, self.mode, k, self.fixed_layer)
        s = self._current
        if h.shape[-1] != s["sum_unit_p"].shape[-1]:
            raise AlignopsError(
                f"IMACollector: layers[{l}] output hidden size {h.shape[-1]}, "
                f"expected {s['sum_unit_p'].shape[-1]} (as layers[0])"
            )
        terms = self._pass.layer(l, h)

        def add(name: str, index: int, value: torch.Tensor) -> None:
            defined = ~torch.isnan(value)
            s[name][index] += torch.where(defined, value, 0).sum()
            s["n_" + name][index] += defined.sum()

        add("cross", l, terms.cross)
        add("token_pair", l, terms.token_pair)
        for lt, value in terms.cross_fixed:
            add("cross_fixed", lt, value)
        if terms.change is not None:
            add("change_perceptual", l - k, terms.change[0])
            add("change_textual", l - k, terms.change[1])
        s["sum_unit_p"][l] += terms.sum_unit_p
        s["sum_unit_t"][l] += terms.sum_unit_t

        self._next = l + 1
        if self._next == L:  # a pass counts only once complete
            if self._totals is None:
                self._totals = s
            else:
                for name, value in s.items():
                    self._totals[name] += value.to(self._totals[name].dtype)
            self._next, self._pass, self._current = 0, None, None
            self._passes += 1

    def result(self) -> IMADatasetScore:
        """Dataset-level scores over every complete forward pass so far."""
        if self._next != 0:
            raise RuntimeError(
                f"IMACollector: result() in the middle of a forward pass "
                f"(after layers[{self._next - 1}] of {self.num_layers})"
            )
        if self._passes == 0:
            raise RuntimeError(
                "IMACollector: no complete forward pass recorded (are the hooks attached? "
                "use `with IMACollector(...) as col:` or col.attach())"
            )
        s = self._totals
        means = {
            name: s[name] / s["n_" + name].to(s[name].dtype)
            for name in (  # 0 / 0 = NaN: none defined
                "cross",
                "cross_fixed",
                "token_pair",
                "change_perceptual",
                "change_textual",
            )
        }
        all_pairs, fixed_all_pairs = _all_pairs(
            s["sum_unit_p"], s["sum_unit_t"], s["num_perceptual"], s["num_textual"], self.fixed_layer
        )
        return IMADatasetScore(
            **means,
            cross_all_pairs=all_pairs,
            cross_fixed_all_pairs=fixed_all_pairs,
            num_examples=s["num_examples"].clone(),
            num_perceptual=s["num_perceptual"].clone(),
            num_textual=s["num_textual"].clone(),
            num_paired=s["num_paired"].clone(),
        )


__all__ = ["TOKEN_PAIR_MODES", "IMADatasetScore", "IMAScore", "IMACollector", "InputOf", "ima_score"]
