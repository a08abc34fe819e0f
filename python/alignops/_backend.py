"""Which implementation serves a call: ``backend="auto" | "native" | "triton" | "torch"``.

``auto`` is the fastest implementation measured for the device (see bench/results/): the C++ kernel on
the CPU, the CUDA C++ kernel on a GPU when it was compiled, else the Triton kernel; on the meta device the
native op, whose fake kernel gives the output shapes. A backend that cannot serve the call raises instead
of falling back silently.
"""

from __future__ import annotations

import os

import torch

from ._errors import AlignopsError

BACKENDS = ("auto", "native", "triton", "torch")

# Host buffers copied to a GPU while a CUDA graph was being captured: the graph reads them again at every
# replay, so they are kept for the life of the process (one per captured copy).
_CAPTURED_HOST_BUFFERS: list[torch.Tensor] = []


def cuda_compiled() -> bool:
    """True when this build of alignops._C holds CUDA kernels."""
    return len(torch.ops.alignops.cuda_archs()) > 0


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device, op: str, *, native_cuda: bool = True) -> str:
    """The implementation for ``op`` on ``device``; ``native_cuda=False`` for ops whose GPU kernel is Triton only."""
    if backend not in BACKENDS:
        raise AlignopsError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "meta" and backend in ("auto", "native"):
        # The native op's fake kernel propagates shapes; the references read values a meta tensor lacks.
        return "native"
    if device.type not in ("cpu", "cuda"):
        if backend in ("auto", "torch"):
            return "torch"
        raise RuntimeError(f"{op}: backend={backend!r} has no kernel for device {device}; use backend='torch'")
    if backend == "auto":
        if device.type == "cpu":
            return "native"
        return "native" if native_cuda and cuda_compiled() else "triton"
    if backend == "native" and device.type == "cuda" and not native_cuda:
        raise RuntimeError(
            f"{op}: there is no CUDA C++ kernel (its GPU kernel is Triton); use backend='triton' or 'auto'"
        )
    if backend == "native" and device.type == "cuda" and not cuda_compiled():
        raise RuntimeError(
            f"{op}: backend='native' on CUDA needs alignops built with CUDA kernels "
            "(ALIGNOPS_ENABLE_CUDA=ON); this build has none (see `alignops info`)"
        )
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' runs on CPU tensors only in the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)"
            )
    return backend


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``, without a host sync when a CPU tensor goes to a GPU: an asynchronous copy from pinned
    memory, which CUDA-graph capture accepts (a copy from pageable memory waits for the device, and fails under
    capture). Under torch.compile a plain ``.to``."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type != "cuda" or torch.compiler.is_compiling():
        return t.to(device)
    pinned = t.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_HOST_BUFFERS.append(pinned)
    return pinned.to(device, non_blocking=True)
