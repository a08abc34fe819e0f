"""Per-call cost of the stable-ABI preference ops (alignops_stable::preference_loss / selective_logprobs,
csrc/stable/preference_stable.cpp) against today's registration of the same ops (alignops::, TORCH_LIBRARY +
at::Tensor), on one torch.

Not a bench family (no ``bench_`` prefix: bench/run.py would import it, and it must run under a torch that has
no alignops build). The baseline is ``torch.ops.alignops.*`` from alignops where it imports, else from
``--native-so``: csrc/stable/native_baseline_def.cpp + csrc/preference/{preference_loss,selective_logprobs}_cpu*.cpp
compiled against the running torch (``STABLE_ABI_BENCH=1 .ci/stable_abi.sh`` builds it for torch 2.13).

Each size: ``--rounds`` rounds; in each, both ops run ``calls`` back-to-back calls (the order alternates per round),
timed with perf_counter_ns; the table gives the median per-call time of each and the median of the per-round
differences. Inputs are fp32 without requires_grad; preference_loss: loss_types=[sigmoid], compute_grad=True as
in training; selective_logprobs: the forward op, T = 1.
Two modes: ``grad`` (as a training step calls it: the dispatcher enters the Python autograd kernel that
torch.library.register_autograd installs on both ops, then the CPU kernel) and ``inference`` (under
torch.inference_mode(): no autograd key, so the C++ dispatcher goes straight to the CPU kernel, and what is left
is the calling convention of each registration). Usage::

    python bench/stable_abi_overhead.py [--native-so build/stable_abi/native213/_native_preference.so]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "build_tools"))
import stable_abi


def _native_ops(native_so: str | None):
    """(preference_loss, selective_logprobs) of today's registration, and where they came from."""
    try:
        import alignops  # noqa: F401

        name = "alignops._C"
    except (ImportError, RuntimeError, OSError):
        if native_so is None:
            raise SystemExit(f"no alignops build for torch {torch.__version__}: pass --native-so") from None
        torch.ops.load_library(native_so)
        # The package registers a Python autograd kernel (and a fake) on each op; the same here, so that both
        # registrations carry the same Python layer.
        stable_abi.register_python_layer("alignops")
        name = Path(native_so).name
    return torch.ops.alignops.preference_loss, torch.ops.alignops.selective_logprobs, name


def _calls_for(elements: int) -> int:
    return 2000 if elements <= 4096 else 200 if elements <= 65536 else 4


def _time(op, args, calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        op(*args)
    return (time.perf_counter_ns() - t0) / calls / 1e3  # us per call


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--native-so", default=None)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--sizes", default="1,8,64,4096,1048576", help="preference_loss: B")
    p.add_argument("--shapes", default="1x128,8x128,8x32000,64x32000", help="selective_logprobs: NxV")
    p.add_argument("--modes", default="grad,inference")
    a = p.parse_args(argv)
    stable_pref = stable_abi.load()
    stable_sel = torch.ops.alignops_stable.selective_logprobs
    native_pref, native_sel, native_name = _native_ops(a.native_so)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; baseline {native_name}, stable "
        f"{stable_abi.so_path().name}; {a.rounds} interleaved rounds, medians"
    )
    print(
        "| op | mode | size | calls/round | today's op (us/call) | stable ABI (us/call) | stable - today (us) | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    cases = []
    for B in (int(x) for x in a.sizes.split(",")):
        xs = [-torch.rand(B) * 30 for _ in range(4)]
        args = (*xs, None, None, None, [0], [1.0], 0.1, 0.0, 0.5, 0.05, 0, 0.5, True)
        cases.append(("preference_loss", str(B), B, native_pref, stable_pref, args))
    for shape in a.shapes.split(","):
        N, V = (int(x) for x in shape.split("x"))
        args = (torch.randn(N, V) * 3, torch.randint(0, V, (N,)), -100, 1.0)
        cases.append(("selective_logprobs", shape, N * V, native_sel, stable_sel, args))
    for mode in a.modes.split(","):
        for op_name, label, elements, native, stable, args in cases:
            with torch.inference_mode() if mode == "inference" else contextlib.nullcontext():
                row = _one(native, stable, args, _calls_for(elements), a.rounds)
            print(f"| {op_name} | {mode} | {label} | {row}")


def _one(native, stable, args, calls, rounds) -> str:
    """Both ops on the same arguments, interleaved; the rest of one table row."""
    for g, w in zip(stable(*args), native(*args)):  # the same op: a bench of two different results is meaningless
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    for op in (native, stable):  # warm-up
        _time(op, args, max(1, calls // 10))
    t_native, t_stable, diff = [], [], []
    for r in range(rounds):
        order = (native, stable) if r % 2 == 0 else (stable, native)
        t = {id(op): _time(op, args, calls) for op in order}
        t_native.append(t[id(native)])
        t_stable.append(t[id(stable)])
        diff.append(t[id(stable)] - t[id(native)])
    mn, ms = statistics.median(t_native), statistics.median(t_stable)
    return f"{calls} | {mn:.2f} | {ms:.2f} | {statistics.median(diff):+.2f} | {ms / mn:.2f} |"


if __name__ == "__main__":
    main()
