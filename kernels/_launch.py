"""The one way the kernels of this folder are launched, and the one place that knows about the interpreter.

``launch(kernel, grid, *args, **kwargs)`` is ``wrap_triton(kernel)[grid](*args, **kwargs)`` run with the
tensors' CUDA device current: Triton launches on the current device and its current stream, so without the
guard a tensor on cuda:1 would be handed to a kernel running on cuda:0 while cuda:0 is current.

``interpreting(t)`` says whether a launch on ``t`` runs in the Triton interpreter (CPU tensors); ``tile(t, name,
gpu)`` is the one way a launcher picks a size that differs there: the interpreter's sizes are the table
INTERPRETER_TILES below (small, so that the tests' small shapes cover several tiles), the GPU's the ``gpu``
argument. The compile gate (bench/sm90_gate.py) flips it to record the GPU choices for the bench's shapes
without a GPU.

When ``ALIGNOPS_TRITON_CAPTURE`` names a file, every launch appends the kernel and its argument types, the
integer specialisations Triton applies (the value 1, divisibility by 16, 64-bit range), constexpr values,
num_warps and num_stages as one JSON line (each distinct line once per process); the compile gate compiles
each for sm_90 with the real compiler.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os

import torch
from torch.library import wrap_triton

_CAPTURE = os.environ.get("ALIGNOPS_TRITON_CAPTURE")
_seen: set[str] = set()
# Set by the compile gate: record launches without running them, and choose GPU tiles on CPU tensors.
_dry_run = False
_INT32 = (-(2**31), 2**31 - 1)


def interpreting(where: torch.Tensor | torch.device) -> bool:
    """True when a launch on ``where`` (a tensor or a device) runs in the Triton interpreter, and so picks the
    interpreter's tiles."""
    device = where.device if isinstance(where, torch.Tensor) else where
    return device.type == "cpu" and not _dry_run


# ---- the interpreter's launch choices, all of them ---------------------------------------------------------------
# On CPU tensors the kernels run in the Triton interpreter, on the tests' small shapes: each tile below is small
# enough that those shapes span several tiles and a partial last one, so the tests cover the tile edges. The GPU
# choices stay with each kernel's launcher, which asks ``tile(where, name, gpu_choice)``.
INTERPRETER_TILES = {
    "fused_linear.block_v": 64,  # columns per step of a row
    "distillation.block_v": 32,  # columns per step of a row
    "ctc_posteriors.block": 16,  # CTC states per chunk
    "skip.block": 16,  # rows, hidden and GEMM tiles of skip_ffn
    "ot.block": 16,  # row and column tiles of Sinkhorn, its split path and the normalisers
    "ot.split_batch_below": 3,  # the split path for B < 3 ...
    "ot.split_size_from": 16 * 16 + 1,  # ... and N * M > 256 (several column blocks)
    "wasserstein.block_steps": 16,  # merge steps per block
    "ppo.block_rows": 4,  # rows per program
    "policy.block_t": 4,  # tokens per tile: T <= 16 spans several
}


def tile(where: torch.Tensor | torch.device, name: str, gpu: int) -> int:
    """``gpu`` for a GPU launch (and for the compile gate, which records the GPU choices on CPU tensors), the
    interpreter's tile ``name`` (INTERPRETER_TILES) for a launch on CPU tensors."""
    return INTERPRETER_TILES[name] if interpreting(where) else gpu


def interpreter_upcasts_bf16(where: torch.Tensor | torch.device, dtype: torch.dtype) -> bool:
    """The interpreter computes tl.dot in numpy, which has no bfloat16: bf16 operands are upcast to fp32 there."""
    return interpreting(where) and dtype == torch.bfloat16


def _canonical_int(v: int) -> int:
    """A stand-in with the same specialisation: Triton compiles one version per (== 1, % 16 == 0, i32/i64)."""
    wide = not (_INT32[0] <= v <= _INT32[1])
    if v == 1:
        return 1
    base = 2**40 if wide else 0
    return base + (16 if v % 16 == 0 else 17)


def _encode(v, constexpr: bool):
    if isinstance(v, torch.Tensor):
        try:
            aligned = v.data_ptr() % 16 == 0
        except (RuntimeError, NotImplementedError):  # fake / functional tensors under torch.compile tracing
            aligned = True
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": aligned}
    if isinstance(v, tuple):  # JSON has no tuple: the gate reads every list back as one
        return [_encode(x, constexpr) for x in v]
    if constexpr or isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return {"int": _canonical_int(v)}
    if isinstance(v, float):
        return {"float": 0.5}
    return v


def _record(kernel, grid, args, kwargs) -> None:
    fn = getattr(kernel, "fn", kernel)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    params = {}
    for name, value in bound.arguments.items():
        constexpr = "constexpr" in str(sig.parameters[name].annotation)
        params[name] = _encode(value, constexpr)
    options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    line = json.dumps(
        {"kernel": f"{fn.__module__}:{fn.__qualname__}", "args": params, "options": options}, sort_keys=True
    )
    if line in _seen:
        return
    _seen.add(line)
    with open(_CAPTURE, "a") as out:
        out.write(line + "\n")


def _device_of(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)`` on the first tensor argument's CUDA device."""
    if _CAPTURE:
        _record(kernel, grid, args, kwargs)
    if _dry_run:
        return
    device = _device_of(args)
    guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with guard:
        wrap_triton(kernel)[grid](*args, **kwargs)
