"""ot family: batched Sinkhorn, 50 iterations, fp32, uniform marginals, eps = 0.05 on costs in [0, 1].
Providers: alignops (native C++ on the CPU, Triton on a GPU), the pure-PyTorch batched log-domain loop (the
baseline: alignops.reference.ot.sinkhorn), POT's sinkhorn_log looped over the batch (numpy), POT's batched
solver ot.batch.solve_batch(method="log_sinkhorn") on torch tensors. GeomLoss solves point-cloud problems,
not given cost matrices: it appears in the sinkhorn_normalize / distance rows only where comparable (none
here). Targets (issue): >= 10x POT's loop on (a), >= 5x on (b), >= 1.5x the PyTorch loop on all, peak
extra memory <= 1x the cost matrix. On the CPU, case (c) is 2048 x 2048 instead of 8192 x 8192 (POT's loop
takes minutes per call at 8192); the UCoFiA rows are one level of 20k x 1k instead of 180k x 1k x 3."""

from __future__ import annotations

import numpy as np
import torch

import alignops
from alignops.reference import ot as ref

from .common import Case, annotate, nbytes

FAMILY = "ot"
EPS = 0.05
ITERS = 50


def _cases(device: str, quick: bool):
    if quick:
        return [(64, 32, 32), (4, 128, 128), (1, 256, 256)]
    if device == "cuda":
        return [(1024, 64, 64), (64, 512, 512), (1, 8192, 8192)]
    return [(1024, 64, 64), (64, 512, 512), (1, 2048, 2048)]


def _pot_loop(C_np, a_np, b_np):
    from ot.bregman import sinkhorn_log

    return [sinkhorn_log(a_np, b_np, c, EPS, numItermax=ITERS, stopThr=0.0, warn=False) for c in C_np]


def _pot_batch(C):
    import ot.batch

    return ot.batch.solve_batch(C, reg=EPS, max_iter=ITERS, tol=0.0, method="log_sinkhorn")


def _alignops(C):
    return alignops.ot.sinkhorn(C, eps=EPS, n_iters=ITERS)


def _torch_loop(C):
    B, N, M = C.shape
    ns = torch.full((B,), N, dtype=torch.long, device=C.device)
    ms = torch.full((B,), M, dtype=torch.long, device=C.device)
    a = torch.full((B, N), 1 / N, device=C.device)
    b = torch.full((B, M), 1 / M, device=C.device)
    return ref.sinkhorn(C, a, b, ns, ms, [], EPS, ITERS, -1.0, False)


def _min_bytes(C: torch.Tensor) -> int:
    """The traffic floor of ITERS log-domain iterations: a problem of up to 128 x 128 (64 KB) can stay on chip,
    so C is read once; a larger one is streamed twice per iteration (row then column log-sum-exp, the issue's
    yardstick for 8192^2). Plus the potentials f, g written."""
    B, N, M = C.shape
    reads = 1 if N * M * C.element_size() <= 64 * 1024 else 2 * ITERS
    return reads * nbytes(C) + B * (N + M) * C.element_size()


def groups(device: str, quick: bool):
    try:
        import ot  # noqa: F401

        has_pot = True
    except ImportError:
        has_pot = False
    for B, N, M in _cases(device, quick):
        C = torch.rand(B, N, M, device=device)
        shape = f"B={B} N={N} M={M} iters={ITERS}"
        cases = [
            Case(
                FAMILY,
                "sinkhorn",
                shape,
                "float32",
                "torch batched loop",
                "fwd",
                lambda C=C: _torch_loop(C),
                baseline=True,
            ),
            Case(FAMILY, "sinkhorn", shape, "float32", "alignops", "fwd", lambda C=C: _alignops(C)),
        ]
        if has_pot:
            if device == "cpu":
                C_np = C.numpy().astype(np.float32)
                w_a = np.full(N, 1 / N, dtype=np.float32)
                w_b = np.full(M, 1 / M, dtype=np.float32)
                cases.append(
                    Case(
                        FAMILY,
                        "sinkhorn",
                        shape,
                        "float32",
                        "POT sinkhorn_log loop",
                        "fwd",
                        lambda C_np=C_np, w_a=w_a, w_b=w_b: _pot_loop(C_np, w_a, w_b),
                    )
                )
            cases.append(Case(FAMILY, "sinkhorn", shape, "float32", "POT ot.batch", "fwd", lambda C=C: _pot_batch(C)))
        # About 10 fp32 operations per entry and iteration (two log-sum-exps: add, subtract, max, exp, sum).
        yield annotate(cases, _min_bytes(C), 10 * ITERS * C.numel())
    yield _small_eps_cases(device, quick)
    # UCoFiA normalisation of a tall bank (4 iterations).
    Nb, M, L = (2000, 100, 1) if quick else ((180_000, 1000, 3) if device == "cuda" else (20_000, 1000, 1))
    S = torch.randn(L, Nb, M, device=device)
    shape = f"L={L} N={Nb} M={M} iters=4"
    yield [
        Case(
            FAMILY,
            "sinkhorn_normalize",
            shape,
            "float32",
            "torch (UCoFiA, prob. domain)",
            "fwd",
            lambda: [ref.sinkhorn_normalize_ucofia(S[i], 4) for i in range(L)],
            baseline=True,
        ),
        Case(
            FAMILY,
            "sinkhorn_normalize",
            shape,
            "float32",
            "alignops",
            "fwd",
            lambda: alignops.ot.sinkhorn_normalize(S, n_iters=4),
        ),
        Case(
            FAMILY,
            "sinkhorn_normalize",
            shape,
            "float32",
            "torch log domain (chunks of 4096)",
            "fwd",
            lambda: alignops.ot.sinkhorn_normalize(S, n_iters=4, chunk_size=4096, backend="torch"),
        ),
    ]


# The accuracy target: eps = 1e-3 on costs over [0, 1) (cost / eps up to 1000), marginal error <= 1e-4
# within 300 iterations with epsilon scaling. Sinkhorn alone stalls near 1e-3 there; the last 10 iterations
# of the budget as Sinkhorn-Newton steps finish the job. The errors (max over the batch, measured once
# outside the timing) are reported by summary().
SMALL_EPS = dict(eps=1e-3, n_iters=300, tol=1e-4, eps_scaling=0.9)
_small_eps_errors: dict[str, float] = {}


def _small_eps_cases(device: str, quick: bool):
    B = 64 if quick else 1024
    C = torch.rand(B, 64, 64, device=device)
    shape = f"B={B} N=64 M=64 eps=1e-3 cost~U[0,1) n_iters<=300"
    runs = {
        "alignops (Sinkhorn only)": dict(SMALL_EPS),
        "alignops (+ 10 Newton steps)": dict(SMALL_EPS, newton_steps=10),
    }
    for name, kw in runs.items():
        try:
            out = alignops.ot.sinkhorn(C, **kw)
            _small_eps_errors[name] = float(out.err.max())
            _small_eps_errors[name + " iters"] = int(out.n_iters.max())
        except Exception:  # noqa: BLE001  (the timed case below fails too and reports why)
            _small_eps_errors[name], _small_eps_errors[name + " iters"] = float("nan"), -1
    return [
        Case(
            FAMILY,
            "sinkhorn eps=1e-3",
            shape,
            "float32",
            name,
            "fwd",
            lambda C=C, kw=kw: alignops.ot.sinkhorn(C, **kw),
            baseline=i == 0,
        )
        for i, (name, kw) in enumerate(runs.items())
    ]


def summary(results) -> list[str]:
    """The issue's targets, checked on this run's medians and peaks."""
    lines = []
    by = {(r.op, r.shape, r.provider): r for r in results}
    for r in results:
        if r.op != "sinkhorn" or r.provider != "alignops":
            continue
        B, N, M = (int(part.split("=")[1]) for part in r.shape.split()[:3])
        cost_mb = B * N * M * 4 / 2**20
        line = f"{r.shape}: {r.ratio:.2f}x the PyTorch loop (target >= 1.5x)"
        pot = by.get((r.op, r.shape, "POT sinkhorn_log loop"))
        if pot is not None:
            target = 10 if N == 64 else (5 if N == 512 else None)
            line += f"; {pot.median_ms / r.median_ms:.1f}x POT's loop" + (f" (target >= {target}x)" if target else "")
        batch = by.get((r.op, r.shape, "POT ot.batch"))
        if batch is not None:
            line += f"; {batch.median_ms / r.median_ms:.1f}x ot.batch"
        line += f"; peak extra {r.peak_mb:.1f} MB = {r.peak_mb / cost_mb:.2f}x the cost matrix (target <= 1x)"
        lines.append(line)
    for name in ("alignops (Sinkhorn only)", "alignops (+ 10 Newton steps)"):
        if name in _small_eps_errors:
            lines.append(
                f"eps=1e-3, costs U[0,1), 64x64, {name}: max L1 marginal error "
                f"{_small_eps_errors[name]:.3e} after <= {_small_eps_errors[name + ' iters']} iterations "
                "(target <= 1e-4 within 300)"
            )
    return lines
