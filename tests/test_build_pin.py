"""The wheel's torch pin (build_tools/torch_pin.py) and the import-time torch check (alignops/_torch_check.py).

The end-to-end check, a real wheel imported under torch 2.13.0+cpu, is .ci/wheel_pin.sh; these pin the wording
and the version arithmetic without a build.
"""

import importlib.util
import pathlib

import pytest

from alignops import _torch_check

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _torch_pin_module():
    spec = importlib.util.spec_from_file_location("torch_pin", _ROOT / "build_tools" / "torch_pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "version, pin",
    [
        ("2.14.1+cu130", "torch==2.14.*"),
        ("2.13.0+cpu", "torch==2.13.*"),
        ("2.10.0", "torch==2.10.*"),
        ("3.0.0a0+git1234", "torch==3.0.*"),
    ],
)
def test_torch_minor_pin(version, pin):
    assert _torch_pin_module().torch_minor_pin(version) == pin


def test_provider_pins_the_build_torch_and_keeps_numpy():
    import torch

    major, minor = torch.__version__.split(".")[:2]
    assert _torch_pin_module().dynamic_metadata("dependencies", {}) == [f"torch=={major}.{minor}.*", "numpy"]


def test_provider_refuses_other_fields():
    with pytest.raises(RuntimeError, match="provides 'dependencies', not 'version'"):
        _torch_pin_module().dynamic_metadata("version", {})


def test_same_minor_other_patch_and_local_build_is_accepted():
    assert _torch_check.mismatch_message("2.14.1+cu130", False, "2.14.0+cpu", None, None) is None
    assert _torch_check.mismatch_message("2.14.1+cu130", True, "2.14.2+cu128", "12.8", None) is None


def test_other_minor_is_one_sentence_naming_both_and_the_rebuild():
    message = _torch_check.mismatch_message("2.14.1+cu130", False, "2.13.0+cpu", None, None)
    assert message == (
        "alignops was built against torch 2.14.1+cu130 but torch 2.13.0+cpu is running: install torch==2.14.* or "
        "rebuild it against this torch with "
        "`pip install --no-build-isolation --force-reinstall --no-deps <alignops source tree>`."
    )


def test_rebuild_hint_names_the_source_tree_only_when_it_exists(tmp_path):
    assert "<alignops source tree>" in _torch_check.rebuild_hint(str(tmp_path))
    (tmp_path / "pyproject.toml").write_text("")
    assert _torch_check.rebuild_hint(str(tmp_path)).endswith(f"--no-deps {tmp_path}`")


def test_cuda_extension_under_cpu_only_torch_is_refused():
    message = _torch_check.mismatch_message("2.14.1+cu130", True, "2.14.1+cpu", None, None)
    assert message.startswith(
        "alignops was built with CUDA kernels against torch 2.14.1+cu130 but the running torch "
        "2.14.1+cpu is a CPU-only build"
    )


def test_load_failure_keeps_the_loader_error_first():
    message = _torch_check.load_failure_message(ImportError("_C.so: undefined symbol: _ZN3c10x"))
    assert message.startswith("_C.so: undefined symbol: _ZN3c10x; alignops' compiled extension could not be loaded")
    assert "--no-build-isolation --force-reinstall --no-deps" in message
