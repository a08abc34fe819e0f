"""How the ops are registered, the same on every supported torch (.ci/torch_compat.sh runs this file under
torch 2.13 as well as the main CI's 2.14): the native schemas are those written in csrc/ (each once, in the file of
its op's CPU kernel), every Triton op has
its native twin's schema (ints are ``int``, never ``SymInt``: before torch 2.14 ``triton_op`` ignores
``schema=``, see alignops/ops/_registration.py), opcheck passes, and torch.compile traces into an op defined by
``register_triton_op`` whichever path defined it."""

import pathlib
import re

import pytest
import torch

import alignops
from alignops.ops import _registration

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
# The files that define schemas: the library (csrc/registration.cpp) and the families' CPU files; csrc/stable/ is
# the separately built stable-ABI baseline of the benchmarks, not part of alignops._C.
SOURCES = sorted(p for p in CSRC.rglob("*.cpp") if "stable" not in p.parts)
_LITERALS = r'(?:"(?:[^"\\]|\\.)*"\s*)+'  # adjacent C string literals
# A schema is a literal, or a constant of a family's <family>_schemas.h (the ops a second library registers too).
_DEF = re.compile(rf"(m\.def\(|def_checked\(\s*m,)\s*({_LITERALS}|schemas::k\w+)")
_CONSTANT = re.compile(rf"constexpr char (k\w+)\[\] =\s*({_LITERALS});")
triton_only = pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package")


def _native_schemas() -> dict[str, torch._C.FunctionSchema]:
    """name -> schema of every ``m.def("...")`` and ``def_checked(m, "...")`` in csrc/ (adjacent C literals
    joined; ``def_checked(m, schemas::kName)`` reads the constant of a ``*_schemas.h``)."""
    return {name: schema for name, (schema, _) in _defs().items()}


def _defs_by_file() -> list[tuple[pathlib.Path, str, torch._C.FunctionSchema, bool]]:
    """(file, name, schema, defined by def_checked) of every definition in csrc/, in file order."""
    constants = {
        m.group(1): m.group(2) for header in CSRC.rglob("*_schemas.h") for m in _CONSTANT.finditer(header.read_text())
    }
    out = []
    for path in SOURCES:
        for call in _DEF.finditer(path.read_text()):
            text = call.group(2)
            if text.startswith("schemas::"):
                text = constants[text.removeprefix("schemas::")]
            schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', text))
            parsed = torch._C.parse_schema("alignops::" + schema)
            out.append((path, parsed.name.split("::")[1], parsed, call.group(1).startswith("def_checked")))
    return out


def _defs() -> dict[str, tuple[torch._C.FunctionSchema, bool]]:
    """name -> (schema, defined by def_checked) over csrc/."""
    return {name: (schema, checked) for _, name, schema, checked in _defs_by_file()}


def _registered(name: str) -> torch._C.FunctionSchema:
    return getattr(torch.ops.alignops, name).default._schema


def _signature(schema: torch._C.FunctionSchema) -> str:
    """The schema without the op's name."""
    return str(schema).split("(", 1)[1]


def _alignops_ops() -> list[str]:
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("alignops::"))


def test_native_schemas_are_the_ones_in_csrc():
    native = _native_schemas()
    assert len(native) >= 25
    for name, schema in native.items():
        assert _registered(name) == schema, name


def test_each_schema_is_written_once_next_to_its_cpu_kernel():
    """An op is defined once, in the file that registers its CPU (or any-device) kernel, so the schema, the checks
    and the kernel of an op are read in one file; csrc/registration.cpp keeps only the build's cuda_archs()."""
    seen = {}
    for path, name, _, _ in _defs_by_file():
        assert name not in seen, f"{name} is defined in {seen[name]} and in {path}"
        seen[name] = path
        if path.name == "registration.cpp":
            assert name == "cuda_archs", f"{name}: define it in the file of its CPU kernel, not in {path}"
        else:
            assert re.search(rf'm\.impl\(\s*"{name}"', path.read_text()), (
                f"{path} defines {name} but registers no kernel for it"
            )


def test_checked_ops_have_a_check_op_with_their_arguments():
    """def_checked(m, "op(args) -> ret") also defines op_check(args) -> () (the checks as an op), implemented in C++
    for every device (CompositeImplicitAutograd)."""
    checked = [name for name, (_, is_checked) in _defs().items() if is_checked]
    assert len(checked) >= 22, checked
    for name in checked:
        check = _registered(name + "_check")
        native = _registered(name)
        assert [a.name for a in check.arguments] == [a.name for a in native.arguments], name
        assert [str(a.type) for a in check.arguments] == [str(a.type) for a in native.arguments], name
        assert len(check.returns) == 0, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"alignops::{name}_check", "CompositeImplicitAutograd"), (
            name
        )


def test_check_op_runs_the_native_checks_on_meta_tensors():
    """The check op reads no data: meta tensors get the native op's messages, and good ones pass."""
    logits = torch.empty(4, 10, device="meta")
    context = torch.empty(4, 2, dtype=torch.int64, device="meta")
    torch.ops.alignops.kgw_logits_check(logits, context, 1, 0.25, 2.0)
    with pytest.raises(ValueError, match=r"gamma \(the green fraction\) must be in \[0, 1\], got 1.5"):
        torch.ops.alignops.kgw_logits_check(logits, context, 1, 1.5, 2.0)
    with pytest.raises(ValueError, match=r"context must have one row per row of logits \[B = 4\]"):
        torch.ops.alignops.kgw_logits_check(logits, context[:3], 1, 0.25, 2.0)
    with pytest.raises(ValueError, match=r"gamma \(the green fraction\) must be in \[0, 1\], got 1.5"):
        torch.ops.alignops.kgw_logits(torch.zeros(4, 10), torch.zeros(4, 2, dtype=torch.int64), 1, 1.5, 2.0)


@triton_only
def test_every_triton_op_has_its_native_twins_schema():
    triton_ops = [n for n in _alignops_ops() if "_triton" in n]
    # A floor, not a count: every family added since brings its twin (a drop means one was lost).
    assert len(triton_ops) >= 21, triton_ops
    native = _native_schemas()
    for name in triton_ops:
        twin = name.replace("_triton", "")
        assert twin in native, f"{name} has no native twin in csrc/"
        assert _signature(_registered(name)) == _signature(native[twin]), name


def test_no_op_takes_symint():
    """Python-defined ops (Triton ops, skip_ffn_backward) spell their schemas out: an inferred one would turn
    every int into a SymInt."""
    for name in _alignops_ops():
        assert "SymInt" not in str(_registered(name)), name


# In the interpreter the Triton kernels run on real tensors only: the fake-tensor and AOT-dispatch checks of
# opcheck need a GPU (see tests/test_ctc_posteriors_triton.py).
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if not torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton_only
def test_opcheck_triton_ops():
    logits = torch.randn(5, 37, device=DEVICE, requires_grad=True)
    targets = torch.tensor([3, 0, 36, -100, 7], device=DEVICE)
    torch.library.opcheck(
        torch.ops.alignops.selective_logprobs_triton.default, (logits, targets, -100, 0.7), test_utils=OPCHECK_UTILS
    )
    pc, pr, rc, rr = (torch.randn(6, device=DEVICE, dtype=torch.float64) for _ in range(4))
    torch.library.opcheck(
        torch.ops.alignops.preference_loss_triton.default,
        (pc.requires_grad_(), pr, rc, rr, None, None, None, [0, 2], [1.0, 0.5], 0.1, 0.0, 0.5, 0.05, 0, 0.5, True),
        test_utils=OPCHECK_UTILS,
    )
    context = torch.randint(0, 50, (3, 2), device=DEVICE)
    torch.library.opcheck(
        torch.ops.alignops.kgw_logits_triton.default,
        (torch.randn(3, 50, device=DEVICE), context, 12345, 0.25, 2.0),
        test_utils=OPCHECK_UTILS,
    )


# ---- register_triton_op on both of its paths ------------------------------------------------------------

_TOY_SCHEMA = "(Tensor x, int n, float scale) -> Tensor"


def _toy(x: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    # A body of torch ops only: tracing into it is then visible on the CPU, where the interpreter cannot run
    # a kernel on fake tensors.
    return x * scale + n


@pytest.fixture(scope="module")
def toy_ops():
    """alignops_test::toy_<path>, defined once per process by each path of register_triton_op."""
    ops = {}
    takes = _registration._TRITON_OP_TAKES_SCHEMA
    for path, flag in (("own", takes), ("replaced", False)):
        _registration._TRITON_OP_TAKES_SCHEMA = flag
        try:
            ops[path] = _registration.register_triton_op(f"alignops_test::toy_{path}", _TOY_SCHEMA)(_toy)
        finally:
            _registration._TRITON_OP_TAKES_SCHEMA = takes
    return {path: getattr(torch.ops.alignops_test, f"toy_{path}").default for path in ops}


def test_triton_op_ignores_schema_before_2_14():
    """Why register_triton_op exists: torch.library.triton_op itself infers SymInt before torch 2.14."""
    torch.library.triton_op("alignops_test::toy_plain", _toy, mutates_args=(), schema=_TOY_SCHEMA)
    plain = str(torch.ops.alignops_test.toy_plain.default._schema)
    assert ("SymInt n" in plain) == (not _registration._TRITON_OP_TAKES_SCHEMA), (torch.__version__, plain)


@pytest.mark.parametrize("path", ["own", "replaced"])
def test_register_triton_op_gives_the_schema(toy_ops, path):
    op = toy_ops[path]
    assert _signature(op._schema) == _TOY_SCHEMA.lstrip("(")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(op(x, 2, 0.5), x * 0.5 + 2)
    torch.library.opcheck(op, (x.detach(), 2, 0.5))


@pytest.mark.parametrize("path", ["own", "replaced"])
def test_compile_traces_into_register_triton_op(toy_ops, path):
    """Under torch.compile the op is decomposed into its body (as triton_op does), not kept opaque."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    op = toy_ops[path]
    torch._dynamo.reset()
    fn = torch.compile(lambda x: op(x, 3, 2.0).sum(), backend=aot_autograd(fw_compiler=keep), fullgraph=True)
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), (x * 2.0 + 3).sum())
    code = graphs[0].code
    assert "alignops_test" not in code and "aten.mul" in code, code
