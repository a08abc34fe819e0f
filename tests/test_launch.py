"""kernels/_launch.py: every Triton launch runs with its tensors' CUDA device current (Triton launches on the
current device), and the compile gate's capture records what Triton specialises on."""

import contextlib
import json

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from alignops.kernels import _launch


def test_launch_makes_the_tensors_device_current(monkeypatch):
    entered, launched = [], []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    class Wrapped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, entered[-1] if entered else None))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_launch, "wrap_triton", lambda kernel: Wrapped())
    monkeypatch.setattr(_launch, "_CAPTURE", None)  # CI records launches; these stand-in kernels are not ones
    with FakeTensorMode():  # a cuda:1 tensor without a GPU
        x = torch.empty(4, device="cuda:1")
    _launch.launch(object(), (3,), 7, x, BLOCK=16)
    assert launched == [((3,), torch.device("cuda:1"))]
    _launch.launch(object(), (1,), torch.empty(2))  # CPU tensors (the interpreter): no device switch
    assert entered == [torch.device("cuda:1")] and len(launched) == 2


def test_capture_records_triton_specialisations(tmp_path, monkeypatch):
    import pytest

    triton = pytest.importorskip("triton", reason="needs the triton package")
    tl = triton.language

    @triton.jit
    def kernel(x_ptr, n, scale, BLOCK: tl.constexpr):
        pass

    path = tmp_path / "c.jsonl"
    monkeypatch.setattr(_launch, "_CAPTURE", str(path))
    monkeypatch.setattr(_launch, "_seen", set())
    monkeypatch.setattr(_launch, "_dry_run", True)  # record only
    x = torch.empty(64)
    for n in (1, 32, 48, 33, 2**40 + 3):
        _launch.launch(kernel, (1,), x, n, 0.25, BLOCK=16, num_warps=4)
    _launch.launch(kernel, (1,), x[1:], 32, 0.25, BLOCK=16, num_warps=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # n = 1, n % 16 == 0 (32 and 48 are one), any other int32, an int64: four versions; then an unaligned pointer
    assert [r["args"]["n"] for r in rows] == [{"int": 1}, {"int": 16}, {"int": 17}, {"int": 2**40 + 17}, {"int": 16}]
    assert [r["args"]["x_ptr"]["aligned"] for r in rows] == [True] * 4 + [False]
    assert rows[0]["args"]["BLOCK"] == 16 and rows[0]["options"] == {"num_warps": 4}
    assert rows[0]["args"]["scale"] == {"float": 0.5} and rows[0]["kernel"].endswith(".kernel")
