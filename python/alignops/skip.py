"""FFN skipping for perceptual tokens (IMA, Shukor & Cord): the FFN runs on the kept rows only.

Perceptual (image / video / audio) tokens change little across the layers of a frozen LLM, so a
decoder layer can skip their FFN: ``y = x + FFN(RMSNorm(x))`` on kept rows, ``y = x`` (bit-identical)
on skipped rows. :func:`skip_ffn` is the op; :class:`SkipSchedule` and :func:`patch_ffn_skipping`
apply it to HF-style (LLaMA / Qwen) decoder layers, including the language model of a VLM (Qwen2-VL,
LLaVA), whose image tokens :meth:`FFNSkipper.skipping_tokens` skips through ``generate()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import _backend
from ._api import keyword_only
from ._checks import check_floating, check_not_nan
from ._codes import Activation, Criterion, lower_name
from ._errors import AlignopsError
from .ops._registration import run_checks
from .reference import skip as _ref

_ACTIVATION_CODES = {lower_name(code): code for code in Activation}
_CRITERION_CODES = {lower_name(code): code for code in Criterion}
_CRITERIA = tuple(_CRITERION_CODES)


@keyword_only("criterion")
def change_score(x: torch.Tensor, previous: torch.Tensor, *, criterion: str = "cosine") -> torch.Tensor:
    r"""How much each token changed in this layer, per row (fp32; fp64 for fp64).

    ``"cosine"``: ``1 - cos(x, previous)``; ``"norm_ratio"``: ``|x - previous| / |previous|`` (the norm
    of the attention delta relative to the residual stream). ``x`` is the residual stream after the
    attention add, ``previous`` the same stream before it; shapes [..., H]. :func:`skip_ffn` with
    ``delta=`` computes it inside the residual add instead (one pass, no extra read of the rows).
    """
    if criterion not in _CRITERIA:
        raise AlignopsError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    if previous.shape != x.shape:
        raise AlignopsError(f"previous must have the shape of x {tuple(x.shape)}, got {tuple(previous.shape)}")
    return _ref.change_score(x, previous, criterion)


def keep_from_spans(skip_spans: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, T] keep mask that is False inside any ``[start, end)`` span of ``skip_spans`` [B, S, 2]."""
    if skip_spans.dim() != 3 or skip_spans.shape[-1] != 2:
        raise AlignopsError(
            f"skip_spans must have shape [B, S, 2] (start, end per span), got {tuple(skip_spans.shape)}"
        )
    if skip_spans.dtype not in (torch.int64, torch.int32):
        raise AlignopsError(f"skip_spans must be int64 or int32, got {skip_spans.dtype}")
    if skip_spans.device.type == "cpu" and not torch.compiler.is_compiling():
        start, end = skip_spans[..., 0], skip_spans[..., 1]
        if bool(((start < 0) | (end > seq_len) | (end < start)).any()):
            raise AlignopsError(f"skip_spans must satisfy 0 <= start <= end <= T = {seq_len}")
    t = torch.arange(seq_len, device=skip_spans.device)
    inside = (t >= skip_spans[..., 0, None]) & (t < skip_spans[..., 1, None])  # [B, S, T]
    return ~inside.any(1)


@keyword_only("capacity")
def keep_top_k(score: torch.Tensor, *, capacity: int | float) -> torch.Tensor:
    """[B, T] mask keeping, per sequence, the ``capacity`` rows (a count, or a fraction of T) that changed most."""
    T = score.shape[-1]
    k = int(round(capacity * T)) if isinstance(capacity, float) else int(capacity)
    if not 0 <= k <= T:
        raise AlignopsError(f"capacity must give 0 <= k <= T = {T} rows per sequence, got {capacity}")
    keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return keep.scatter_(-1, score.topk(k, dim=-1).indices, True)


def _keep_mask(x, keep, skip_spans, threshold, capacity, previous, criterion, score=None):
    given = [
        name
        for name, v in (("keep", keep), ("skip_spans", skip_spans), ("threshold", threshold), ("capacity", capacity))
        if v is not None
    ]
    if len(given) > 1:
        raise AlignopsError(f"give one of keep, skip_spans, threshold, capacity; got {given}")
    lead = x.shape[:-1]
    if not given:
        return torch.ones(lead, dtype=torch.bool, device=x.device)
    if keep is not None:
        if keep.dtype != torch.bool or keep.shape != lead:
            raise AlignopsError(
                f"keep must be a bool tensor of shape {list(lead)} (the rows of x), got {keep.dtype} {list(keep.shape)}"
            )
        return keep
    if skip_spans is not None:
        if x.dim() != 3:
            raise AlignopsError("skip_spans needs x of shape [B, T, H]")
        keep = keep_from_spans(skip_spans, x.shape[1])
        if keep.shape[0] != x.shape[0]:
            raise AlignopsError(f"skip_spans must have one row per sequence (B = {x.shape[0]}), got {keep.shape[0]}")
        return keep
    if score is None:
        if previous is None:
            raise AlignopsError(
                "threshold and capacity rank tokens by their change in this layer: pass previous "
                "(the residual stream before the attention add) or delta (the attention output)"
            )
        score = change_score(x, previous, criterion=criterion)
    if threshold is not None:
        return score > threshold
    if x.dim() != 3:
        raise AlignopsError("capacity is per sequence: it needs x of shape [B, T, H]")
    return keep_top_k(score, capacity=capacity)


def skip_ffn(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    *,
    keep: torch.Tensor | None = None,
    skip_spans: torch.Tensor | None = None,
    threshold: float | None = None,
    capacity: int | float | None = None,
    previous: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    criterion: str = "cosine",
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "swiglu",
    eps: float = 1e-6,
    inplace: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Residual FFN block on the kept rows only; skipped rows come out bit-identical.

    ``y = x + W_down act(W_gate_up RMSNorm(x) + b_gate_up) + b_down`` on kept rows and ``y = x`` on the
    others. ``x`` is [B, T, H] or [N, H]; ``w_gate_up`` is [2I, H] for ``activation="swiglu"`` (gate
    rows first: ``act = silu(gate) * up``, LLaMA / Qwen) or [I, H] for ``"gelu"`` / ``"gelu_tanh"``;
    ``w_down`` [H, I]; ``norm_weight`` [H] (RMSNorm as HF's LlamaRMSNorm, skipped when None).

    Which rows run (at most one of):

    - ``keep``: bool mask of x's leading shape (True = compute);
    - ``skip_spans``: [B, S, 2] int ``[start, end)`` spans per sequence to skip (the perceptual tokens);
    - ``threshold``: keep rows whose :func:`change_score` against ``previous`` exceeds it;
    - ``capacity``: keep the top-k rows per sequence by that score (k rows, or a fraction of T) —
      static shapes.

    The score compares the rows with ``previous`` (the stream before the attention add). Or pass
    ``delta`` (the attention output) instead: ``x`` is then the residual before the add, the block runs
    on ``h = x + delta``, and one fused pass writes h and scores every row (``criterion`` ``"cosine"``:
    1 - cos(h, x); ``"norm_ratio"``: |delta| / |x|) — the decoder layer's add, criterion and output
    buffer in one read of the rows.

    ``inplace=True`` (inference) writes the kept rows of ``x`` and never touches the skipped ones (no
    copy of x); with ``delta`` and no gradient needed, the fresh h buffer is always updated in place.

    The kept rows are compacted (no host sync on a GPU: capacity-sized buffers and a device-side
    count), normalised during the gather, sent through the two GEMMs with the activation fused in
    between, and the second GEMM accumulates straight into the gathered residual rows before they are
    scattered back. On the CPU, weights registered with :func:`prepack` (inference) multiply in oneDNN's
    packed layout: bf16 rows in blocks of at most 224 (the GEMM's fastest size here), fp32 when at most
    224 rows are kept. fp32 / bf16 / fp16 (fp32 accumulation), fp64 on the CPU. Differentiable in x,
    the weights and the biases; skipped rows pass the gradient through unchanged. The backward syncs
    once (the number of kept rows sizes its GEMMs).

    Raises ValueError for shape / dtype / device mismatches, a keep mask of the wrong shape, spans out
    of range, an ``eps`` that is not finite and > 0, a NaN ``threshold``, more than one keep criterion,
    both ``previous`` and ``delta``, and ``inplace=True`` when a gradient is needed.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise AlignopsError(f"x must be a tensor of shape [B, T, H] or [N, H], got {getattr(x, 'shape', type(x))}")
    if x.shape[-1] == 0:
        raise AlignopsError(f"x must have a hidden size H >= 1, got shape {tuple(x.shape)}")
    if activation not in _ACTIVATION_CODES:
        raise AlignopsError(f"activation must be one of {tuple(_ACTIVATION_CODES)}, got {activation!r}")
    if threshold is not None:
        check_not_nan(threshold, "threshold")
    check_floating(x, "x")  # before the scores below compute on x (the op checks it again)
    if criterion not in _CRITERIA:
        raise AlignopsError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    impl = _backend.resolve(backend, x.device, "skip_ffn", native_cuda=False)
    H = x.shape[-1]
    score = None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, delta, w_gate_up, w_down, norm_weight, b_gate_up, b_down)
    )
    if inplace and needs_grad:
        raise AlignopsError(
            "inplace=True overwrites x and records no gradient: use it under torch.no_grad() "
            "(or with inputs that do not require grad)"
        )
    if delta is not None:
        if previous is not None:
            raise AlignopsError("give previous (the stream before the add) or delta (the attention output), not both")
        if delta.shape != x.shape:  # the public layout; dtype and device: the op's checks, on every backend
            raise AlignopsError(f"delta must match x: shape {tuple(x.shape)}, got {tuple(delta.shape)}")
        code = int(_CRITERION_CODES[criterion])
        rows = (x.reshape(-1, H), delta.reshape(-1, H), code)  # the op's arguments
        run_checks("alignops::skip_add_score", *rows)
        if impl == "torch":
            h, score = _ref.add_score(x, delta, criterion)
        else:
            op = torch.ops.alignops.skip_add_score if impl == "native" else torch.ops.alignops.skip_add_score_triton
            h, score = op(*rows)
            h, score = h.reshape(x.shape), score.reshape(x.shape[:-1])
        target = h if not needs_grad else None
        x = h
    else:
        target = x if inplace else None
    mask = _keep_mask(x, keep, skip_spans, threshold, capacity, previous, criterion, score)
    code = int(_ACTIVATION_CODES[activation])
    args = (x.reshape(-1, H), mask.reshape(-1), w_gate_up, w_down, norm_weight, b_gate_up, b_down, code, float(eps))
    # The op's own checks (csrc/skip/skip_ffn_cpu.cpp), here for every backend so that they raise AlignopsError.
    run_checks("alignops::skip_ffn", *args, False)
    if impl == "torch":
        y = _ref.skip_ffn(x, w_gate_up, w_down, norm_weight, mask, b_gate_up, b_down, activation, eps)
        return target.copy_(y) if target is not None else y
    if target is not None:
        if not target.is_contiguous():
            raise AlignopsError("inplace=True needs a contiguous x")
        op = torch.ops.alignops.skip_ffn_ if impl == "native" else torch.ops.alignops.skip_ffn_triton_
        op(target.view(-1, H), *args[1:])
        return target
    op = torch.ops.alignops.skip_ffn if impl == "native" else torch.ops.alignops.skip_ffn_triton
    y = op(*args, needs_grad)[0]
    return y.reshape(x.shape)


# ---- prepacked weights (CPU inference) -----------------------------------------------------------------


_PACKABLE = (torch.bfloat16, torch.float32)


def _check_weights_to_pack(weights, on_cpu: bool = True) -> None:
    if not weights:
        raise AlignopsError("give at least one weight")
    for w in weights:
        if not isinstance(w, torch.Tensor):
            raise AlignopsError(f"weights must be tensors, got {type(w).__name__}")
        if on_cpu and w.device.type != "cpu":
            raise AlignopsError(
                f"prepacked weights live on the CPU; got {w.device} (on a GPU the GEMMs need no packing)"
            )


def prepack(*weights: torch.Tensor, batch_size: int | None = None) -> None:
    """CPU inference: keep a oneDNN-prepacked copy of each weight (``w_gate_up`` [2I, H] / ``w_down`` [H, I],
    bfloat16 or float32) that :func:`skip_ffn` then multiplies with.

    A BF16 GEMM through ``torch.mm`` re-lays its weight out on every call; at the few rows skipping leaves
    that is a fixed cost about as large as the GEMM, so the time would not fall with the kept fraction.
    The copy costs the weight's memory once more, so registration is explicit (also
    ``patch_ffn_skipping(..., prepack=True)``). It is tied to the weight tensor object: an in-place update
    of the weight (which bumps its version) or a new storage (``param.data = other``) repacks it on its next
    use; changes that bump no version (``w.data.mul_(...)``) are not seen, so register the weight again
    after them. Inference tensors (created under ``torch.inference_mode()``) keep no version and are
    refused. The copy is dropped by :func:`unprepack`, or after the weight itself is freed (at the next
    registration). Results equal the unpacked path up to the GEMM's rounding; skipped rows stay
    bit-identical. Used only when no gradient is recorded: bf16 always, fp32 when at most 224 rows are kept
    (above that MKL's GEMMs on the plain weights are faster). ``batch_size``: the row count oneDNN tunes
    the layout for (default: its own choice).
    """
    _check_weights_to_pack(weights)
    try:
        torch.ops.alignops.skip_ffn_prepack(list(weights), True, batch_size)
    except RuntimeError as e:  # oneDNN's own message names neither the argument nor the value
        if batch_size is None:
            raise
        raise AlignopsError(
            f"batch_size={batch_size}: oneDNN found no weight layout for that many rows; pass "
            f"the batch size it will see, or None ({e})"
        ) from None


def unprepack(*weights: torch.Tensor) -> None:
    """Drop the prepacked copies of these weights (see :func:`prepack`), wherever the weights are now."""
    _check_weights_to_pack(weights, on_cpu=False)
    torch.ops.alignops.skip_ffn_prepack(list(weights), False, None)


def is_prepacked(w: torch.Tensor) -> bool:
    """True when ``w`` is registered with :func:`prepack` (a query: it never repacks)."""
    return bool(torch.ops.alignops.skip_ffn_is_prepacked(w))


# ---- applying it to a model --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SkipSchedule:
    """Layers whose FFN skips: ``start <= l < end`` and ``(l - start) % interval == 0`` (IMA's schedule)."""

    start: int = 0
    end: int | None = None
    interval: int = 1

    def __post_init__(self):
        if self.start < 0 or self.interval < 1 or (self.end is not None and self.end < self.start):
            raise AlignopsError(f"SkipSchedule needs 0 <= start <= end and interval >= 1, got {self}")

    def layers(self, num_layers: int) -> list[int]:
        end = num_layers if self.end is None else min(self.end, num_layers)
        return list(range(self.start, end, self.interval))


class _Passthrough(torch.nn.Module):
    """Stands in for post_attention_layernorm: the norm is fused into skip_ffn's gather."""

    def forward(self, x):
        return x


# Decoder layers that norm around the FFN more than once (Gemma 2 / 3: post_attention_layernorm is applied to
# the attention output, then pre_feedforward_layernorm feeds the MLP) do not have the LLaMA block skip_ffn fuses.
_FOREIGN_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _probe(module: torch.nn.Module, H: int, like: torch.Tensor, expected) -> bool:
    """Runs ``module`` on a fixed probe [3, H] and compares it with ``expected(probe)``.

    The patcher fuses a norm and an MLP it cannot read the code of: a probe tells a LLaMA RMSNorm from
    Gemma's ``(1 + w)`` one, and SiLU from the GELU of a ``hidden_act="gelu"`` config, before the model
    silently computes something else. Skipped (True) on the meta device, which holds no values.
    """
    if like.device.type == "meta":
        return True
    probe = torch.linspace(-3, 3, 3 * H, dtype=torch.float64).reshape(3, H).to(like.dtype).to(like.device)
    with torch.no_grad():
        got, exp = module(probe), expected(probe)
    tol = 1e-4 if like.dtype in (torch.float32, torch.float64) else 2e-2
    return isinstance(got, torch.Tensor) and got.shape == exp.shape and torch.allclose(got, exp, rtol=tol, atol=tol)


def _norm_eps(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _check_layer(i: int, layer: torch.nn.Module, prepack: bool) -> None:
    """Refuses, before anything is patched, a layer whose FFN block is not ``x + down(silu(gate(n)) * up(n))``
    with ``n`` a LLaMA RMSNorm of the residual stream ``x`` (biases allowed)."""
    for name in ("mlp", "post_attention_layernorm"):
        if not hasattr(layer, name):
            raise AlignopsError(
                f"layer {i} has no `{name}`: patch_ffn_skipping expects HF-style LLaMA/Qwen decoder layers"
            )
    for name in _FOREIGN_NORMS:
        if hasattr(layer, name):
            raise AlignopsError(
                f"layer {i} has a `{name}` (Gemma-style norms around the FFN): patch_ffn_skipping "
                "fuses one RMSNorm before the FFN, as LLaMA / Qwen decoder layers have"
            )
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    projs = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(not isinstance(getattr(p, "weight", None), torch.Tensor) for p in projs):
        raise AlignopsError(
            f"layer {i}'s mlp must have gate_proj, up_proj and down_proj linear layers "
            f"(LLaMA / Qwen MLP), got {type(mlp).__name__}"
        )
    gate, up, down = projs
    H, I = down.weight.shape
    if gate.weight.shape != (I, H) or up.weight.shape != (I, H):
        raise AlignopsError(
            f"layer {i}'s gate_proj and up_proj must have weights [I, H] = {[I, H]} "
            f"(down_proj is {[H, I]}), got {list(gate.weight.shape)} and {list(up.weight.shape)}"
        )
    w = down.weight
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, torch.nn.Module) or not _probe(act, H, w, torch.nn.functional.silu):
        raise AlignopsError(
            f"layer {i}'s mlp.act_fn must be SiLU (SwiGLU: down(silu(gate(x)) * up(x))), got "
            f"{type(act).__name__}: skip_ffn fuses SwiGLU only for gated MLPs"
        )
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (H,):
        raise AlignopsError(
            f"layer {i}'s post_attention_layernorm must be an RMSNorm with a weight [H] = [{H}], "
            f"got {type(norm).__name__}"
        )
    if not _probe(norm, H, w, lambda x: _ref.rms_norm(x, weight, _norm_eps(norm))):
        raise AlignopsError(
            f"layer {i}'s post_attention_layernorm ({type(norm).__name__}) does not compute "
            "LLaMA's RMSNorm weight * x / sqrt(mean(x^2) + eps) (Gemma's (1 + weight) form, or a "
            "LayerNorm, cannot be fused)"
        )
    for name, p in zip(("gate_proj", "up_proj", "down_proj"), projs):
        if prepack and (p.weight.device.type != "cpu" or p.weight.dtype not in _PACKABLE):
            raise AlignopsError(f"prepack=True needs layer {i}'s FFN weights on the CPU in bfloat16 or float32")
        if p.weight.dtype != w.dtype or p.weight.device != w.device:
            raise AlignopsError(
                f"layer {i}'s {name} must have the dtype and device of down_proj "
                f"({w.dtype}, {w.device}), got {p.weight.dtype}, {p.weight.device}"
            )


class _SkippingMLP(torch.nn.Module):
    """Replaces a LLaMA-style MLP (gate_proj, up_proj, down_proj, SiLU; biases optional) and the norm before it.

    With no keep mask set it runs the original norm and MLP (bit-identical to the unpatched layer); with one,
    :func:`skip_ffn` on the residual stream it receives in place of the norm's output.
    """

    def __init__(self, mlp: torch.nn.Module, norm: torch.nn.Module, skipper: FFNSkipper):
        super().__init__()
        self.mlp, self.norm, self.skipper = mlp, norm, skipper
        self._fused: tuple | None = None

    def _gate_up_bias(self) -> torch.Tensor | None:
        gb, ub = self.mlp.gate_proj.bias, self.mlp.up_proj.bias
        if gb is None and ub is None:
            return None
        gate_w = self.mlp.gate_proj.weight
        zeros = gate_w.new_zeros(gate_w.shape[0])  # a config may bias one projection only
        return torch.cat([zeros if gb is None else gb, zeros if ub is None else ub])

    def _gate_up(self) -> torch.Tensor:
        g, u = self.mlp.gate_proj.weight, self.mlp.up_proj.weight
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return torch.cat([g, u])  # differentiable; re-formed every step in training
        key = (g.data_ptr(), g._version, u.data_ptr(), u._version)
        if self._fused is None or self._fused[0] != key:
            self.release()
            fused = torch.cat([g, u]).detach()
            # registered only where packing applies: the model may have moved off the CPU since patching
            packed = self.skipper.prepack and fused.device.type == "cpu" and fused.dtype in _PACKABLE
            if packed:
                prepack(fused, self.mlp.down_proj.weight)
            self._fused = (key, fused, packed)
        return self._fused[1]

    def release(self) -> None:
        if self._fused is not None and self._fused[2]:
            unprepack(self._fused[1], self.mlp.down_proj.weight)
        self._fused = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.skipper.keep
        if keep is None:
            # Nothing to skip: the layer's own modules, so the patched model equals the unpatched one bit for bit.
            return self.mlp(self.norm(x))
        if keep.shape != x.shape[:-1]:
            raise AlignopsError(
                f"the keep mask set on FFNSkipper has shape {list(keep.shape)}, but the layer sees "
                f"hidden states of shape {list(x.shape)} (a decode step of generate() sees only the "
                "new tokens: use skipper.skipping_tokens(model, token_ids) there)"
            )
        y = skip_ffn(
            x,
            self._gate_up(),
            self.mlp.down_proj.weight,
            self.norm.weight,
            keep=keep.to(x.device),
            b_gate_up=self._gate_up_bias(),
            b_down=self.mlp.down_proj.bias,
            eps=_norm_eps(self.norm),
            backend=self.skipper.backend,
        )
        # The decoder layer adds the residual back: return the delta. Skipped rows give exactly 0 (y == x).
        return y - x


def _input_ids(args, kwargs) -> torch.Tensor:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise AlignopsError(
            f"skipping_tokens reads the model's input_ids [B, T] (int64) at each forward call, got "
            f"{got}: call the model with input_ids, not inputs_embeds"
        )
    return ids


class FFNSkipper:
    """Patches HF-style decoder layers (``post_attention_layernorm`` + ``mlp`` with gate/up/down_proj).

    Example::

        skipper = patch_ffn_skipping(model, SkipSchedule(start=8, interval=1))
        with skipper.skipping_tokens(model, perceptual_token_ids(model.config)):  # a VLM's image tokens
            out = model.generate(**inputs)      # prefill and every decode step, KV cache included
        with skipper.skipping(~perceptual_mask):  # or a fixed [B, T] mask (True = computed), one shape
            out = model(**inputs)
        skipper.remove()

    With no mask set the scheduled layers run their own modules: the model equals the unpatched one bit for
    bit. With a mask, :func:`skip_ffn` runs the norm and the FFN on the kept rows (the kept rows equal the
    dense layer up to the GEMMs' rounding; the skipped rows leave the FFN's residual add unchanged).
    ``prepack=True`` (CPU inference, bf16 / fp32 weights) keeps oneDNN-prepacked copies of the scheduled
    layers' FFN weights (see :func:`prepack`; one more copy of those weights in memory), dropped by
    :meth:`remove`. ``backend`` is :func:`skip_ffn`'s. While patched, a layer's FFN parameters sit under
    ``mlp.mlp.*`` and its norm under ``mlp.norm.*``: :meth:`remove` before saving a checkpoint.
    """

    def __init__(
        self, layers: Sequence[torch.nn.Module], schedule: SkipSchedule, prepack: bool = False, backend: str = "auto"
    ):
        if backend not in _backend.BACKENDS:
            raise AlignopsError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.keep: torch.Tensor | None = None
        self.prepack, self.backend = prepack, backend
        self._patched = []
        self._hooks = []
        chosen = schedule.layers(len(layers))
        for i in chosen:  # every layer is checked before any is patched
            _check_layer(i, layers[i], prepack)
        for i in chosen:
            layer = layers[i]
            mlp, norm = layer.mlp, layer.post_attention_layernorm
            self._patched.append((layer, mlp, norm))
            layer.mlp = _SkippingMLP(mlp, norm, self)
            layer.post_attention_layernorm = _Passthrough()

    @property
    def patched_layers(self) -> list[torch.nn.Module]:
        """The decoder layers whose FFN skips, in order."""
        return [layer for layer, _, _ in self._patched]

    def skipping(self, keep: torch.Tensor | None):
        """Context manager: rows with ``keep`` False skip the FFN of every scheduled layer.

        ``keep`` [B, T] bool must match every forward pass inside (one prompt length); ``None`` computes
        every row with the original modules. For ``generate()`` use :meth:`skipping_tokens`.
        """
        skipper = self

        class _Ctx:
            def __enter__(self):
                self.previous = skipper.keep
                skipper.keep = keep
                return skipper

            def __exit__(self, *exc):
                skipper.keep = self.previous
                return False

        return _Ctx()

    def skipping_tokens(self, model: torch.nn.Module, token_ids: int | Sequence[int] | torch.Tensor):
        """Context manager: at every forward call of ``model``, the tokens whose id is in ``token_ids`` skip.

        A forward pre-hook on ``model`` reads its ``input_ids`` [B, T] and sets ``keep = ~isin(input_ids,
        token_ids)`` for that call (cleared when it returns), so the mask follows the tokens through
        ``generate()``: the prefill skips the image tokens of the prompt, and each decode step (only the new
        tokens, with the KV cache) computes its text tokens. The mask lives for the call only: with gradient
        checkpointing (which re-runs the layers in the backward) use :meth:`skipping` around the forward and
        the backward instead. ``model`` must be called with ``input_ids``
        (the module that receives them: the ``...ForConditionalGeneration`` of a VLM, which merges the image
        features in). ``token_ids``: e.g. ``perceptual_token_ids(model.config)``.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() == 0:
            raise AlignopsError("token_ids must name at least one token id to skip, got none")
        if not isinstance(model, torch.nn.Module):
            raise AlignopsError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        skipper = self
        outer: list[torch.Tensor | None] = []  # the mask each running call replaced (calls may nest)

        def before(module, args, kwargs):
            input_ids = _input_ids(args, kwargs)
            outer.append(skipper.keep)
            skipper.keep = ~torch.isin(input_ids, ids.to(input_ids.device))

        def after(module, args, kwargs, output):
            if outer:  # empty when the pre-hook itself raised
                skipper.keep = outer.pop()

        class _Ctx:
            def __enter__(self):
                self.previous = skipper.keep
                self.handles = [
                    model.register_forward_pre_hook(before, with_kwargs=True),
                    model.register_forward_hook(after, with_kwargs=True, always_call=True),
                ]
                skipper._hooks.extend(self.handles)
                return skipper

            def __exit__(self, *exc):
                for handle in self.handles:
                    handle.remove()
                    skipper._hooks.remove(handle)
                skipper.keep = self.previous
                return False

        return _Ctx()

    def remove(self) -> None:
        """Restores the original modules (and removes the hooks of an open :meth:`skipping_tokens`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.keep = None
        for layer, mlp, norm in self._patched:
            layer.mlp.release()
            layer.mlp, layer.post_attention_layernorm = mlp, norm
        self._patched = []


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM or VLM: the one ``nn.ModuleList`` whose layers all have an ``mlp``
    and a ``post_attention_layernorm`` (``model.model.layers`` of LLaMA / Qwen2,
    ``model.model.language_model.layers`` of Qwen2-VL / LLaVA; a vision tower's blocks do not qualify)."""
    if not isinstance(model, torch.nn.Module):
        raise AlignopsError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList)
        and len(m) > 0
        and all(hasattr(layer, "mlp") and hasattr(layer, "post_attention_layernorm") for layer in m)
    ]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise AlignopsError(
            f"model must hold exactly one list of decoder layers (modules with `mlp` and "
            f"`post_attention_layernorm`), found {len(found)}{': ' + str(names) if names else ''}; "
            "pass the layers to patch_ffn_skipping instead"
        )
    return found[0][1]


# The config attributes HF multimodal models name their placeholder tokens by (LLaVA: image_token_index, with
# image_token_id as its alias; Qwen2-VL: image_token_id / video_token_id; Qwen2-Audio: audio_token_index).
_PERCEPTUAL_TOKEN_ATTRS = tuple(f"{m}_token_{k}" for m in ("image", "video", "audio") for k in ("id", "index"))


def perceptual_token_ids(config) -> list[int]:
    """The ids of the placeholder tokens an HF multimodal config marks perceptual inputs with (its
    ``image_token_id`` / ``image_token_index``, and the video / audio ones when present), sorted."""
    ids = {getattr(config, a) for a in _PERCEPTUAL_TOKEN_ATTRS if isinstance(getattr(config, a, None), int)}
    if not ids:
        raise AlignopsError(
            f"config ({type(config).__name__}) names no perceptual token id (none of "
            f"{_PERCEPTUAL_TOKEN_ATTRS}): pass the token ids to skipping_tokens yourself"
        )
    return sorted(ids)


@keyword_only("prepack", "backend")
def patch_ffn_skipping(
    layers: Sequence[torch.nn.Module] | torch.nn.Module,
    schedule: SkipSchedule = SkipSchedule(),
    *,
    prepack: bool = False,
    backend: str = "auto",
) -> FFNSkipper:
    """Patch the scheduled decoder layers to use :func:`skip_ffn`; see :class:`FFNSkipper`.

    ``layers``: the decoder layers (``model.model.layers``), or a whole model, whose layers
    :func:`decoder_layers` finds. Every scheduled layer is checked before any is patched: a LLaMA-style FFN
    block (``post_attention_layernorm`` an RMSNorm, ``mlp`` with gate / up / down projections, SiLU; biases
    allowed), as LLaMA, Qwen2 and the language models of Qwen2-VL and LLaVA have.
    """
    if isinstance(layers, torch.nn.Module) and not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)):
        layers = decoder_layers(layers)
    return FFNSkipper(layers, schedule, prepack, backend)
