"""Argument checks shared by the public functions and the Triton ops (the C++ ops have csrc/common/checks.h).
Every message names the argument and what was expected."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch

from ._backend import triton_interpreting
from ._errors import AlignopsError


def check_python_float(value: float, name: str) -> None:
    """A float hyper-parameter given as a number, not a tensor (reading a tensor's value would sync with its
    device). Its range may be an op's own check (``run_checks``), which would read a 0-d tensor silently."""
    if isinstance(value, torch.Tensor):
        raise AlignopsError(f"{name} must be a Python float, got a tensor {value!r}")


FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_floating(t: torch.Tensor, name: str) -> None:
    """``t`` of one of the dtypes the kernels take, with the message of the C++ check (``check_floating`` in
    csrc/common/checks.h): for the torch-composite functions, and for a public function that computes on a tensor
    before its op's checks run."""
    if t.dtype not in FLOATING:
        raise AlignopsError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_finite(value: float, name: str) -> None:
    """A float hyper-parameter with no meaning at NaN or inf: refused by name rather than carried into the kernels,
    where it turns every output into NaN (or, as a reg or a penalty, fails somewhere further in)."""
    check_python_float(value, name)
    if not math.isfinite(value):
        raise AlignopsError(f"{name} must be finite, got {value!r}")


def check_positive(value: float, name: str) -> None:
    """A float hyper-parameter that must be finite and > 0 (eps, a temperature), named when it is not."""
    check_finite(value, name)
    if not value > 0:
        raise AlignopsError(f"{name} must be a finite value > 0, got {value!r}")


def check_not_nan(value: float, name: str) -> None:
    """A float hyper-parameter for which inf has a meaning (a threshold, a tolerance, a penalty) but NaN has none."""
    check_python_float(value, name)
    if math.isnan(value):
        raise AlignopsError(f"{name} must not be NaN, got {value!r}")


def check_int64(value: int, name: str) -> None:
    """A seed or key: an int that the native ops take as int64 and the hash reads as 64 bits. A wider one would
    otherwise fail in the dispatcher's cast ("Expected 'int' ... found 'int'") or alias a smaller one."""
    try:
        ok = -(2**63) <= operator.index(value) < 2**63
    except TypeError:
        ok = False
    if not ok:
        raise AlignopsError(
            f"{name} must be a Python int that fits in 64 bits (the int64 range [-2**63, 2**63)), got {value!r}"
        )


def check_same_device(named: Iterable[tuple[str, object]]) -> None:
    """Every tensor among the ``(name, value)`` pairs on the device of the first one (``None`` and non-tensors
    skipped, a list of tensors checked entry by entry). A meta tensor among CPU tensors would otherwise make the
    dispatcher run the op's fake kernel and return uninitialised memory; the message names the argument that
    differs, as ``check_same_device`` in csrc/common/checks.h does."""
    first: tuple[str, torch.Tensor] | None = None
    for name, value in named:
        items = enumerate(value) if isinstance(value, (list, tuple)) else ((None, value),)
        for i, t in items:
            if not isinstance(t, torch.Tensor):
                continue
            label = name if i is None else f"{name}[{i}]"
            if first is None:
                first = (label, t)
            elif t.device != first[1].device:
                raise AlignopsError(f"{label} must be on the device of {first[0]} ({first[1].device}), got {t.device}")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether the checks that read ``t``'s values on the host run: not while torch.compile traces (a host
    sync breaks the graph) and not for a meta tensor (it holds no values; its shapes still propagate)."""
    return not t.is_meta and not torch.compiler.is_compiling()


def check_has_values(fn: str, name: str, t: torch.Tensor, instead: str) -> None:
    """For a result that depends on the values of ``t`` (read on the host): a meta tensor holds none, so it
    gets an error that says what to pass ``instead`` rather than a failing ``.item()`` deep inside."""
    if t.is_meta:
        raise AlignopsError(f"{fn}: {name} is a meta tensor, which holds no values; {instead}")


def check_triton_device(t: torch.Tensor, name: str) -> None:
    """The Triton ops run on GPU tensors, and on CPU tensors only in the Triton interpreter."""
    if t.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError(
            f"{name} is on the CPU: the Triton ops run on CPU tensors only in the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
