"""Timing, peak-memory measurement and result rows shared by every bench_<family>.py.

CPU: wall-clock medians over repeated calls (torch.utils.benchmark.Timer), peak extra memory from the
process's resident-set high-water mark (VmHWM), reset right before each measured call. CUDA: CUDA-event
medians (triton.testing.do_bench when Triton is present) and torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import statistics
from typing import Callable

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
        try:
            import triton.testing

            q = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75], warmup=25, rep=max(100, int(min_run_time * 1e3)))
            return q[1], q[2] - q[0]
        except ImportError:
            pass
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        q = statistics.quantiles(times, n=4)
        return statistics.median(times), q[2] - q[0]
    # Timer defaults to one thread; every provider gets all of the machine's threads.
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = [t * 1e3 for t in m.times]
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return m.median * 1e3, iqr


def run_groups(groups, device: str, min_run_time: float, log=print) -> list[Result]:
    """Runs each group of cases (sharing inputs) and fills in the ratios against its baseline row."""
    results: list[Result] = []
    for cases in groups:
        group = []
        for c in cases:
            # The first call measures the peak memory and is the warm-up of the timing.
            try:
                peak = peak_extra_mb(c.fn, device, c.reset)
                med, iqr = time_ms(c.fn, device, min_run_time)
            except torch.cuda.OutOfMemoryError:
                # A provider that cannot run the shape at all is a result too: reported, not dropped.
                if c.reset is not None:
                    c.reset()
                torch.cuda.empty_cache()
                log(f"  {c.op} {c.shape} {c.dtype} {c.mode} {c.provider}: out of GPU memory")
                group.append(Result(c.family, c.op, c.shape, c.dtype, c.provider, c.mode, float("nan"),
                                    float("nan"), float("inf")))
                continue
            group.append(Result(c.family, c.op, c.shape, c.dtype, c.provider, c.mode, med, iqr, peak))
            log(f"  {c.op} {c.shape} {c.dtype} {c.mode} {c.provider}: {med:.2f} ms, {peak:.0f} MB")
        base = [r for c, r in zip(cases, group) if c.baseline and r.median_ms == r.median_ms]
        if base:
            for r in group:
                r.ratio = base[0].median_ms / r.median_ms
                r.mem_ratio = r.peak_mb / base[0].peak_mb if base[0].peak_mb > 0 else float("nan")
        results.extend(group)
        del cases
    return results
