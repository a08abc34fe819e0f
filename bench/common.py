"""Timing, peak-memory measurement and result rows shared by every bench_<family>.py.

CPU: wall-clock medians over repeated calls (torch.utils.benchmark.Timer), peak extra memory from the
process's resident-set high-water mark (VmHWM), reset right before each measured call. CUDA: CUDA-event
medians (triton.testing.do_bench when Triton is present) and torch.cuda.max_memory_allocated; each row also
gets its efficiency against the H200's limits (minimum bytes / HBM bandwidth, FLOPs / peak rate) where the
family states the op's work with annotate().

A case that raises is a row too: NaN times and its error, and the run goes on with the next case.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.benchmark import Timer


@dataclasses.dataclass
class Case:
    """One benchmark row: an op at a shape, run by a provider."""

    family: str
    op: str
    shape: str
    dtype: str
    provider: str
    mode: str  # "fwd" or "fwd+bwd"
    fn: Callable[[], object]
    baseline: bool = False  # the provider every other row of the same op/shape/mode is compared to
    reset: Callable[[], None] | None = None  # drops state a previous call left (e.g. .grad) before measuring
    # The op's minimum work, the same for every provider of a group (annotate()): each input read once and
    # each output written once, and the FLOPs of its math, done on `unit` (a PEAK_FLOPS key). NaN: not stated.
    min_bytes: float = float("nan")
    flops: float = float("nan")
    unit: str = "fp32"


@dataclasses.dataclass
class Result:
    family: str
    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    median_ms: float
    iqr_ms: float
    peak_mb: float
    ratio: float = float("nan")  # baseline median / this median: > 1 means faster than the baseline
    mem_ratio: float = float("nan")  # this peak / baseline peak: < 1 means leaner
    # GPU rows only (written to the CSV and the table on CUDA alone, so CPU output keeps its columns):
    hbm_frac: float = float("nan")  # min_bytes / (time * HBM bandwidth)
    peak_frac: float = float("nan")  # flops / (time * peak rate of the case's math unit)
    error: str = ""  # why the case has no time (exception type and message)


GPU_FIELDS = ("hbm_frac", "peak_frac", "error")

# The H200 SXM's limits (datasheet): HBM3e bandwidth, and dense peak rates of the unit doing the math
# (tensor cores for bf16 / fp16 / tf32 matmuls, the plain fp32 pipes otherwise).
HBM_BYTES_PER_S = 4.8e12
PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}


def case_maker(family: str, op: str, shape: str, dtype: str, mode: str) -> Callable[..., Case]:
    """A Case constructor for one group: the fields its cases share are fixed here, and each call gives the
    provider, the fn and any keyword field of Case (baseline, reset)."""

    def make(provider: str, fn: Callable[[], object], **fields) -> Case:
        return Case(family, op, shape, dtype, provider, mode, fn, **fields)

    return make


def providers(device: str) -> list[str]:
    """The alignops providers a family with a native and a Triton kernel benches on ``device``."""
    names = ["alignops"]
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("alignops-triton")
    return names


def provider_backend(provider: str) -> str:
    """The ``backend=`` argument of a provider named by :func:`providers`."""
    return "triton" if provider == "alignops-triton" else "native"


def grad_closures(
    *leaves: torch.Tensor,
) -> tuple[Callable[[Callable[[], torch.Tensor]], torch.Tensor], Callable[[], None]]:
    """(fwd_bwd, reset) over the leaves a case differentiates: ``fwd_bwd(f)`` clears their ``.grad``, runs
    ``f().backward()`` and returns the loss; ``reset()`` clears their ``.grad`` (so a peak starts without them)."""

    def reset() -> None:
        for t in leaves:
            t.grad = None

    def fwd_bwd(f: Callable[[], torch.Tensor]) -> torch.Tensor:
        reset()
        loss = f()
        loss.backward()
        return loss

    return fwd_bwd, reset


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors, each counted once (a minimum-traffic term)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def matmul_unit(dtype: torch.dtype) -> str:
    """The PEAK_FLOPS key of a matmul in this dtype (fp32 runs on the TF32 tensor cores only when allowed)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def annotate(cases: list[Case], min_bytes: float, flops: float = float("nan"), unit: str = "fp32") -> list[Case]:
    """States the op's minimum work on every case of a group (they share the op and shape); returns cases."""
    for c in cases:
        c.min_bytes, c.flops, c.unit = float(min_bytes), float(flops), unit
    return cases


def efficiency(median_ms: float, min_bytes: float, flops: float, unit: str) -> tuple[float, float]:
    """(fraction of HBM bandwidth, fraction of the unit's peak rate) that a call of median_ms achieves."""
    seconds = median_ms / 1e3
    if not seconds > 0:
        return float("nan"), float("nan")
    return min_bytes / (seconds * HBM_BYTES_PER_S), flops / (seconds * PEAK_FLOPS[unit])


def _return_freed_memory_to_the_os() -> None:
    """Pin glibc's mmap threshold at 32 MiB, the value its adaptive threshold settles at after warm-up.

    Tensors of 32 MiB and more are then mmap'd and unmapped on free, so the RSS high-water mark of a
    call counts them however often earlier calls allocated the same sizes; smaller buffers come from the
    heap as in any long-running process (a lower threshold would page-fault every temporary and slow the
    allocating providers unrealistically).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)


_return_freed_memory_to_the_os()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], object], device: str, reset: Callable[[], None] | None = None) -> float:
    """Memory the call needs beyond what is already allocated (inputs), at its peak, in MB."""
    if reset is not None:
        reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - before) / 2**20
    if not _reset_peak_rss():
        return float("nan")
    before = _rss_kb("VmRSS")
    out = fn()
    peak = _rss_kb("VmHWM")
    del out
    return (peak - before) / 1024


def time_ms(fn: Callable[[], object], device: str, min_run_time: float) -> tuple[float, float]:
    """(median, interquartile range) of one call, in milliseconds."""
    if device == "cuda":
        # A call of tens of milliseconds or more (looped peers, whole DPO steps): a few event-timed calls
        # measure it; do_bench would make ~10 calls for its estimate and warm-up alone.
        first = _cuda_event_times(fn, 1)[0]
        if first >= 50.0:
            times = _cuda_event_times(fn, max(3, min(10, int(min_run_time * 1e3 / first))))
            q = statistics.quantiles(times, n=4)
            return statistics.median(times), q[2] - q[0]
        try:
            import triton.testing

            q = triton.testing.do_bench(
                fn, quantiles=[0.25, 0.5, 0.75], warmup=25, rep=max(100, int(min_run_time * 1e3))
            )
            return q[1], q[2] - q[0]
        except ImportError:
            pass
        times = _cuda_event_times(fn, 20)
        q = statistics.quantiles(times, n=4)
        return statistics.median(times), q[2] - q[0]
    # Timer defaults to one thread; every provider gets all of the machine's threads.
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    times = [t * 1e3 for t in m.times]
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return m.median * 1e3, iqr


def _cuda_event_times(fn: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _failed(c: Case, device: str, err: BaseException, log) -> Result:
    """The row of a case that raised: reported with its error, not dropped."""
    oom = isinstance(err, torch.cuda.OutOfMemoryError)
    try:
        if c.reset is not None:
            c.reset()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  (a sticky CUDA error: the next cases will report it too)
        pass
    first_line = (str(err).strip().splitlines() or [""])[0]
    msg = "out of GPU memory" if oom else f"{type(err).__name__}: {first_line}"
    log(f"  {c.op} {c.shape} {c.dtype} {c.mode} {c.provider}: FAILED {msg[:300]}")
    # A provider that cannot run the shape at all (out of memory) is a result too: infinite peak.
    return Result(
        c.family,
        c.op,
        c.shape,
        c.dtype,
        c.provider,
        c.mode,
        float("nan"),
        float("nan"),
        float("inf") if oom else float("nan"),
        error=msg[:300],
    )


def _set_ratios(group: list[tuple[Case, Result]]) -> bool:
    """Fills in every row's ratios once the group's baseline has a time; False while it has none."""
    base = [r for c, r in group if c.baseline and r.median_ms == r.median_ms]
    if not base:
        return False
    for _, r in group:
        r.ratio = base[0].median_ms / r.median_ms
        r.mem_ratio = r.peak_mb / base[0].peak_mb if base[0].peak_mb > 0 else float("nan")
    return True


def run_groups(
    groups: Iterable[list[Case]],
    device: str,
    min_run_time: float,
    log=print,
    deadline: float | None = None,
    on_rows: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Runs each group of cases (sharing inputs) and fills in the ratios against its baseline row.

    A case that raises gives a NaN row with its error. deadline (time.monotonic()): no case starts after it
    (the family ends there). A group generator that raises ends the family (logged).
    on_rows receives rows as soon as they and their group's baseline are measured (a run killed later, in
    the middle of a slow case, keeps them).
    """
    results: list[Result] = []
    it = iter(groups)
    while True:
        try:
            cases = next(it)
        except StopIteration:
            break
        except Exception as err:  # noqa: BLE001  (setting up a group's inputs failed: the family stops here)
            log(f"  group setup FAILED, rest of the family not run: {type(err).__name__}: {err}")
            break
        group: list[tuple[Case, Result]] = []
        emitted = 0
        for c in cases:
            if deadline is not None and time.monotonic() > deadline:
                break
            # The first call measures the peak memory and is the warm-up of the timing.
            try:
                peak = peak_extra_mb(c.fn, device, c.reset)
                med, iqr = time_ms(c.fn, device, min_run_time)
            except Exception as err:  # noqa: BLE001
                group.append((c, _failed(c, device, err, log)))
            else:
                r = Result(c.family, c.op, c.shape, c.dtype, c.provider, c.mode, med, iqr, peak)
                if device == "cuda" and not math.isnan(c.min_bytes):
                    r.hbm_frac, r.peak_frac = efficiency(med, c.min_bytes, c.flops, c.unit)
                group.append((c, r))
                log(f"  {c.op} {c.shape} {c.dtype} {c.mode} {c.provider}: {med:.2f} ms, {peak:.0f} MB")
            if _set_ratios(group) and on_rows is not None:
                on_rows([r for _, r in group[emitted:]])
                emitted = len(group)
        rows = [r for _, r in group]
        if on_rows is not None and emitted < len(rows):
            on_rows(rows[emitted:])
        results.extend(rows)
        if len(group) < len(cases):
            log("  time budget spent: the family's remaining cases not run")
            break
        del cases, group
    return results


def import_peer(name: str):
    """Import the peer module ``name`` with this checkout's root off sys.path: transformers imports the Hub's
    ``kernels`` package, which the repository's ``kernels/`` folder would shadow when the bench runs from the root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved_path, saved_module = sys.path[:], sys.modules.pop("kernels", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != root]
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved_path
        if saved_module is not None:
            sys.modules["kernels"] = saved_module
