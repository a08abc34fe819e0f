"""Loads the stable-ABI build of preference_loss (csrc/stable/preference_stable.cpp) into the running torch.

``alignops_stable::preference_loss`` / ``selective_logprobs`` / ``selective_logprobs_backward`` have the schemas
of their ``alignops::`` twins (csrc/preference/preference_schemas.h). This module gives them the fake kernels
(torch.compile, opcheck) and autograd of the native ops, python/alignops/ops/preference_autograd.py, which it
imports without alignops's build where the running torch has none (torch 2.13 in .ci/stable_abi.sh).

Used by tests/test_stable_abi.py and bench/stable_abi_overhead.py; see docs/stable-abi.md.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Where .ci/stable_abi.sh writes the .so; ALIGNOPS_STABLE_SO overrides it.
DEFAULT_SO = ROOT / "build" / "stable_abi" / "_alignops_stable.so"

_loaded = False


def so_path() -> Path:
    return Path(os.environ.get("ALIGNOPS_STABLE_SO", DEFAULT_SO))


def alignops_module(name: str):
    """``alignops.<...>`` module ``name``; where alignops has no build for the running torch (2.13 in
    .ci/stable_abi.sh), without running alignops/__init__.py (which loads the compiled _C): the packages on the way
    are then empty modules with the source folders as their paths. For the modules that import only torch and
    other such modules (alignops.ops.preference_autograd, alignops.reference.preference, alignops._codes)."""
    try:
        import alignops  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        path = ROOT / "python"
        parts = name.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            path = path / parts[depth - 1]
            package = types.ModuleType(".".join(parts[:depth]))
            package.__path__ = [str(path)]
            sys.modules.setdefault(package.__name__, package)
    return importlib.import_module(name)


def register_python_layer(ns: str) -> None:
    """The fake kernels and autograd of python/alignops/ops/preference_autograd.py (the native ops' own) on the three
    ops of library ``ns`` (``alignops_stable``, or in bench/stable_abi_overhead.py the native baseline ``alignops``
    built for a torch without alignops, so both carry the same Python layer)."""
    layer = alignops_module("alignops.ops.preference_autograd")
    torch.library.register_fake(f"{ns}::preference_loss", layer.preference_loss_fake)
    torch.library.register_autograd(
        f"{ns}::preference_loss", layer.preference_loss_backward, setup_context=layer.preference_loss_setup
    )
    torch.library.register_fake(f"{ns}::selective_logprobs", layer.selective_logprobs_fake)
    torch.library.register_fake(f"{ns}::selective_logprobs_backward", layer.selective_logprobs_backward_fake)
    backward_op = getattr(torch.ops, ns).selective_logprobs_backward
    torch.library.register_autograd(
        f"{ns}::selective_logprobs",
        layer.selective_logprobs_backward_for(backward_op),
        setup_context=layer.selective_logprobs_setup,
    )


def load(path: str | os.PathLike | None = None):
    """Loads the .so once (torch.ops.load_library), registers fakes + autograd; returns the preference_loss op
    (``torch.ops.alignops_stable.selective_logprobs`` is registered too)."""
    global _loaded
    if not _loaded:
        p = Path(path) if path is not None else so_path()
        if not p.exists():
            raise FileNotFoundError(f"{p} is not built: run .ci/stable_abi.sh (or its build step)")
        torch.ops.load_library(str(p))
        register_python_layer("alignops_stable")
        _loaded = True
    return torch.ops.alignops_stable.preference_loss
