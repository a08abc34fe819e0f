"""scikit-build-core metadata provider: pins the wheel to the torch minor version it is built against.

alignops' extension links libtorch's C++ ABI, which changes between torch minor versions, so a wheel
built against torch X.Y requires ``torch==X.Y.*`` (any patch release and any local build such as
``+cpu`` or ``+cu130``). The torch read here is the one CMake compiles against: both run in the build
interpreter.
"""

from __future__ import annotations

import importlib.metadata
import site
import sys

_BASE_DEPENDENCIES = ["numpy"]


def _installed_torch_outside_build_env() -> str | None:
    # pip's build isolation keeps sys.prefix but drops its site-packages from sys.path; looking there
    # names the torch the user has, so the refusal can say which one the build would have used.
    for dist in importlib.metadata.distributions(path=site.getsitepackages()):
        if dist.metadata["Name"] == "torch":
            return dist.version
    return None


def torch_minor_pin(version: str) -> str:
    """``"2.14.1+cu130"`` -> ``"torch==2.14.*"``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def dynamic_metadata(field: str, settings: dict) -> list[str]:
    if field != "dependencies":
        raise RuntimeError(f"build_tools/torch_pin.py provides 'dependencies', not {field!r}")
    if settings:
        raise RuntimeError(f"build_tools/torch_pin.py takes no settings, got {sorted(settings)}")
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        installed = _installed_torch_outside_build_env()
        hidden = f"the installed torch {installed}" if installed else "any installed torch"
        sys.exit(
            f"alignops: torch is not importable in this build environment (build isolation hides {hidden}, and "
            "alignops must be compiled against the torch it will run with): install torch first, then build with "
            "`pip install --no-build-isolation .` (or `pip wheel --no-build-isolation .`)."
        )
    return [torch_minor_pin(version), *_BASE_DEPENDENCIES]
