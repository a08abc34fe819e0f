"""The Hopper compile gate: every Triton kernel specialisation the tests and the bench launch, compiled for
sm_90 with the real Triton compiler (no GPU needed), and the resource report of every kernel, Triton and
CUDA C++, checked for register spills.

    python -m alignops.bench.sm90_gate triton CAPTURE.jsonl [...] --csv bench/results/triton_sm90.csv
    python -m alignops.bench.sm90_gate bench-shapes CAPTURE.jsonl
    python -m alignops.bench.sm90_gate cuda LIB.so --csv bench/results/cuda_sm90.csv

``triton``: CAPTURE files hold the launches recorded by kernels/_launch.py (ALIGNOPS_TRITON_CAPTURE=FILE
while the tests run in the interpreter, plus ``bench-shapes``). Each distinct specialisation is compiled to
PTX for GPUTarget("cuda", 90, 32) with the launch's num_warps / num_stages, then assembled by the ptxas that
ships with Triton (-arch=sm_90a -v) for registers, spill bytes and shared memory. Exit 1 on any compile
error, naming kernel and specialisation, and on a spill over SPILL_LIMIT bytes in a kernel that
ALLOWED_SPILLS does not list with its reason. Run it once per Triton version (CI: the torch build's Triton
and 3.6, the GPU machine's).

``bench-shapes``: records, without running anything, the launches the bench makes on a GPU (its shapes and
the GPU tile choices of the launch helpers), so that the gate covers what users hit and not only test shapes.

``cuda``: ``cuobjdump -res-usage`` over the built extension: registers, stack, spills (local memory) and
shared memory of every CUDA C++ kernel for sm_90, into a CSV, with the same spill rule.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SPILL_LIMIT = 1024  # bytes of spill stores per kernel
# kernel -> why its spills are accepted (none today)
ALLOWED_SPILLS: dict[str, str] = {}


# ---- triton ---------------------------------------------------------------------------------------------------


def _stand_in(spec, torch):
    """A CPU tensor of the recorded dtype, 16-byte aligned or not, for Triton's own specialisation code."""
    dtype = getattr(torch, spec["tensor"])
    base = torch.empty(64, dtype=dtype)
    return base if spec["aligned"] else base[1:]


def _decode(v, torch):
    if isinstance(v, list):  # a tuple argument (JSON writes tuples as lists)
        return tuple(_decode(x, torch) for x in v)
    if isinstance(v, dict) and "tensor" in v:
        return _stand_in(v, torch)
    if isinstance(v, dict) and "int" in v:
        return v["int"]
    if isinstance(v, dict) and "float" in v:
        return v["float"]
    return v


def _describe(args: dict, options: dict) -> str:
    parts = []
    for k, v in args.items():
        if isinstance(v, dict) and "tensor" in v:
            parts.append(f"{k}=*{v['tensor']}" + ("" if v["aligned"] else "(unaligned)"))
        elif isinstance(v, dict):
            parts.append(f"{k}={next(iter(v.values()))}")
        else:
            parts.append(f"{k}={v}")
    parts += [f"{k}={v}" for k, v in sorted(options.items())]
    return " ".join(parts)


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _ptxas_report(ptxas: str, ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True
        )
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    regs = _PTXAS.search(text)
    spill = _SPILL.search(text)
    smem = _SMEM.search(text)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "stack_bytes": int(spill.group(1)) if spill else 0,
        "spill_store_bytes": int(spill.group(2)) if spill else 0,
        "spill_load_bytes": int(spill.group(3)) if spill else 0,
        "ptxas_smem_bytes": int(smem.group(1)) if smem else 0,
    }


def _prepare(entry: dict, torch):
    """(key, compile thunk): the key is Triton's own specialisation of the launch (types, the value 1,
    divisibility by 16, do_not_specialize honoured) with its constexprs and options, so that launches which
    Triton would serve with one binary are compiled once."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module, qualname = entry["kernel"].split(":")
    fn = getattr(importlib.import_module(module), qualname)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = {k: _decode(v, torch) for k, v in entry["args"].items()}
    bound_args, specialization, options = binder(**args, **entry["options"])
    key = repr((entry["kernel"], specialization, sorted(options.items())))

    def compile_it() -> dict:
        opts, signature, constexprs, attrs = fn._pack_args(
            backend, entry["options"], bound_args, specialization, options
        )
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        report = _ptxas_report(ptxas, compiled.asm["ptx"])
        report["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0))
        return report

    return key, compile_it


def _load_entries(paths: list[str]) -> list[dict]:
    seen, entries = set(), []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and line not in seen:
                    seen.add(line)
                    entries.append(json.loads(line))
    entries.sort(key=lambda e: (e["kernel"], json.dumps(e, sort_keys=True)))
    return entries


def count_binaries(paths: list[str]) -> dict[str, int]:
    """Kernel -> how many binaries Triton would compile for the recorded launches (no compile)."""
    import torch

    keys: dict[str, set] = {}
    for entry in _load_entries(paths):
        key, _ = _prepare(entry, torch)
        keys.setdefault(entry["kernel"].split(":")[1], set()).add(key)
    return {k: len(v) for k, v in keys.items()}


def gate_triton(paths: list[str], csv_path: str | None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("the compile gate needs the real compiler: unset TRITON_INTERPRET")
    import torch
    import triton

    entries = _load_entries(paths)
    rows, failures = [], []
    start = time.time()
    keys = set()
    for entry in entries:
        spec = _describe(entry["args"], entry["options"])
        row = {"triton": triton.__version__, "kernel": entry["kernel"].split(":")[1], "specialisation": spec}
        try:
            key, compile_it = _prepare(entry, torch)
            if key in keys:
                continue
            keys.add(key)
            row.update(compile_it(), status="ok")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the gate fails
            text = " ".join(str(e).split())
            msg = text[text.rfind("^") + 1 :].strip()[:400] if "^" in text else text[-400:]  # the error, not the source
            row.update(status=f"error: {type(e).__name__}: {msg}")
            failures.append(f"{row['kernel']} [{spec}]: {type(e).__name__}: {msg}")
        else:
            spill = row["spill_store_bytes"]
            if spill > SPILL_LIMIT and row["kernel"] not in ALLOWED_SPILLS:
                row["status"] = f"spill {spill} B > {SPILL_LIMIT} B"
                failures.append(
                    f"{row['kernel']} [{spec}]: spills {spill} bytes (limit {SPILL_LIMIT}; list it in "
                    "ALLOWED_SPILLS with a reason, or retune)"
                )
        rows.append(row)
    _write_csv(csv_path, rows)
    kernels = len({r["kernel"] for r in rows})
    print(
        f"triton {triton.__version__}: {len(rows)} specialisations of {kernels} kernels compiled for sm_90 "
        f"in {time.time() - start:.0f} s; {len(failures)} failures"
    )
    worst = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["spill_store_bytes"])[:5]
    for r in worst:
        if r["spill_store_bytes"]:
            print(
                f"  spill {r['spill_store_bytes']:>6} B  regs {r['registers']:>3}  {r['kernel']} "
                f"[{r['specialisation']}]"
            )
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not rows else 0


def _write_csv(path: str | None, rows: list[dict]) -> None:
    if not path:
        return
    fields = [
        "triton",
        "kernel",
        "specialisation",
        "registers",
        "spill_store_bytes",
        "spill_load_bytes",
        "stack_bytes",
        "shared_bytes",
        "ptxas_smem_bytes",
        "status",
    ]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ---- cuda C++ --------------------------------------------------------------------------------------------------

_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def gate_cuda(lib: str, csv_path: str | None) -> int:
    cuobjdump = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):  # the CUDA compiler image has none; Triton ships one
        import triton

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([cuobjdump, "-res-usage", lib], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout + out.stderr)
        return 1
    rows, failures, arch, name = [], [], "", ""
    for line in out.stdout.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        r = _RES.search(line)
        if r and name:
            demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            row = {
                "arch": arch,
                "kernel": demangled,
                "registers": int(r.group(1)),
                "stack_bytes": int(r.group(2)),
                "shared_bytes": int(r.group(3)),
                "local_bytes": int(r.group(4)),
            }
            if row["local_bytes"] > SPILL_LIMIT and demangled not in ALLOWED_SPILLS:
                failures.append(f"{demangled}: {row['local_bytes']} bytes of local memory (limit {SPILL_LIMIT})")
            rows.append(row)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(
                f, fieldnames=["arch", "kernel", "registers", "stack_bytes", "shared_bytes", "local_bytes"]
            )
            w.writeheader()
            w.writerows(rows)
    archs = sorted({r["arch"] for r in rows})
    print(f"cuda: {len(rows)} kernels in {os.path.basename(lib)} ({', '.join(archs)}); {len(failures)} failures")
    for f in failures:
        print("FAIL", f)
    if "sm_90" not in archs:
        print("FAIL no sm_90 machine code in the extension")
        return 1
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sm90_gate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("triton")
    t.add_argument("captures", nargs="+")
    t.add_argument("--csv")
    t.add_argument("--count", action="store_true", help="print {kernel: binaries} as JSON, compile nothing")
    b = sub.add_parser("bench-shapes")
    b.add_argument("capture")
    c = sub.add_parser("cuda")
    c.add_argument("lib")
    c.add_argument("--csv")
    a = p.parse_args(argv)
    if a.cmd == "triton" and a.count:
        print(json.dumps(count_binaries(a.captures), sort_keys=True))
        return 0
    if a.cmd == "triton":
        return gate_triton(a.captures, a.csv)
    if a.cmd == "cuda":
        return gate_cuda(a.lib, a.csv)
    from . import sm90_shapes

    sm90_shapes.record(os.path.abspath(a.capture))
    return 0


if __name__ == "__main__":
    sys.exit(main())
