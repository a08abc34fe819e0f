"""`alignops bench`: the default plan covers every family, runs from any folder and writes only there."""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import pytest

from alignops import cli
from alignops.bench import common, run

BENCH_DIR = Path(run.__file__).resolve().parent


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_every_bench_module_is_a_family():
    modules = sorted(p.stem[len("bench_") :] for p in BENCH_DIR.glob("bench_*.py"))
    assert sorted(run.FAMILIES) == modules
    assert list(run.FAMILIES)[:3] == ["preference", "fused_linear", "skip"]


@pytest.mark.parametrize("family", list(run.FAMILIES))
def test_quick_plan_has_cases_with_a_baseline(family, monkeypatch, tmp_path, capsys):
    # `python -m pytest` puts the checkout on sys.path, where kernels/ shadows the Hub's `kernels` package
    # that transformers (a peer of some families) imports; `alignops bench` never has the checkout there.
    root = BENCH_DIR.parent
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != root])
    if Path(getattr(sys.modules.get("kernels"), "__file__", None) or "/").resolve().parent == root / "kernels":
        monkeypatch.delitem(sys.modules, "kernels")
    # The first group only: building every group's inputs would take longer than running a few.
    module = __import__(f"alignops.bench.{run.FAMILIES[family]}", fromlist=["groups"])
    if run.missing_requirements(module):
        # A family about a peer (trl: TRL's trainers) has nothing to run without it; the CLI must say so.
        _assert_not_run_and_said(family, tmp_path, capsys)
        return
    cases = next(iter(module.groups("cpu", True)), None)
    assert cases, f"{family}: the quick plan yields no group"
    assert all(isinstance(c, common.Case) for c in cases)
    assert any(c.baseline for c in cases), f"{family} {cases[0].op} {cases[0].shape}: no baseline"


def test_default_run_writes_only_into_a_new_folder_of_the_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGNOPS_BENCH_MIN_RUN_S", "0.005")
    monkeypatch.delenv("ALIGNOPS_BENCH_OUT", raising=False)
    monkeypatch.delenv("ALIGNOPS_BENCH_BUDGET_S", raising=False)
    before = _tree(BENCH_DIR)
    assert cli.main(["bench", "--family", "watermark"]) == 0
    assert _tree(BENCH_DIR) == before
    (out,) = tmp_path.iterdir()
    assert out.name.startswith("alignops-bench-")
    assert {p.name for p in out.iterdir()} >= {"watermark_cpu_quick.csv", "report.txt"}
    rows = (out / "watermark_cpu_quick.csv").read_text().splitlines()
    assert rows[0].startswith("date,device,torch,git_sha,family,op") and len(rows) > 2
    stdout = capsys.readouterr()
    report = (out / "report.txt").read_text()
    assert "== summary: 1 families" in report and "best peer" in report
    # The summary names a peer of the watermark family: the plain argmax or one of the torch implementations.
    summary = report.split("== summary")[1]
    assert "watermark  decode step" in summary and ("torch" in summary)
    assert "families" in stdout.err  # the progress line


def _tiny_family(monkeypatch):
    """A family of two trivial cases, registered as bench_tiny, so a CLI run takes a fraction of a second."""
    module = types.ModuleType("alignops.bench.bench_tiny")
    module.groups = lambda device, quick: iter(
        [
            [
                common.Case("tiny", "sum", "n=8", "float32", "torch", "fwd", lambda: sum(range(8)), baseline=True),
                common.Case("tiny", "sum", "n=8", "float32", "alignops", "fwd", lambda: 28),
            ]
        ]
    )
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(run.FAMILIES, "tiny", "bench_tiny")


def test_out_and_env_choose_the_folder(tmp_path, monkeypatch):
    _tiny_family(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGNOPS_BENCH_MIN_RUN_S", "0.001")
    monkeypatch.setenv("ALIGNOPS_BENCH_OUT", str(tmp_path / "from_env"))
    assert cli.main(["bench", "--family", "tiny", "--out", str(tmp_path / "given")]) == 0
    assert (tmp_path / "given" / "tiny_cpu_quick.csv").exists()
    assert not (tmp_path / "from_env").exists()
    assert cli.main(["bench", "--family", "tiny", "--full"]) == 0
    assert (tmp_path / "from_env" / "tiny_cpu.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_env", "given"]


def test_a_spent_budget_is_reported(tmp_path, monkeypatch, capsys):
    _tiny_family(monkeypatch)
    monkeypatch.setenv("ALIGNOPS_BENCH_MIN_RUN_S", "0.001")
    monkeypatch.setenv("ALIGNOPS_BENCH_BUDGET_S", "-1")  # spent before the first case
    assert cli.main(["bench", "--family", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "stopped by the time budget (-1 s per family; ALIGNOPS_BENCH_BUDGET_S), later cases not run: tiny" in out.out
    assert "tiny: time budget spent" in out.err


def test_flags_choose_the_plan(monkeypatch):
    seen = []
    monkeypatch.setattr(run, "main", lambda **kw: seen.append(kw) or 0)
    cli.main(["bench"])
    cli.main(["bench", "--quick"])
    cli.main(["bench", "--full", "--family", "ot", "--out", "x"])
    assert [kw["full"] for kw in seen] == [False, False, True]
    assert seen[2]["families"] == ["ot"] and seen[2]["out"] == "x"
    with pytest.raises(SystemExit, match="2"):
        cli.main(["bench", "--full", "--quick"])


def test_unknown_family_is_refused():
    with pytest.raises(SystemExit, match=r"unknown families \['nope'\]"):
        run.main(families=["nope"], out=os.devnull)


def _r(op, provider, ms, mb, family="f"):
    return common.Result(family, op, "n=1", "float32", provider, "fwd", ms, 0.0, mb)


def test_summary_takes_our_fastest_against_the_fastest_peer():
    rows = run.summary_rows(
        [
            _r("a", "torch reference", 10.0, 40.0),
            _r("a", "alignops", 4.0, 10.0),
            _r("a", "alignops in place", 2.0, 5.0),
            _r("a", "peer X", 6.0, 20.0),
            _r("b", "alignops", 1.0, 0.2),  # no peer timed: no row
            _r("b", "peer Y", math.nan, math.nan),
            _r("c", "peer Z", 3.0, 0.5),
            _r("c", "alignops", 1.5, 8.0),  # the peer's peak is under 1 MB: no memory ratio
            _r("d", "torch", 8.0, 40.0),
            _r("d", "alignops", 4.0, 0.0),  # ours under 1 MB: bounded by 1 MB / 40 MB
        ]
    )
    assert rows == [
        ("f", "a", "n=1 float32 fwd", "alignops in place", "2", "peer X", "6", "3.00x", "0.25x"),
        ("f", "c", "n=1 float32 fwd", "alignops", "1.5", "peer Z", "3", "2.00x", "-"),
        ("f", "d", "n=1 float32 fwd", "alignops", "4", "torch", "8", "2.00x", "<0.03x"),
    ]


def _assert_not_run_and_said(family, out_dir, capsys):
    module = __import__(f"alignops.bench.{run.FAMILIES[family]}", fromlist=["REQUIRES"])
    missing = run.missing_requirements(module)
    assert missing
    assert run.main("cpu", [family], out=str(out_dir)) == 0
    line = f"== {family}: not run: needs {', '.join(missing)} (not installed) =="
    assert line in capsys.readouterr().out
    assert line in (out_dir / "report.txt").read_text()
    assert not list(out_dir.glob("*.csv"))


def test_family_without_its_peer_says_so(monkeypatch, tmp_path, capsys):
    """A family whose REQUIRES cannot be imported is not run, and the table's place names what is missing
    (the trl family with TRL hidden, so that this runs whether TRL is installed or not)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == "trl" else real(n, *a, **k))
    _assert_not_run_and_said("trl", tmp_path, capsys)
