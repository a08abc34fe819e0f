"""The check that alignops' compiled extension matches the running torch, made before ``_C`` is loaded.

``_C`` links libtorch's C++ ABI, which changes between torch minor versions: under another torch its load
fails with an undefined symbol, or succeeds and misbehaves. CMake records the torch it compiled against in
``alignops/_build_info.py``; this module compares that with ``torch.__version__``, words one sentence, and
only then loads ``_C`` (``alignops/__init__.py`` imports it from here), appending the same advice to any
loader error.
"""

from __future__ import annotations

import importlib
import os

import torch


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def rebuild_hint(source_dir: str | None) -> str:
    """How to rebuild against the running torch; names the source tree when it is on this machine."""
    if source_dir and os.path.isfile(os.path.join(source_dir, "pyproject.toml")):
        where = source_dir
    else:
        where = "<alignops source tree>"
    return f"rebuild it against this torch with `pip install --no-build-isolation --force-reinstall --no-deps {where}`"


def mismatch_message(
    built_version: str, built_with_cuda: bool, running_version: str, running_cuda: str | None, source_dir: str | None
) -> str | None:
    """One sentence when the extension built against ``built_version`` cannot load under ``running_version``.

    Versions are torch's (``"2.14.1+cu130"``); they must agree on major.minor (the ABI), and an extension
    with CUDA kernels needs a CUDA build of torch (``running_cuda`` is ``torch.version.cuda``). None when
    they match.
    """
    if _minor(built_version) != _minor(running_version):
        major, minor = _minor(built_version)
        return (
            f"alignops was built against torch {built_version} but torch {running_version} is running: "
            f"install torch=={major}.{minor}.* or {rebuild_hint(source_dir)}."
        )
    if built_with_cuda and not running_cuda:
        return (
            f"alignops was built with CUDA kernels against torch {built_version} but the running torch "
            f"{running_version} is a CPU-only build: install a CUDA build of torch or {rebuild_hint(source_dir)}."
        )
    return None


def check_build() -> None:
    """Raise ImportError with one sentence when ``_build_info`` names another torch than the running one.

    An editable install made before ``_build_info.py`` existed has none: then only the wrapped ``_C`` load
    in ``__init__`` reports a mismatch.
    """
    try:
        from . import _build_info
    except ImportError:
        return
    message = mismatch_message(
        _build_info.TORCH_VERSION, _build_info.WITH_CUDA, torch.__version__, torch.version.cuda, _build_info.SOURCE_DIR
    )
    if message is not None:
        raise ImportError(message)


def load_failure_message(error: BaseException) -> str:
    """The loader's own error followed by the build's torch, the running torch and the rebuild sentence."""
    try:
        from . import _build_info

        built, source_dir = f"torch {_build_info.TORCH_VERSION}", _build_info.SOURCE_DIR
    except ImportError:
        built, source_dir = "an unrecorded torch", None
    return (
        f"{error}; alignops' compiled extension could not be loaded: it was built against {built} and torch "
        f"{torch.__version__} is running, so {rebuild_hint(source_dir)}."
    )


def _load_extension():
    check_build()
    try:
        return importlib.import_module(f"{__package__}._C")
    except (ImportError, OSError) as error:
        raise ImportError(load_failure_message(error)) from error


_C = _load_extension()
