"""skip family: skip_ffn vs the dense FFN (baseline) and the naive nonzero -> index_select -> linear ->
index_add path, as a function of the skipped fraction. Targets (issue 6): overhead at s = 0 <= 5% (CPU)
or 3% (GPU); t(s) / t(0) <= (1 - s) + 0.05; faster than the naive path at every s."""

from __future__ import annotations

import statistics
import time

import torch

import alignops
from alignops.reference import skip as ref

from .common import Case, annotate, matmul_unit, nbytes

FAMILY = "skip"
FRACTIONS = (0.0, 0.5, 0.75, 0.9, 576 / 650)


def groups(device: str, quick: bool):
    if quick:
        T, H, I, dtypes = 130, 256, 704, (torch.float32,)
    elif device == "cuda":
        T, H, I, dtypes = 650 * 8, 4096, 11008, (torch.bfloat16,)
    else:
        T, H, I, dtypes = 650, 2048, 5632, (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        x = torch.randn(T, H, device=device).to(dtype)
        w_gate_up = (torch.randn(2 * I, H, device=device) / H**0.5).to(dtype)
        w_down = (torch.randn(H, I, device=device) / I**0.5).to(dtype)
        norm_weight = torch.ones(H, device=device, dtype=dtype)
        dt = str(dtype).replace("torch.", "")
        # Copies registered with alignops.skip.prepack (CPU): the plain rows keep multiplying unpacked weights.
        packed = None
        if device == "cpu" and dtype in (torch.bfloat16, torch.float32):
            packed = (w_gate_up.clone(), w_down.clone())
            alignops.skip.prepack(*packed)
        keeps = {}
        for s in FRACTIONS:
            k = int(round(s * T))
            keep = torch.ones(T, dtype=torch.bool, device=device)
            keep[5 : 5 + k] = False  # a perceptual span after a short text prefix, as in LLaVA prompts
            keeps[s] = keep
            shape = f"T={T} H={H} I={I} s={s:.3f}"
            with torch.no_grad():
                cases = [
                    Case(
                        FAMILY,
                        "skip_ffn",
                        shape,
                        dt,
                        "dense FFN (torch)",
                        "fwd",
                        lambda x=x: _no_grad(ref.ffn, x, w_gate_up, w_down, norm_weight),
                        baseline=True,
                    ),
                    Case(
                        FAMILY,
                        "skip_ffn",
                        shape,
                        dt,
                        "alignops",
                        "fwd",
                        lambda x=x, keep=keep: _no_grad(
                            alignops.skip_ffn, x, w_gate_up, w_down, norm_weight, keep=keep
                        ),
                    ),
                    Case(
                        FAMILY,
                        "skip_ffn",
                        shape,
                        dt,
                        "naive nonzero/index_add",
                        "fwd",
                        lambda x=x, keep=keep: _no_grad(ref.naive_skip_ffn, x, w_gate_up, w_down, norm_weight, keep),
                    ),
                    # In place on a scratch copy refreshed outside the timed call (no clone of x inside).
                    Case(
                        FAMILY,
                        "skip_ffn",
                        shape,
                        dt,
                        "alignops in place",
                        "fwd",
                        lambda buf=x.clone(), keep=keep: _no_grad(
                            alignops.skip_ffn, buf, w_gate_up, w_down, norm_weight, keep=keep, inplace=True
                        ),
                    ),
                ]
                if packed is not None:
                    cases += [
                        Case(
                            FAMILY,
                            "skip_ffn",
                            shape,
                            dt,
                            "alignops prepacked",
                            "fwd",
                            lambda x=x, keep=keep: _no_grad(alignops.skip_ffn, x, *packed, norm_weight, keep=keep),
                        ),
                        Case(
                            FAMILY,
                            "skip_ffn",
                            shape,
                            dt,
                            "alignops prepacked in place",
                            "fwd",
                            lambda buf=x.clone(), keep=keep: _no_grad(
                                alignops.skip_ffn, buf, *packed, norm_weight, keep=keep, inplace=True
                            ),
                        ),
                    ]
            # x and the weights read once, the output written once; the FFN's matmuls on the kept rows only
            # (2 x H x 2I gate/up, then I x H down: 6 H I FLOPs per row).
            weights = nbytes(w_gate_up, w_down, norm_weight)
            yield annotate(cases, weights + nbytes(keep) + 2 * nbytes(x), 6 * (T - k) * H * I, matmul_unit(dtype))
        # The ratio targets, measured paired: the fractions interleaved within each repetition, so that the
        # load of a shared machine drifting between the table's rows does not enter t(s) / t(0).
        buf = x.clone()
        _paired[(dt, "alignops")] = _paired_ratios(
            lambda s: alignops.skip_ffn(x, w_gate_up, w_down, norm_weight, keep=keeps[s]), device, quick
        )
        if packed is not None:
            _paired[(dt, "alignops prepacked in place")] = _paired_ratios(
                lambda s: alignops.skip_ffn(buf, *packed, norm_weight, keep=keeps[s], inplace=True), device, quick
            )
        if packed is not None and dtype == torch.bfloat16 and not quick:
            # A model's layers each bring their own weights: with one layer's 69 MB repeated, the weights stay
            # in this machine's 480 MB L3, which flatters the few-row GEMMs. Eight layers in turn (552 MB)
            # stream them from memory, as a model does.
            layers = [
                ((torch.randn(2 * I, H) / H**0.5).to(dtype), (torch.randn(H, I) / I**0.5).to(dtype)) for _ in range(8)
            ]
            for w in layers:
                alignops.skip.prepack(*w)
            _paired[(dt, "alignops prepacked in place, 8 layers in turn")] = _paired_ratios(
                lambda s: [alignops.skip_ffn(buf, *w, norm_weight, keep=keeps[s], inplace=True) for w in layers],
                device,
                quick,
            )
            for w in layers:
                alignops.skip.unprepack(*w)
            del layers
        # A decoder layer's residual add + the change criterion + the skipped FFN: perceptual tokens whose
        # attention delta is small are skipped by threshold. Fused (one add+score pass, FFN in place on h)
        # vs the same steps in PyTorch ops around skip_ffn.
        k = int(round(576 / 650 * T))
        delta = 0.5 * torch.randn(T, H, device=device).to(dtype)
        delta[5 : 5 + k] *= 0.01
        shape = f"T={T} H={H} I={I} add+criterion+FFN, s={k / T:.3f}"
        yield annotate(
            [
                Case(
                    FAMILY,
                    "skip_ffn(delta=)",
                    shape,
                    dt,
                    "torch add + change_score + skip_ffn",
                    "fwd",
                    lambda x=x, delta=delta: _unfused_layer(x, delta, w_gate_up, w_down, norm_weight),
                    baseline=True,
                ),
                Case(
                    FAMILY,
                    "skip_ffn(delta=)",
                    shape,
                    dt,
                    "alignops fused",
                    "fwd",
                    lambda x=x, delta=delta: _no_grad(
                        alignops.skip_ffn, x, w_gate_up, w_down, norm_weight, delta=delta, threshold=THRESHOLD
                    ),
                ),
            ],
            weights + 3 * nbytes(x),
            6 * (T - k) * H * I,
            matmul_unit(dtype),
        )
        if packed is not None:
            alignops.skip.unprepack(*packed)  # this dtype's rows are measured: drop the copies


_paired: dict[tuple[str, str], dict[float, float]] = {}


def _paired_ratios(call, device: str, quick: bool) -> dict[float, float]:
    """Median over repetitions of t(s) / t(0), each repetition timing every fraction once in turn."""
    reps = 3 if quick else 21
    times = {s: [] for s in FRACTIONS}
    with torch.no_grad():
        for s in FRACTIONS:
            call(s)  # warm-up
        for _ in range(reps):
            for s in FRACTIONS:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call(s)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[s].append(time.perf_counter() - start)
    return {s: statistics.median(t / t0 for t, t0 in zip(times[s], times[0.0])) for s in FRACTIONS}


THRESHOLD = 1e-3  # 1 - cos: a delta of 1% of the row's norm scores about 5e-5, one of 50% about 0.1


def _unfused_layer(x, delta, w_gate_up, w_down, norm_weight):
    with torch.no_grad():
        h = x + delta
        keep = alignops.skip.change_score(h, x) > THRESHOLD
        return alignops.skip_ffn(h, w_gate_up, w_down, norm_weight, keep=keep)


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


PROVIDERS = ("alignops", "alignops in place", "alignops prepacked", "alignops prepacked in place")


def summary(results) -> list[str]:
    """The issue's targets, checked on this run's medians, for each of our providers. t(s) / t(0) divides
    by the same provider at s = 0; the dense FFN's time is the other possible denominator (printed too)."""
    lines = []
    by = {(r.shape, r.dtype, r.provider): r for r in results}
    for dtype in sorted({r.dtype for r in results}):
        for provider in PROVIDERS:
            rows = [r for r in results if r.dtype == dtype and r.provider == provider and r.op == "skip_ffn"]
            if not rows:
                continue
            t0 = next(r for r in rows if r.shape.endswith("s=0.000")).median_ms
            for r in rows:
                s = float(r.shape.rsplit("s=", 1)[1])
                dense = by[(r.shape, r.dtype, "dense FFN (torch)")].median_ms
                naive = by[(r.shape, r.dtype, "naive nonzero/index_add")].median_ms
                rel, target = r.median_ms / t0, 1 - s + 0.05
                lines.append(
                    f"{dtype} {provider} s={s:.3f}: t(s)/t(0) = {rel:.3f} (target <= {target:.3f}) "
                    f"{'ok' if rel <= target else 'MISSED'}; t(s)/t_dense = {r.median_ms / dense:.3f}; "
                    f"vs naive {naive / r.median_ms:.2f}x {'ok' if r.median_ms < naive else 'MISSED'}"
                    + (f"; overhead vs dense {100 * (r.median_ms / dense - 1):+.1f}% (target <= 5%)" if s == 0 else "")
                )
    for (dtype, provider), ratios in sorted(_paired.items()):
        parts = [
            f"s={s:.3f}: {r:.3f} (<= {1 - s + 0.05:.3f}{'' if r <= 1 - s + 0.05 else ' MISSED'})"
            for s, r in ratios.items()
            if s > 0
        ]
        lines.append(f"{dtype} {provider}, paired t(s)/t(0) (fractions interleaved): " + "; ".join(parts))
    return lines
