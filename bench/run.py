"""`alignops bench`: every family's benchmark, a table on stdout, rows appended to a CSV, one plot per family.

Environment (used by bench/gpu_check.sh): ALIGNOPS_BENCH_BUDGET_S, seconds per family after which no case
starts; ALIGNOPS_BENCH_MIN_RUN_S, the timing's minimum run time per case (default 1.0, 0.05 with --quick);
ALIGNOPS_BENCH_TARGETS_FILE=1 also writes each family's summary lines to <family>_<device>_targets.txt;
ALIGNOPS_GIT_SHA names the commit when the tree has no .git (a copy). A case that fails is a NaN row with
its error (the exit status is then 1) and the run goes on; rows reach the CSV as they are measured.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path

import torch

from .common import GPU_FIELDS, Result, run_groups

FAMILIES = {
    "preference": "bench_preference",
    "fused_linear": "bench_fused_linear",
    "skip": "bench_skip",
    "ctc": "bench_ctc",
    "ctc_posteriors": "bench_ctc_posteriors",
    "ctc_segmentation": "bench_ctc_segmentation",
    "ot": "bench_ot",
    "wasserstein": "bench_wasserstein",
    "metrics": "bench_metrics",
    "watermark": "bench_watermark",
}


def _git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ALIGNOPS_GIT_SHA", "unknown")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def format_table(results: list[Result]) -> str:
    head = ("op", "shape", "dtype", "mode", "provider", "median ms", "IQR ms", "vs ref", "peak MB", "mem vs ref")
    rows = [(r.op, r.shape, r.dtype, r.mode, r.provider, f"{r.median_ms:.2f}", f"{r.iqr_ms:.2f}",
             f"{r.ratio:.2f}x", f"{r.peak_mb:.0f}", f"{r.mem_ratio:.2f}x") for r in results]
    if any(r.hbm_frac == r.hbm_frac or r.peak_frac == r.peak_frac for r in results):
        # GPU rows: share of the H200's HBM bandwidth and of the math unit's peak (common.efficiency).
        head += ("HBM BW", "peak FLOP")
        rows = [row + (_pct(r.hbm_frac), _pct(r.peak_frac)) for row, r in zip(rows, results)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def write_csv(results: list[Result], path: Path, device: str) -> None:
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__, "git_sha": _git_sha()}
    # The efficiency and error columns are the GPU CSVs' alone: CPU CSVs keep the columns they always had.
    names = [f.name for f in dataclasses.fields(Result) if device == "cuda" or f.name not in GPU_FIELDS]
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + names)
        if new:
            w.writeheader()
        for r in results:
            row = dataclasses.asdict(r)
            w.writerow({**meta, **{k: row[k] for k in names}})


def plot(results: list[Result], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results if r.ratio == r.ratio and not r.provider.startswith(("torch", "reference"))]
    labels = [f"{r.op}\n{r.shape} {r.dtype} {r.mode}\n{r.provider}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 5))
    ax.bar(range(len(rows)), [r.ratio for r in rows], color=["tab:blue" if r.ratio >= 1 else "tab:red" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("speed-up vs baseline (same run)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(device: str = "cpu", families: list[str] | None = None, quick: bool = False, out: str | None = None) -> int:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("alignops bench: --device cuda but no CUDA device is visible")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"alignops bench: --device must be cpu or cuda, got {device!r}")
    names = families or list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"alignops bench: unknown families {unknown}; known: {sorted(FAMILIES)}")
    out_dir = Path(out or os.environ.get("ALIGNOPS_BENCH_OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    min_run_time = float(os.environ.get("ALIGNOPS_BENCH_MIN_RUN_S", 0.05 if quick else 1.0))
    budget = os.environ.get("ALIGNOPS_BENCH_BUDGET_S")
    print(f"alignops bench on {device_name(device)}, torch {torch.__version__}, "
          f"{'quick' if quick else 'full'} run; ratios are baseline median / provider median in this run")
    status = 0
    for name in names:
        tag = f"{name}_{device}{'_quick' if quick else ''}"
        csv_path = out_dir / f"{tag}.csv"
        deadline = time.monotonic() + float(budget) if budget else None
        try:
            module = importlib.import_module(f".{FAMILIES[name]}", __package__)
            torch.manual_seed(0)
            results = run_groups(module.groups(device, quick), device, min_run_time, deadline=deadline,
                                 on_rows=lambda rows, p=csv_path: write_csv(rows, p, device))
        except Exception:  # noqa: BLE001  (a family that cannot even start: the next one still runs)
            print(f"\n== {name}: FAILED ==\n{traceback.format_exc()}")
            status = 1
            continue
        status |= any(r.error for r in results)
        print(f"\n== {name} ({device_name(device)}) ==")
        print(format_table(results))
        if hasattr(module, "summary"):
            try:
                lines = module.summary(results)
            except Exception:  # noqa: BLE001  (a summary that assumed a row that failed or was not run)
                lines = [f"summary not computed: {traceback.format_exc().strip().splitlines()[-1]}"]
            print("\n".join(lines))
            if os.environ.get("ALIGNOPS_BENCH_TARGETS_FILE") == "1":
                (out_dir / f"{tag}_targets.txt").write_text("\n".join(lines) + "\n")
        png = out_dir / f"{tag}.png"
        try:
            drawn = plot(results, png, f"alignops {name} on {device_name(device)}")
        except Exception:  # noqa: BLE001  (the CSV and table matter more than the picture)
            drawn = False
        print(f"\nrows appended to {csv_path}; " + (f"plot {png}" if drawn else "plot skipped: matplotlib missing"))
    return int(status)
