"""`alignops bench`: every family's benchmark, a table on stdout, a CSV and a plot per family, one summary.

Two plans. The default (``alignops bench``; ``--quick`` is the same) is a representative run of every family
at small shapes with short timings: a few minutes on a 2-core CPU. ``--full`` runs the sizes of the README's
tables (over an hour on that machine). Both write into a new folder in the current working directory,
``./alignops-bench-<UTC time>/`` (or ``--out DIR`` / ALIGNOPS_BENCH_OUT): ``<family>_<device>[_quick].csv``
(rows appended as they are measured), ``<family>_<device>[_quick].png`` and ``report.txt`` (every table and
the summary). Nothing is written inside the source tree unless --out points there (the README's tables live
in bench/results/: ``alignops bench --full --out bench/results`` appends to them).

Adding a family: create ``bench/bench_<family>.py``; it is found by its file name (FAMILIES lists the
families in run order: the known ones first, then any other ``bench_*.py`` alphabetically). The module
defines ``groups(device, quick)``, a generator of lists of common.Case sharing inputs (one baseline each):
``quick=True`` is its representative plan (a couple of small shapes, seconds in all), ``quick=False`` its
full plan; and optionally ``summary(results) -> list[str]`` (its targets, printed after its table) and
``REQUIRES``, the import names of the peers without which the family has nothing to measure (the run then
says which are missing instead of printing an empty table).

Progress goes to stderr (one line rewritten in place on a terminal, one line per case otherwise); tables
and the summary go to stdout. The summary has one row per op and shape: our fastest provider (``alignops*``)
against the fastest other provider measured in the same group of the same run, and their peak-memory ratio.

Environment (used by bench/gpu_check.sh): ALIGNOPS_BENCH_BUDGET_S, seconds per family after which no case
starts (default: none with --full, QUICK_BUDGET_S in the default plan); ALIGNOPS_BENCH_MIN_RUN_S, the
timing's minimum run time per case (default 1.0 with --full, 0.05 otherwise); ALIGNOPS_BENCH_OUT, the
output folder when --out is not given; ALIGNOPS_BENCH_TARGETS_FILE=1 also writes each family's summary lines
to <family>_<device>[_quick]_targets.txt; ALIGNOPS_GIT_SHA names the commit when the tree has no .git (a
copy). A case that fails is a NaN row with its error (the exit status is then 1) and the run goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import GPU_FIELDS, Result, run_groups

_BENCH_DIR = Path(__file__).resolve().parent
# Run order of the families known when this was written; any other bench_<family>.py follows, sorted.
_ORDER = (
    "preference",
    "fused_linear",
    "skip",
    "ctc",
    "ctc_posteriors",
    "ctc_segmentation",
    "ot",
    "wasserstein",
    "metrics",
    "watermark",
    "policy",
    "ppo",
    "distillation",
)
# The default plan's per-family cap (seconds after which no case starts): a family whose quick plan grew,
# or a loaded machine, cannot push the whole run past a few minutes.
QUICK_BUDGET_S = 45.0


def _discover() -> dict[str, str]:
    found = sorted(p.stem[len("bench_") :] for p in _BENCH_DIR.glob("bench_*.py"))
    order = [n for n in _ORDER if n in found] + [n for n in found if n not in _ORDER]
    return {name: f"bench_{name}" for name in order}


FAMILIES = _discover()


def _git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
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
    rows = [
        (
            r.op,
            r.shape,
            r.dtype,
            r.mode,
            r.provider,
            f"{r.median_ms:.2f}",
            f"{r.iqr_ms:.2f}",
            f"{r.ratio:.2f}x",
            f"{r.peak_mb:.0f}",
            f"{r.mem_ratio:.2f}x",
        )
        for r in results
    ]
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
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "git_sha": _git_sha(),
    }
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


class Progress:
    """A progress line on stderr: families done as a bar, the family running, the case just measured and the
    elapsed time. On a terminal the line is rewritten in place; in a log, each update is a line."""

    def __init__(self, n_families: int, stream=None):
        self.n, self.done, self.family = n_families, 0, ""
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.width = 0
        self.cut: list[str] = []  # families whose time budget stopped them before their last case

    def _line(self, text: str) -> str:
        filled = round(20 * self.done / max(self.n, 1))
        elapsed = int(time.monotonic() - self.t0)
        return (
            f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.n} families {elapsed // 60}:"
            f"{elapsed % 60:02d} {self.family}: {text}"
        )

    def update(self, text: str) -> None:
        line = self._line(text)
        if self.tty:
            line = line[: max(20, _terminal_columns() - 1)]
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message that stays (a failure, a spent budget), printed above the progress line."""
        self.clear()
        self.stream.write(text.rstrip() + "\n")
        self.stream.flush()

    def log(self, text: str) -> None:
        """run_groups' log: measured cases update the line, anything else is a note."""
        if "budget" in text:
            self.cut.append(self.family)
        if "FAILED" in text or "budget" in text:
            self.note(f"{self.family}: {text.strip()}")
        else:
            self.update(text.strip())

    def clear(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120


def _fmt_ms(x: float) -> str:
    return "-" if x != x else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def summary_rows(results: list[Result]) -> list[tuple[str, ...]]:
    """One row per (family, op, shape, dtype, mode) with an alignops provider and another provider timed:
    our fastest against the fastest other provider of the same group (both measured in this run).
    speed-up = peer median / our median (> 1: we are faster); memory = our peak / the peer's peak (< 1: leaner;
    '-' where the peer's peak is under 1 MB, below what the RSS high-water mark resolves; '<x' where ours is:
    at most 1 MB over the peer's)."""
    groups: dict[tuple[str, ...], list[Result]] = {}
    for r in results:
        groups.setdefault((r.family, r.op, r.shape, r.dtype, r.mode), []).append(r)
    rows = []
    for (family, op, shape, dtype, mode), rs in groups.items():
        timed = [r for r in rs if r.median_ms == r.median_ms]
        ours = [r for r in timed if r.provider.startswith("alignops")]
        peers = [r for r in timed if not r.provider.startswith("alignops")]
        if not ours or not peers:
            continue
        us, peer = min(ours, key=lambda r: r.median_ms), min(peers, key=lambda r: r.median_ms)
        if not peer.peak_mb >= 1:
            mem = "-"
        elif us.peak_mb < 1:
            mem = f"<{1 / peer.peak_mb:.2f}x"
        else:
            mem = f"{us.peak_mb / peer.peak_mb:.2f}x"
        rows.append(
            (
                family,
                op,
                f"{shape} {dtype} {mode}",
                us.provider,
                _fmt_ms(us.median_ms),
                peer.provider,
                _fmt_ms(peer.median_ms),
                f"{peer.median_ms / us.median_ms:.2f}x",
                mem,
            )
        )
    return rows


def format_summary(results: list[Result]) -> str:
    head = ("family", "op", "case", "ours", "ms", "best peer", "peer ms", "speed-up", "memory")
    rows = summary_rows(results)
    if not rows:
        return "(no op with both an alignops provider and a peer measured)"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def default_out_dir(now: datetime.datetime | None = None) -> Path:
    """A new folder in the current working directory, named by the UTC time of the run."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return Path.cwd() / f"alignops-bench-{now.strftime('%Y%m%dT%H%M%SZ')}"


def missing_requirements(module) -> list[str]:
    """The names in the family's REQUIRES that this environment cannot import."""
    return [n for n in getattr(module, "REQUIRES", ()) if importlib.util.find_spec(n) is None]


def main(device: str = "cpu", families: list[str] | None = None, full: bool = False, out: str | None = None) -> int:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("alignops bench: --device cuda but no CUDA device is visible")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"alignops bench: --device must be cpu or cuda, got {device!r}")
    names = families or list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"alignops bench: unknown families {unknown}; known: {sorted(FAMILIES)}")
    quick = not full
    out_dir = Path(out or os.environ.get("ALIGNOPS_BENCH_OUT") or default_out_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    min_run_time = float(os.environ.get("ALIGNOPS_BENCH_MIN_RUN_S", 0.05 if quick else 1.0))
    budget = os.environ.get("ALIGNOPS_BENCH_BUDGET_S")
    budget_s = float(budget) if budget else (QUICK_BUDGET_S if quick else None)
    report: list[str] = []

    def emit(text: str = "") -> None:
        progress.clear()
        print(text, flush=True)
        report.append(text)

    progress = Progress(len(names))
    emit(
        f"alignops bench on {device_name(device)}, torch {torch.__version__}, "
        f"{'representative (quick) plan; --full for the README sizes' if quick else 'full plan'}; "
        f"results in {out_dir}; ratios are baseline median / provider median in this run"
    )
    status = 0
    everything: list[Result] = []
    for name in names:
        progress.family = name
        progress.update("setting up")
        tag = f"{name}_{device}{'_quick' if quick else ''}"
        csv_path = out_dir / f"{tag}.csv"
        deadline = time.monotonic() + budget_s if budget_s is not None else None
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f".{FAMILIES[name]}", __package__)
            missing = missing_requirements(module)
            if missing:
                emit(f"\n== {name}: not run: needs {', '.join(missing)} (not installed) ==")
                progress.done += 1
                continue
            torch.manual_seed(0)
            results = run_groups(
                module.groups(device, quick),
                device,
                min_run_time,
                log=progress.log,
                deadline=deadline,
                on_rows=lambda rows, p=csv_path: write_csv(rows, p, device),
            )
        except Exception:  # noqa: BLE001  (a family that cannot even start: the next one still runs)
            emit(f"\n== {name}: FAILED ==\n{traceback.format_exc()}")
            status = 1
            progress.done += 1
            continue
        status |= any(r.error for r in results)
        everything += results
        emit(f"\n== {name} ({device_name(device)}, {time.monotonic() - t0:.0f} s) ==")
        emit(format_table(results))
        if hasattr(module, "summary"):
            try:
                lines = module.summary(results)
            except Exception:  # noqa: BLE001  (a summary that assumed a row that failed or was not run)
                lines = [f"summary not computed: {traceback.format_exc().strip().splitlines()[-1]}"]
            emit("\n".join(lines))
            if os.environ.get("ALIGNOPS_BENCH_TARGETS_FILE") == "1":
                (out_dir / f"{tag}_targets.txt").write_text("\n".join(lines) + "\n")
        png = out_dir / f"{tag}.png"
        try:
            drawn = plot(results, png, f"alignops {name} on {device_name(device)}")
        except Exception:  # noqa: BLE001  (the CSV and table matter more than the picture)
            drawn = False
        emit(f"\nrows appended to {csv_path}; " + (f"plot {png}" if drawn else "plot skipped: matplotlib missing"))
        progress.done += 1
    progress.family = "done"
    progress.update(f"{len(everything)} rows")
    progress.clear()
    if progress.tty:
        progress.stream.write("\n")
    elapsed = time.monotonic() - progress.t0
    emit(
        f"\n== summary: {len(names)} families in {elapsed:.0f} s; ours = fastest alignops provider, best peer = "
        "fastest other provider of the same case in this run; speed-up = peer ms / our ms; memory = our peak / "
        "peer peak =="
    )
    emit(format_summary(everything))
    if progress.cut:
        emit(
            f"\nstopped by the time budget ({budget_s:.0f} s per family; ALIGNOPS_BENCH_BUDGET_S), later cases "
            f"not run: {', '.join(progress.cut)}"
        )
    (out_dir / "report.txt").write_text("\n".join(report) + "\n")
    emit(f"\nreport: {out_dir / 'report.txt'}")
    return int(status)
