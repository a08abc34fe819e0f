"""The ``alignops`` command: ``alignops info`` and ``alignops bench``."""

from __future__ import annotations

import argparse
import sys


def _info() -> int:
    import platform

    import torch

    import alignops
    from alignops import _backend

    archs = torch.ops.alignops.cuda_archs()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rows = [
        ("alignops", alignops.__version__),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("python", platform.python_version()),
        ("CPU kernels", "built"),
        ("CUDA kernels", f"built for sm_{', sm_'.join(map(str, archs))}" if archs else "not built"),
        ("Triton", f"{triton_version}" if triton_version else "not installed"),
        ("Triton interpreter", "on (TRITON_INTERPRET=1)" if _backend.triton_interpreting() else "off"),
        (
            "devices",
            ", ".join(
                ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
            ),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled backends, devices")
    bench = sub.add_parser(
        "bench",
        help="benchmark every family against the reference and installed peers",
        description="Default: a representative run of every family (a few minutes on a 2-core CPU) into a new "
        "folder ./alignops-bench-<UTC time>/ (table, CSVs, plots, report.txt); --full: the README's "
        "sizes (over an hour on a 2-core CPU).",
    )
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bench.add_argument("--family", action="append", help="run only these families (default: all)")
    plan = bench.add_mutually_exclusive_group()
    plan.add_argument("--full", action="store_true", help="the README's sizes and 1 s timings (long)")
    plan.add_argument("--quick", action="store_true", help="the default plan (kept for old scripts)")
    bench.add_argument(
        "--out",
        default=None,
        help="folder for the CSVs, plots and report (default: ./alignops-bench-<UTC time>/; "
        "--full --out bench/results appends to the README's tables)",
    )
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    from alignops.bench import run

    return run.main(device=args.device, families=args.family, full=args.full, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
