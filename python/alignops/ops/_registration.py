"""``register_fake(name)``: ``torch.library.register_fake`` whose fake kernel first checks that the op's tensors
share one device (a meta tensor among CPU tensors dispatches to the fake kernel).

``register_triton_op(name, schema)``: ``torch.library.triton_op`` with the given schema on every torch that
alignops supports (torch >= 2.6), so that each Triton op has the schema of its native twin (defined in the C++
file of its CPU kernel, csrc/<family>/<op>_cpu.cpp).

``register_triton_twin(native)``: ``register_triton_op(native + "_triton", native_schema(native))`` — the Triton
op of a native op takes its schema from the native op's registration, so a schema is written once (in C++) —
whose body first calls ``check_op(native)``, the native op's own argument checks (``alignops::<op>_check``,
defined next to the op by ``def_checked`` (csrc/common/registration.h) and implemented by the C++ function the CPU
kernel calls), so a check is written once too, with one message, whichever backend serves the call.

A family's twins live in its ops module (``ops/<fam>.py``) with its fakes and autograd, and each twin's body
imports its launcher (``from ..kernels.<fam> import launch_...``) when it runs: the kernels import triton, an
optional dependency, and ``import alignops`` must work without it. Defining a Triton op needs no triton, so the
twins are registered always; without triton, ``_backend.resolve`` refuses ``backend="triton"`` with a message.

``triton_op(..., schema=...)`` hands the schema on to ``custom_op`` from torch 2.14 on. Before, it infers the
schema from the function's annotations whatever it is given: an ``int`` argument becomes ``SymInt``, so the
same op would be registered differently on torch 2.11-2.13 than on 2.14 (and differently from its native twin).
On those versions the schema inference inside ``triton_op`` is replaced by the given schema for the one call;
everything else stays ``triton_op``'s own: the fake kernel that runs the body, the decomposition into the body
under functionalization (so torch.compile traces into the kernels), export's handling of the op.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable

import torch
import torch._library.triton as _triton_library
from torch.library import triton_op

from .._checks import check_same_device
from .._errors import AlignopsError

# torch 2.14 is the first release whose triton_op uses schema=; a dev build of 2.14 takes the other path,
# which gives the same registration.
_TRITON_OP_TAKES_SCHEMA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


class _NoTritonWarning(logging.Filter):
    """Drops the warning that ``triton_op`` logs when it looks for the body's kernels without triton installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Triton not available")


@contextlib.contextmanager
def _quiet_without_triton():
    """Without triton, ``triton_op`` logs "Triton not available" (torch/_library/triton.py, looking for the body's
    kernels) for every op it defines; the op is defined all the same, so the warning is dropped for these calls
    (it would be one line per twin at ``import alignops``)."""
    logger, quiet = logging.getLogger(_triton_library.__name__), _NoTritonWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def register_triton_op(name: str, schema: str, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: define ``name`` (``"alignops::op"``) with ``schema`` (``"(Tensor x, int n) -> Tensor"``), its
    implementation the decorated function, as ``torch.library.triton_op`` does."""

    def define(fn: Callable):
        if _TRITON_OP_TAKES_SCHEMA:
            with _quiet_without_triton():
                return triton_op(name, fn, mutates_args=mutates_args, schema=schema)
        inferred = _triton_library.infer_schema
        _triton_library.infer_schema = lambda *args, **kwargs: schema
        try:
            with _quiet_without_triton():
                return triton_op(name, fn, mutates_args=mutates_args)
        finally:
            _triton_library.infer_schema = inferred

    return define


def native_schema(name: str) -> str:
    """The schema of the registered op ``name`` (``"alignops::op"``) without its name:
    ``"(Tensor x, ...) -> Tensor"``."""
    namespace, op = name.split("::")
    schema = str(getattr(getattr(torch.ops, namespace), op).default._schema)
    return schema[schema.index("(") :]


def check_op(native: str) -> torch._ops.OpOverload:
    """``alignops::<op>_check``: the argument checks of the native op ``native`` (``"alignops::op"``) as an op
    with its arguments that returns nothing. It reads sizes, dtypes and devices, never data, so it runs on any
    device and on fake (also symbolic-shaped) tensors; torch.compile runs it while tracing."""
    return _related_op(native, "_check")


def _related_op(native: str, suffix: str) -> torch._ops.OpOverload:
    """The op ``<native><suffix>`` (``"alignops::op"`` + ``"_check"`` -> ``alignops::op_check``)."""
    namespace, op = native.split("::")
    return getattr(getattr(torch.ops, namespace), op + suffix).default


def run_checks(native: str, *args, **kwargs) -> None:
    """Run ``check_op(native)`` on the op's arguments; the plain ValueError of the C++ checks
    (TORCH_CHECK_VALUE) is re-raised as AlignopsError, the error of the public API, with the same message."""
    _run(check_op(native), args, kwargs)


def _run(check: torch._ops.OpOverload, args: tuple, kwargs: dict) -> None:
    try:
        check(*args, **kwargs)
    except ValueError as e:
        raise AlignopsError(str(e)) from None


def register_triton_twin(native: str, mutates_args: Iterable[str] = (), name: str | None = None) -> Callable:
    """Decorator: the decorated function is ``<native>_triton`` (or ``name``), a Triton op with the schema of the
    native op ``native`` (``"alignops::op"``, defined in csrc/<family>/<op>_cpu.cpp), called after the native op's
    argument checks (``check_op(native)``): the body checks only what is the Triton backend's own (the device)."""
    check = check_op(native)  # resolved once, at import (and fails there if the native op has no check op)

    def define(fn: Callable):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            _run(check, args, kwargs)
            return fn(*args, **kwargs)

        return register_triton_op(name or native + "_triton", native_schema(native), mutates_args)(checked)

    return define


def register_fake(name: str) -> Callable:
    """Decorator: the decorated function is the fake kernel of ``name`` (``"alignops::op"``), run after a check
    that every tensor argument is on one device; the message names the argument by its schema name.

    The dispatcher picks the Meta kernel, which is the fake kernel, whenever any argument is a meta tensor, so
    without the check ``op(cpu_tensor, meta_tensor)`` would return uninitialised memory without an error."""
    namespace, op = name.split("::")
    arg_names = [a.name for a in getattr(getattr(torch.ops, namespace), op).default._schema.arguments]

    def define(fn: Callable):
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            check_same_device([*zip(arg_names, args), *kwargs.items()])
            return fn(*args, **kwargs)

        torch.library.register_fake(name, fake)
        return fn

    return define


def run_value_checks(native: str, *args, **kwargs) -> None:
    """Run ``alignops::<op>_check_values``, the checks of the native op ``native`` that read tensor values (lengths,
    ids in range; ATen reductions and a host sync, so on any device): the C++ CPU kernel calls the same function, and
    Python calls this for the other backends. ValueError is re-raised as AlignopsError."""
    _run(_related_op(native, "_check_values"), args, kwargs)


def run_op_checks(check: torch._ops.OpOverload, *args, **kwargs) -> None:
    """Run the check op ``check`` (one that returns nothing or raises); ValueError is re-raised as AlignopsError."""
    _run(check, args, kwargs)
