"""metrics family: bootstrapped Cohen's kappa, many judges against one reference, vs looping
scikit-learn's cohen_kappa_score over judges x resamples. Target (issue): >= 50x scikit-learn on the CPU for
1000 judges x 10000 items x 1000 resamples.

The full scikit-learn loop at that size is ~1e6 calls (over an hour here), so it is measured exactly at a
reduced size (group 1: every call run) and extrapolated linearly in the number of calls for the full size
(group 2); the extrapolated row says so in its provider name.
"""

from __future__ import annotations

import numpy as np
import torch

from alignops import metrics as M

from .common import Case, Result, case_maker

FAMILY = "metrics"


def _sklearn_loop(judges: np.ndarray, human: np.ndarray, idx: np.ndarray) -> list[float]:
    from sklearn.metrics import cohen_kappa_score

    return [cohen_kappa_score(j[r], human[r], labels=[0, 1]) for j in judges for r in idx]


def _data(P, N, device):
    g = torch.Generator().manual_seed(0)
    human = torch.randint(0, 2, (N,), generator=g)
    judges = torch.where(torch.rand(P, N, generator=g) < 0.8, human, 1 - human)
    return judges.to(device), human.to(device)


def _sizes(device, quick):
    if quick:
        return (4, 2000, 9), (50, 2000, 50)
    return (20, 10000, 49), (1000, 10000, 1000)


def _alignops_cases(case, providers, judges, human, R, baseline=False) -> list[Case]:
    """One case per alignops (name, backend) in providers: every judge's kappa against human, R resamples."""
    return [
        case(name, lambda b=b: M.cohen_kappa(judges, human, 2, n_bootstrap=R, backend=b), baseline=baseline)
        for name, b in providers
    ]


def groups(device: str, quick: bool):
    small, full = _sizes(device, quick)
    providers = [("alignops native", "native")] if device == "cpu" else [("alignops triton", "triton")]
    P, N, R = small
    judges, human = _data(P, N, device)
    shape = f"judges={P} N={N} R={R}"
    from alignops.reference import metrics as ref

    idx = ref.bootstrap_indices(0, R, N).numpy()
    jn, hn = judges.cpu().numpy(), human.cpu().numpy()
    case = case_maker(FAMILY, "cohen_kappa+bootstrap", shape, "int64", "fwd")
    cases = [case(f"scikit-learn loop ({P * (R + 1)} calls)", lambda: _sklearn_loop(jn, hn, idx), baseline=True)]
    cases += _alignops_cases(case, providers, judges, human, R)
    cases.append(
        case(
            "torch reference ([P, R+1, N] gather)",
            lambda: M.cohen_kappa(judges, human, 2, n_bootstrap=R, backend="torch"),
        )
    )
    yield cases
    P, N, R = full
    judges, human = _data(P, N, device)
    case = case_maker(FAMILY, "cohen_kappa+bootstrap", f"judges={P} N={N} R={R}", "int64", "fwd")
    # No scikit-learn row at this size: summary() extrapolates it from the measured loop above.
    yield _alignops_cases(case, providers, judges, human, R, baseline=True)


def summary(results: list[Result]) -> list[str]:
    """Extrapolates the scikit-learn loop to the full size (a row added to the results, named as such) and
    checks the >= 50x target."""
    small = next(r for r in results if r.provider.startswith("scikit-learn loop"))
    calls_small = int(small.provider.split("(")[1].split()[0])
    per_call = small.median_ms / calls_small
    lines = [f"scikit-learn cohen_kappa_score: {per_call:.3f} ms per call (measured over {calls_small} calls)"]
    full_rows = [r for r in results if r.shape != small.shape and r.provider.startswith("alignops")]
    for r in full_rows:
        P = int(r.shape.split("judges=")[1].split()[0])
        R = int(r.shape.split("R=")[1])
        calls = P * (R + 1)
        est = per_call * calls
        results.append(
            Result(
                r.family,
                r.op,
                r.shape,
                r.dtype,
                f"scikit-learn loop (extrapolated: {calls} calls x {per_call:.3f} ms)",
                r.mode,
                est,
                float("nan"),
                float("nan"),
                r.median_ms / est,
                float("nan"),
            )
        )
        speedup = est / r.median_ms
        lines.append(
            f"{r.shape}: {r.provider} {r.median_ms / 1e3:.2f} s vs scikit-learn loop {est / 1e3:.0f} s "
            f"(extrapolated) = {speedup:.0f}x (target >= 50x) {'ok' if speedup >= 50 else 'MISSED'}"
        )
    for r in results:
        if r.shape == small.shape and r.provider.startswith("alignops"):
            lines.append(f"{r.shape}: {r.provider} {r.ratio:.0f}x the measured scikit-learn loop")
    return lines
