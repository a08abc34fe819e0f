"""Triton epilogues of ``alignops::fused_linear_logprobs_triton`` and their tile loops.

The ops (python/alignops/ops/preference.py) walk the vocabulary in tiles of ``Vt`` columns. Per
tile, ``torch.mm`` computes the raw logits u = hidden @ weight[v0:v1]^T in the accumulation dtype (fp32,
fp64 for fp64 inputs: bf16 / fp16 GEMMs on CUDA use ``out_dtype=torch.float32``, their products are exact
in fp32), and one Triton kernel consumes the [N, Vt] tile:

- forward: ``fused_linear_fwd_tile_kernel`` adds the bias, applies z = softcap tanh(logit_scale u /
  softcap) / T and folds the tile into each row's online state (running max m, s = sum exp(z - m),
  a = sum exp(z - m) (z - m) for the entropy, the target logit); the last tile writes logp = z_y - lse,
  lse = m + log s and entropy = log s - a / s. Keeping a relative to m avoids the cancellation of
  lse - sum p z when the distribution is peaked.
- backward: ``fused_linear_bwd_tile_kernel`` turns the recomputed tile into
  dz = g dz/du (1[v = y] - exp(z - lse)) in the GEMM operand dtype, then grad_hidden += dz @ weight[v0:v1]
  (fp32 accumulator), grad_weight[v0:v1] = dz^T @ hidden (written once per tile: deterministic, fp32
  accumulation inside the GEMM, rounded once) and grad_bias[v0:v1] = the column sums of dz.

Nothing is sized by V: the extra memory is the [N, Vt] tile (plus its bf16 copy dz and a [Vt, H] fp32
grad_weight tile in the backward of half-precision inputs), with Vt chosen so that a tile stays near
``TILE_BYTES``, and [N] state vectors.

Ignored rows. The op must not wait on the device, so it cannot size a gathered copy of the kept rows, and
a capacity-sized gather (as kernels/skip.py does for its own Triton GEMMs) would leave cuBLAS the same N
rows to multiply. The GEMMs therefore run on all N rows; the epilogues read nothing of an ignored row (nor,
in the backward, of a row with g = 0) and write 0 (forward outputs) or a zero row of dz, so these rows
contribute exactly 0 to every gradient as long as their hidden states are finite (a NaN hidden state of an
ignored row still reaches grad_weight through 0 * NaN, as in the reference; the native CPU op drops those
rows before its GEMMs). A target outside [0, V) that is not ignore_index is not checked here (no host
sync): it gives logp = NaN and a NaN row of dz.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, tile
from ._tl import finite_max
from .preference import launch_config

# ---- tile and block sizes ---------------------------------------------------------------------------------

TILE_BYTES = 64 << 20  # per [N, Vt] logits tile and per [Vt, H] fp32 grad_weight tile
TILE_ALIGN = 128  # columns: keeps weight[v0:v1] and the tiles aligned for the GEMMs
DYNAMIC_ROWS = 16384  # rows assumed when N is symbolic (torch.compile dynamic shapes)
VOCAB_TILE: int | None = None  # forces Vt (tests set it small to cover several tiles)
MAX_BLOCK_V = 4096  # columns per step of a kernel row on a GPU

_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (CUDA only)


def vocab_tile(n_rows, hidden_size: int, vocab: int, acc: torch.dtype) -> int:
    """Columns per vocabulary tile: a [N, Vt] tile (and a [Vt, H] one) of about ``TILE_BYTES``.

    A symbolic N (a dynamic shape under torch.compile) is taken as ``DYNAMIC_ROWS`` rows: deriving the tile
    from it would guard the compiled graph on its value."""
    if VOCAB_TILE is not None:
        return max(1, min(VOCAB_TILE, vocab))
    rows = max(n_rows, hidden_size, 1) if isinstance(n_rows, int) else max(DYNAMIC_ROWS, hidden_size)
    vt = TILE_BYTES // (acc.itemsize * rows) // TILE_ALIGN * TILE_ALIGN
    return min(vocab, max(TILE_ALIGN, vt))


def _block_v(device: torch.device, width: int) -> tuple[int, int]:
    return launch_config(width, tile(device, "fused_linear.block_v", MAX_BLOCK_V))


# ---- GEMMs in the accumulation dtype ----------------------------------------------------------------------


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b accumulated in and returned as ``acc``. Half-precision operands: ``out_dtype`` on CUDA, else
    (CPU tensors, the interpreter's tests) widened first, which gives the same products."""
    if a.dtype == acc:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))


def _addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b for a ``c`` in the accumulation dtype (in place where the operands share its dtype)."""
    if a.dtype == c.dtype:
        return c.addmm_(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        # mm(out_dtype=) rather than addmm(out_dtype=): the latter takes an fp32 `c` only from torch 2.10
        # on, and Inductor mis-lowers it.
        return c.add_(torch.mm(a, b, out_dtype=c.dtype))
    return c.addmm_(a.to(c.dtype), b.to(c.dtype))


# ---- the logit transform ---------------------------------------------------------------------------------


@triton.jit
def _tanh_sech2(x):
    """tanh(x) and 1 - tanh(x)^2 from one exp (the interpreter has no libdevice tanh). With t = exp(-2|x|):
    tanh |x| = (1 - t) / (1 + t), which loses the digits of 1 - t as |x| -> 0, so |x| < 1/4 takes the
    Taylor series to x^21 instead (its next term is below 1e-17 relative there); sech^2 = 4t / (1 + t)^2
    has no cancellation."""
    ax = tl.abs(x)
    t = tl.exp(-2 * ax)
    big = (1 - t) / (1 + t)
    x2 = x * x
    p = 9.6915379569294509e-5
    p = p * x2 - 2.3912911424355248e-4
    p = p * x2 + 5.9002744094558595e-4
    p = p * x2 - 1.4558343870513183e-3
    p = p * x2 + 3.5921280365724811e-3
    p = p * x2 - 8.8632355299021973e-3
    p = p * x2 + 2.1869488536155203e-2
    p = p * x2 - 5.3968253968253971e-2
    p = p * x2 + 0.13333333333333333
    p = p * x2 - 0.33333333333333333
    small = x + x * x2 * p
    th = tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))
    return th, 4 * t / ((1 + t) * (1 + t))


@triton.jit
def _logits(u, logit_scale, softcap, inv_t, SOFTCAP: tl.constexpr):
    """z = softcap tanh(logit_scale u / softcap) / T (no tanh without SOFTCAP) and dz/du."""
    x = logit_scale * u
    if SOFTCAP:
        th, sech2 = _tanh_sech2(x / softcap)
        z = softcap * th * inv_t
        dzdu = logit_scale * sech2 * inv_t
    else:
        z = x * inv_t
        dzdu = logit_scale * inv_t + tl.zeros_like(x)
    return z, dzdu


@triton.jit
def _rescaled(m, s, a, m_new):
    """s and a = sum exp(z - m) (z - m) of a state with max m, taken to max m_new >= m. A state with s = 0
    (nothing seen yet, m the lowest finite value) gives 0, never 0 * inf."""
    r = tl.exp(m - m_new)
    return s * r, tl.where(s > 0, r * (a + (m - m_new) * s), 0)


# ---- forward ---------------------------------------------------------------------------------------------


@triton.jit
def fused_linear_fwd_tile_kernel(
    u_ptr,  # [N, W] raw logits of columns [v0, v0 + W), accumulation dtype, contiguous
    bias_ptr,  # [V], read when HAS_BIAS
    targets_ptr,  # [N] int32 / int64
    m_ptr,
    s_ptr,
    a_ptr,
    zy_ptr,  # [N] online state between tiles (a only with ENTROPY), accumulation dtype
    logp_ptr,
    lse_ptr,
    entropy_ptr,  # [N] outputs, written by the LAST tile (entropy only with ENTROPY)
    W,
    v0,
    ignore_index,
    temperature: tl.float64,
    logit_scale: tl.float64,
    softcap: tl.float64,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: folds the tile's columns into the row's online logsumexp (a running state per
    lane over BLOCK_V steps, then across lanes, then into the state of the earlier tiles). Ignored rows read
    nothing; the last tile writes 0 for them."""
    ACC = logp_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    if y == ignore_index:
        if LAST:
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
    else:
        inv_t = 1 / tl.full([], temperature, ACC)
        scale = tl.full([], logit_scale, ACC)
        cap = tl.full([], softcap, ACC)
        row_ptr = u_ptr + row * W
        # The running max starts at the lowest finite value, not -inf, so that masked (-inf) logits never
        # form -inf - -inf.
        m = tl.full([BLOCK_V], -finite_max(ACC), ACC)
        s = tl.zeros([BLOCK_V], ACC)
        a = tl.zeros([BLOCK_V], ACC)
        for start in range(0, W, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < W
            u = tl.load(row_ptr + offs, mask=mask, other=0)
            if HAS_BIAS:
                u += tl.load(bias_ptr + v0 + offs, mask=mask, other=0).to(ACC)
            z, _ = _logits(u, scale, cap, inv_t, SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, z)
            p = tl.exp(z - m_new)
            s, a_old = _rescaled(m, s, a, m_new)
            s += p
            if ENTROPY:
                a = a_old + p * tl.where(p > 0, z - m_new, 0)
            m = m_new
        m_row = tl.max(m, axis=0)
        s, a = _rescaled(m, s, a, m_row)
        s_row = tl.sum(s, axis=0)
        a_row = tl.sum(a, axis=0)
        if FIRST:
            zy = tl.full([], float("nan"), ACC)
        else:
            m_old = tl.load(m_ptr + row)
            m_new = tl.maximum(m_old, m_row)
            a_old = tl.zeros([], ACC)
            if ENTROPY:
                a_old = tl.load(a_ptr + row)
            s_old, a_old = _rescaled(m_old, tl.load(s_ptr + row), a_old, m_new)
            s_row, a_row = _rescaled(m_row, s_row, a_row, m_new)
            s_row += s_old
            a_row += a_old
            m_row = m_new
            zy = tl.load(zy_ptr + row)
        c = y - v0
        here = (c >= 0) & (c < W)
        u_y = tl.load(row_ptr + c, mask=here, other=0)
        if HAS_BIAS:
            u_y += tl.load(bias_ptr + y, mask=here, other=0).to(ACC)
        z_y, _ = _logits(u_y, scale, cap, inv_t, SOFTCAP)
        zy = tl.where(here, z_y, zy)
        if LAST:
            log_s = tl.log(s_row)
            lse = m_row + log_s
            tl.store(logp_ptr + row, zy - lse)
            tl.store(lse_ptr + row, lse)
            if ENTROPY:
                tl.store(entropy_ptr + row, log_s - a_row / s_row)
        else:
            tl.store(m_ptr + row, m_row)
            tl.store(s_ptr + row, s_row)
            tl.store(zy_ptr + row, zy)
            if ENTROPY:
                tl.store(a_ptr + row, a_row)


def launch_fused_linear_forward(
    hidden, weight, targets, bias, logp, lse, entropy, ignore_index, temperature, logit_scale, softcap
):
    """The vocabulary loop of the forward: one GEMM and one epilogue launch per tile. ``entropy`` is [N], or
    empty to skip it; softcap <= 0 means no softcap."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return
    acc = logp.dtype
    vt = vocab_tile(N, H, V, acc)
    block_v, num_warps = _block_v(hidden.device, vt)
    entropy_on = entropy.numel() > 0
    if vt < V:
        state = hidden.new_empty((4 if entropy_on else 3, N), dtype=acc)
        m, s, zy = state[0], state[1], state[2]
        a = state[3] if entropy_on else m
    else:  # a single tile keeps no state between launches
        m = s = zy = a = logp
    for v0 in range(0, V, vt):
        w = min(vt, V - v0)
        u = _mm(hidden, weight[v0 : v0 + w].t(), acc)
        launch(
            fused_linear_fwd_tile_kernel,
            (N,),
            u,
            u if bias is None else bias,
            targets,
            m,
            s,
            a,
            zy,
            logp,
            lse,
            entropy if entropy_on else logp,
            w,
            v0,
            int(ignore_index),
            float(temperature),
            float(logit_scale),
            float(softcap),
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap > 0,
            ENTROPY=entropy_on,
            FIRST=v0 == 0,
            LAST=v0 + w >= V,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )


# ---- backward --------------------------------------------------------------------------------------------


@triton.jit
def fused_linear_bwd_tile_kernel(
    u_ptr,  # [N, W] raw logits of columns [v0, v0 + W), accumulation dtype, contiguous
    bias_ptr,  # [V], read when HAS_BIAS
    targets_ptr,  # [N] int32 / int64
    grad_logp_ptr,
    lse_ptr,  # [N] accumulation dtype
    grad_entropy_ptr,
    entropy_ptr,  # [N] accumulation dtype, read when ENTROPY
    dz_ptr,  # [N, W] in the GEMM operand dtype; may be u_ptr (each element is read before it is written)
    W,
    V,
    v0,
    ignore_index,
    temperature: tl.float64,
    logit_scale: tl.float64,
    softcap: tl.float64,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid (rows, column blocks): dz = g dz/du (1[v = y] - exp(z - lse)), rounded once to dz's dtype; with
    ENTROPY the entropy's gradient ge dH/dz = -ge p (z - lse + H) is added. Ignored rows and rows with
    g = 0 (and ge = 0) write zeros without reading the tile; a target outside [0, V) writes NaN."""
    ACC = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < W
    out_ptrs = dz_ptr + row * W + offs
    y = tl.load(targets_ptr + row).to(tl.int64)
    g = tl.load(grad_logp_ptr + row)
    if ENTROPY:
        ge = tl.load(grad_entropy_ptr + row)
    else:
        ge = tl.zeros([], g.dtype)
    if (y == ignore_index) | ((g == 0) & (ge == 0)):
        tl.store(out_ptrs, tl.zeros([BLOCK_V], dz_ptr.dtype.element_ty), mask=mask)
    else:
        inv_t = 1 / tl.full([], temperature, ACC)
        u = tl.load(u_ptr + row * W + offs, mask=mask, other=0)
        if HAS_BIAS:
            u += tl.load(bias_ptr + v0 + offs, mask=mask, other=0).to(ACC)
        z, dzdu = _logits(u, tl.full([], logit_scale, ACC), tl.full([], softcap, ACC), inv_t, SOFTCAP)
        logp = z - tl.load(lse_ptr + row)
        p = tl.exp(logp)
        dz = g * dzdu * tl.where(offs == y - v0, 1 - p, -p)
        if ENTROPY:
            dz -= ge * dzdu * p * (logp + tl.load(entropy_ptr + row))
        dz = tl.where((y >= 0) & (y < V), dz, float("nan"))
        tl.store(out_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def launch_fused_linear_backward(
    grad_logp,
    hidden,
    weight,
    targets,
    bias,
    lse,
    grad_hidden,
    grad_weight,
    grad_bias,
    ignore_index,
    temperature,
    logit_scale,
    softcap,
    grad_entropy=None,
    entropy=None,
):
    """The vocabulary loop of the backward; fills the preallocated contiguous ``grad_hidden`` [N, H],
    ``grad_weight`` [V, H] and ``grad_bias`` ([V], or empty to skip it). ``grad_entropy`` and ``entropy`` ([N],
    both or neither) add the entropy's gradient. Needs N > 0."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = lse.dtype
    vt = vocab_tile(N, H, V, acc)
    block_v, num_warps = _block_v(hidden.device, vt)
    # Half-precision inputs: dz is rounded to the input dtype for the tensor-core GEMMs, grad_hidden sums
    # the tiles in an fp32 accumulator.
    direct = hidden.dtype == acc
    gh = grad_hidden.zero_() if direct else hidden.new_zeros((N, H), dtype=acc)
    for v0 in range(0, V, vt):
        w = min(vt, V - v0)
        w_tile = weight[v0 : v0 + w]
        u = _mm(hidden, w_tile.t(), acc)
        dz = u if direct else torch.empty_like(u, dtype=hidden.dtype)
        launch(
            fused_linear_bwd_tile_kernel,
            (N, triton.cdiv(w, block_v)),
            u,
            u if bias is None else bias,
            targets,
            grad_logp,
            lse,
            lse if grad_entropy is None else grad_entropy,
            lse if entropy is None else entropy,
            dz,
            w,
            V,
            v0,
            int(ignore_index),
            float(temperature),
            float(logit_scale),
            float(softcap),
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap > 0,
            ENTROPY=grad_entropy is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        gh = _addmm(gh, dz, w_tile)
        if direct:
            torch.mm(dz.t(), hidden, out=grad_weight[v0 : v0 + w])
        else:
            grad_weight[v0 : v0 + w].copy_(_mm(dz.t(), hidden, acc))
        if grad_bias.numel() > 0:
            grad_bias[v0 : v0 + w].copy_(dz.sum(0, dtype=acc))
    if not direct:
        grad_hidden.copy_(gh)
