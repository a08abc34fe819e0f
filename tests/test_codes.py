"""One source for the integer codes: the C++ enums (read through alignops::codes), the Triton kernels' constexpr
globals and the reference's name tuples all agree with python/alignops/_codes.py, names and values."""

import pathlib
import re

import pytest
import torch

from alignops import _codes
from alignops.reference import policy as ref_policy
from alignops.reference import preference as ref_preference
from alignops.reference import skip as ref_skip

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _upper_snake(cpp_name: str) -> str:
    """The C++ enumerator (without its k) in the spelling of the Python enum: SigmoidNorm -> SIGMOID_NORM."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name).upper()


@pytest.mark.parametrize("family", sorted(_codes.FAMILIES))
def test_cpp_enum_is_the_python_enum(family):
    names, values = torch.ops.alignops.codes(family)
    cpp = [(_upper_snake(n), v) for n, v in zip(names, values)]
    python = [(code.name, int(code)) for code in _codes.FAMILIES[family]]
    assert cpp == python


def test_unknown_family_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="family must be one of loss_type, .* got 'loss_types'"):
        torch.ops.alignops.codes("loss_types")


def test_upper_snake():
    assert [_upper_snake(n) for n in ("Sigmoid", "SigmoidNorm", "JsDivergence", "GeluTanh")] == [
        "SIGMOID",
        "SIGMOID_NORM",
        "JS_DIVERGENCE",
        "GELU_TANH",
    ]


def test_reference_names_are_the_enum_names():
    """The reference spells codes by name; its tuples list the enums' members in code order."""
    assert ref_preference.F_DIVERGENCES == tuple(map(_codes.lower_name, _codes.FDivergence))
    assert ref_skip.ACTIVATIONS == tuple(map(_codes.lower_name, _codes.Activation))
    assert ref_skip.CRITERIA == tuple(map(_codes.lower_name, _codes.Criterion))
    assert ref_policy.LOSS_TYPES == tuple(map(_codes.lower_name, _codes.PolicyLossType))
    assert ("token", "sequence") == tuple(map(_codes.lower_name, _codes.ImportanceSamplingLevel))


@pytest.mark.parametrize(
    "module, enums, names",
    [
        (
            "preference",
            (_codes.LossType, _codes.FDivergence),
            [c.name for c in _codes.LossType] + ["FORWARD_KL", "JS_DIVERGENCE", "ALPHA_DIVERGENCE"],
        ),
        ("skip", (_codes.Activation, _codes.Criterion), ["SWIGLU", "GELU", "COSINE"]),
        ("distillation", (_codes.DistillationMode,), ["FORWARD_KL", "REVERSE_KL", "JSD", "TV", "SKEW_KL"]),
        (
            "policy",
            (_codes.PolicyLossType, _codes.RowStat),
            [c.name for c in _codes.RowStat if c.name != "NUM_ROW_STATS"],
        ),
    ],
)
def test_triton_constants_are_the_enum(module, enums, names):
    pytest.importorskip("triton", reason="needs the triton package")
    import triton.language as tl

    kernels = __import__(f"alignops.kernels.{module}", fromlist=["_"])
    members = {code.name: int(code) for enum in enums for code in enum}
    for name in names:
        constant = getattr(kernels, name)
        assert isinstance(constant, tl.constexpr), name  # the compiler rejects plain module globals
        assert constant.value == members[name], name


def test_no_kernel_compares_a_code_with_a_literal():
    """Branches on a code name the enum member, so a renumbering cannot leave a kernel behind."""
    literal = re.compile(r"\b(CODE|ACTIVATION|CRITERION|F_DIVERGENCE|MODE)\s*[=!]=\s*\d")
    hits = [
        f"{path.name}:{i}"
        for path in sorted(KERNELS.glob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert hits == []


def test_no_kernel_stores_a_row_stat_at_a_literal_column():
    """policy_loss's row_stats columns are RowStat's members in the kernels too."""
    text = (KERNELS / "policy.py").read_text()
    assert re.search(r"tl\.store\(out \+ \d", text) is None
    assert text.count("tl.store(out + ") == len(_codes.RowStat) - 1  # every column but the count
