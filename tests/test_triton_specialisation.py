"""Kernels compile once per kind of launch, not once per size, iteration or weight: the launches of two calls
that differ only in sizes (within one tile bucket), iteration counts or loss weights must map to the same
Triton binaries. Triton's own specialisation of each recorded launch (the value 1, divisibility by 16,
do_not_specialize) is computed by the compile gate in a process without the interpreter."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package")

import alignops
from alignops import ot as O
from alignops.kernels import _launch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="records launches of the interpreter's tiles")


@pytest.fixture
def capture(tmp_path, monkeypatch):
    path = tmp_path / "launches.jsonl"
    monkeypatch.setattr(_launch, "_CAPTURE", str(path))
    monkeypatch.setattr(_launch, "_seen", set())

    def binaries() -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALIGNOPS_TRITON_CAPTURE")}
        out = subprocess.run(
            [sys.executable, "-m", "alignops.bench.sm90_gate", "triton", str(path), "--count"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    return binaries


def test_sinkhorn_sizes_and_iterations_compile_once(capture):
    for B, N, M, iters in ((3, 7, 9, 20), (5, 11, 13, 37)):  # both one 16 x 16 tile in the interpreter
        O.sinkhorn(torch.rand(B, N, M), eps=0.1, n_iters=iters, backend="triton")
    for B, N, M, iters in ((2, 37, 21, 6), (1, 45, 29, 9)):  # the split path: t changes every launch
        O.sinkhorn(torch.rand(B, N, M), eps=0.1, n_iters=iters, backend="triton")
    counts = capture()
    assert counts["sinkhorn_kernel"] == 1
    assert counts["split_cols_kernel"] == 1 and counts["split_rows_kernel"] == 1
    assert counts["split_check_kernel"] == 1


def test_preference_weights_compile_once(capture):
    x = [torch.randn(64) for _ in range(4)]
    for w in ((0.3, 0.7), (1.0, 2.5)):
        alignops.preference_loss(*x, loss_type=["sigmoid", "ipo"], loss_weights=list(w), backend="triton")
    assert capture()["preference_loss_kernel"] == 1


def test_wasserstein_sizes_compile_once(capture):
    for n, m in ((5, 7), (9, 12)):  # log2 of the sizes differs: the binary search's trip count is run-time
        alignops.wasserstein_1d(torch.rand(4, n), torch.rand(4, m), p=2.0, backend="triton")
    assert capture()["wasserstein_merge_kernel"] == 1
