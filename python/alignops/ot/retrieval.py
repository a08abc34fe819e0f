"""UCoFiA's Sinkhorn normalisation of a similarity matrix and the column normalisers of its retrieval peers
(inverted softmax, QB-Norm, dual softmax, NNN), streamed over rows and row-sharded over ranks."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend
from .._api import keyword_only
from .._checks import check_finite, check_floating, values_checkable
from .._errors import AlignopsError
from ..ops._registration import run_value_checks
from ..reference import ot as _ref


class NormalizeOutput(NamedTuple):
    row_bias: torch.Tensor  # [L, N] log-softmax bias of the rows (this rank's rows when sharded)
    col_bias: torch.Tensor  # [L, M] log-softmax bias of the columns


def _sim_batch(sim: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if sim.dim() not in (2, 3):
        raise AlignopsError(f"{name} must have shape [N, M] or [L, N, M], got {tuple(sim.shape)}")
    check_floating(sim, name)
    x = sim if sim.dtype in (torch.float32, torch.float64) else sim.float()
    return (x[None], True) if x.dim() == 2 else (x, False)


def _normalize_pass(sim, col_bias, scale, row_update, chunk_size, be):
    """(row_bias [L, N], column logsumexp [L, M]) over the rows held here."""
    if be == "native":
        return torch.ops.alignops.sinkhorn_normalize_pass(sim, col_bias, scale, row_update)
    if be == "triton":
        return torch.ops.alignops.sinkhorn_normalize_pass_triton(sim, col_bias, scale, row_update)
    if values_checkable(sim):  # the native op's NaN / +inf scan, one host read (none while torch.compile traces)
        run_value_checks("alignops::sinkhorn_normalize_pass", sim)
    N = sim.shape[1]
    chunk = N if chunk_size is None else max(1, chunk_size)
    rows, lse = [], None
    for r0 in range(0, max(N, 1), chunk):
        rb, cl = _ref.sinkhorn_normalize_pass(sim[:, r0 : r0 + chunk], col_bias, scale, row_update)
        rows.append(rb)
        lse = cl if lse is None else torch.logaddexp(lse, cl)
    return torch.cat(rows, 1), lse


def _merge_lse(lse: torch.Tensor, process_group) -> torch.Tensor:
    """logsumexp over the ranks of per-rank logsumexps (two all-reduces: max, then the shifted sums)."""
    if process_group is None:
        return lse
    import torch.distributed as dist

    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    m = torch.where(torch.isfinite(m), m, 0)
    s = torch.exp(lse - m)
    dist.all_reduce(s, group=process_group)
    return m + s.log()


def _resolve_normalize(backend: str, sim: torch.Tensor, op: str) -> str:
    return _backend.resolve(backend, sim.device, op, native_cuda=False)


@keyword_only("n_iters")
def sinkhorn_normalize(
    sim: torch.Tensor,
    *,
    n_iters: int = 4,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> NormalizeOutput:
    r"""UCoFiA's Sinkhorn normalisation of a bank similarity matrix, in the log domain.

    UCoFiA (probability domain): ``K = exp(S / T - max)``, ``b = 1 / K.sum(0)``, then ``n_iters`` times
    ``a = 1 / (K b)``, ``b = 1 / (a^T K)``; the biases are ``log_softmax(log a)`` and
    ``log_softmax(log b)``. Here every step is a logsumexp (``log b_j = -LSE_i(S_ij / T + log a_i)``,
    ``log a_i = -LSE_j(S_ij / T + log b_j)``), so logits spread over more than 87 do not underflow, and
    one pass over S per iteration gives both updates: nothing of S's size is written.
    The normalised test scores are ``test_sim / T + col_bias`` per level (UCoFiA averages the levels).

    Args:
        sim: [N, M] or [L, N, M] (L granularity levels) bank-query x gallery similarities. -inf marks a pair
            that never matches; a row or column of only -inf (e.g. padding) carries no mass: its bias is
            -inf and the other biases are those of the matrix without it. NaN and +inf raise (native and
            torch backends).
        n_iters: alternating updates (UCoFiA: 4).
        temperature: S is divided by it.
        chunk_size: rows per step of the torch backend (bounds its [chunk, M] temporaries); the native and
            Triton kernels stream rows without temporaries.
        process_group: sim holds this rank's rows; column statistics are all-reduced (2 all-reduces per
            iteration), so every rank gets the column bias of the whole matrix and the log-softmax of its
            own rows over all rows; identical to one process up to rounding.
        backend: "auto" | "native" | "triton" | "torch".

    Returns:
        NormalizeOutput(row_bias [L, N] (or [N]), col_bias [L, M] (or [M])).
    """
    x, squeeze = _sim_batch(sim, "sim")
    if n_iters < 0:
        raise AlignopsError(f"n_iters must be >= 0, got {n_iters}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise AlignopsError(f"temperature must be a finite value > 0, got {temperature}")
    be = _resolve_normalize(backend, x, "alignops.ot.sinkhorn_normalize")
    L, N, M = x.shape
    scale = 1.0 / temperature
    _, lse = _normalize_pass(x, x.new_zeros(L, M), scale, False, chunk_size, be)
    lb = _column_bias(_merge_lse(lse, process_group))
    la = x.new_zeros(L, N)
    for _ in range(n_iters):
        la, lse = _normalize_pass(x, lb, scale, True, chunk_size, be)
        lb = _column_bias(_merge_lse(lse, process_group))
    row = la - _finite_or_zero(_merge_lse(torch.logsumexp(la, -1), process_group))[:, None]
    col = lb - _finite_or_zero(torch.logsumexp(lb, -1))[:, None]
    return NormalizeOutput(row[0], col[0]) if squeeze else NormalizeOutput(row, col)


def _column_bias(lse: torch.Tensor) -> torch.Tensor:
    """-lse, and -inf (no mass) for a column of only -inf similarities, whose bias would be +inf: the next row
    pass would add it to their -inf (NaN in every row bias)."""
    return torch.where(lse == -math.inf, -math.inf, -lse)


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    # a level with no finite similarity: every bias stays -inf instead of -inf - -inf = NaN
    return torch.where(torch.isfinite(lse), lse, 0)


def bank_column_lse(
    bank: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """``LSE_k(bank_kj / T)`` over the bank queries k (all ranks' rows), [M]: the streaming column
    normaliser behind inverted softmax, QB-Norm and DSL."""
    x, _ = _sim_batch(bank, "bank")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise AlignopsError(f"temperature must be a finite value > 0, got {temperature}")
    if x.shape[0] != 1:
        raise AlignopsError(f"bank must be a 2-D tensor [N_bank, M], got {tuple(bank.shape)}")
    be = _resolve_normalize(backend, x, "alignops.ot.bank_column_lse")
    _, lse = _normalize_pass(x, x.new_zeros(1, x.shape[2]), 1.0 / temperature, False, chunk_size, be)
    return _merge_lse(lse, process_group)[0]


def _check_pair(sim: torch.Tensor, bank: torch.Tensor) -> None:
    if sim.dim() != 2 or bank.dim() != 2 or sim.shape[1] != bank.shape[1]:
        raise AlignopsError(
            f"sim [Q, M] and bank [N_bank, M] must share the gallery dimension M, got "
            f"{tuple(sim.shape)} and {tuple(bank.shape)}"
        )


def inverted_softmax(
    sim: torch.Tensor,
    bank: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Smith et al.'s inverted softmax, log domain: ``S_ij / T - LSE_k(bank_kj / T)`` (the bank defaults to
    the test queries themselves). Same ranking per query as the probability form, without overflow."""
    bank = sim if bank is None else bank
    _check_pair(sim, bank)
    lse = bank_column_lse(
        bank, temperature=temperature, chunk_size=chunk_size, process_group=process_group, backend=backend
    )
    return sim / temperature - lse


def qb_norm(
    sim: torch.Tensor,
    bank: torch.Tensor,
    *,
    temperature: float = 1.0,
    k: int = 1,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """QB-Norm with the dynamic inverted softmax (Bogolin et al.): a test query whose top-1 gallery item is
    in the activation set (items in some bank query's top-k) gets the inverted softmax (log domain), the
    others keep their raw similarities. The activation set is merged over ranks (all-reduce MAX)."""
    _check_pair(sim, bank)
    if not 1 <= k <= bank.shape[1]:
        raise AlignopsError(f"k must lie in [1, M = {bank.shape[1]}], got {k}")
    normed = inverted_softmax(
        sim, bank, temperature=temperature, chunk_size=chunk_size, process_group=process_group, backend=backend
    )
    active = torch.zeros(bank.shape[1], dtype=torch.int32, device=bank.device)
    active[bank.topk(k, dim=1).indices.flatten()] = 1
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(active, op=dist.ReduceOp.MAX, group=process_group)
    use = active.bool()[sim.argmax(dim=1)]
    return torch.where(use[:, None], normed, sim)


def dual_softmax(
    sim: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """DSL (Cheng et al.): ``S_ij * softmax_i(S / T)_ij``, the prior over the queries (all ranks' rows when
    sim is row-sharded) computed in the log domain."""
    if sim.dim() != 2:
        raise AlignopsError(f"sim must be a 2-D tensor [Q, M], got {tuple(sim.shape)}")
    lse = bank_column_lse(
        sim, temperature=temperature, chunk_size=chunk_size, process_group=process_group, backend=backend
    )
    return sim * torch.exp(sim / temperature - lse)


def nnn(
    sim: torch.Tensor,
    bank: torch.Tensor,
    *,
    k: int = 16,
    alpha: float = 1.0,
    chunk_size: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """NNN (Chowdhury et al.): ``S_ij - alpha * mean of the k largest bank similarities of item j``. The
    per-column top-k streams over bank chunks and merges over ranks (all-gather of [k, M] per rank);
    torch composite (a top-k merge, no kernel of its own)."""
    _check_pair(sim, bank)
    if k < 1:
        raise AlignopsError(f"k must be >= 1, got {k}")
    check_finite(alpha, "alpha")
    chunk = bank.shape[0] if chunk_size is None else max(1, chunk_size)
    top = bank.new_empty(0, bank.shape[1])
    for r0 in range(0, bank.shape[0], chunk):
        both = torch.cat([top, bank[r0 : r0 + chunk]], 0)
        top = both.topk(min(k, both.shape[0]), dim=0).values
    if process_group is not None:
        import torch.distributed as dist

        parts = [torch.empty_like(top) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(parts, top.contiguous(), group=process_group)
        both = torch.cat(parts, 0)
        top = both.topk(min(k, both.shape[0]), dim=0).values
    if top.shape[0] < k:
        raise AlignopsError(f"k = {k} exceeds the {top.shape[0]} bank queries")
    return sim - alpha * top.mean(0)
