"""Where the reference sits in the package (CONTRIBUTING.md, docs/api-style.md §7): it is the spec, the test oracle
and the ``backend="torch"`` implementation, so it depends on nothing of the production layers; ops/ and kernels/
never import it, and the public modules call only its public names (never a ``_private`` helper)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "alignops"
# The leaf modules the reference may share with production: the integer codes, the error type, the counter hash
# (each a mirror of a C++ definition, checked against it in tests/test_codes.py and tests/test_metrics.py).
LEAVES = {"alignops._codes", "alignops._errors", "alignops._counter_hash"}


def _module_of(path: pathlib.Path) -> list[str]:
    """The dotted package of a source file: kernels/ ships as alignops.kernels."""
    if path.is_relative_to(ROOT / "kernels"):
        return ["alignops", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]
    return ["alignops", *path.relative_to(PKG).with_suffix("").parts]


def _imports(path: pathlib.Path):
    """(module, {alias: imported name}) of every import of ``path``, relative ones resolved."""
    package = _module_of(path)[:-1]  # a module's package; for an __init__.py, the package itself
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, {}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            yield module, {a.asname or a.name: a.name for a in node.names}


def _production_files():
    return [p for p in sorted(PKG.rglob("*.py")) if "reference" not in p.relative_to(PKG).parts] + sorted(
        (ROOT / "kernels").glob("*.py")
    )


def _is_reference(module: str) -> bool:
    return module == "alignops.reference" or module.startswith("alignops.reference.")


def test_the_reference_is_a_leaf():
    bad = []
    for path in sorted((PKG / "reference").glob("*.py")):
        for module, _ in _imports(path):
            if module.startswith("alignops") and not _is_reference(module) and module not in LEAVES:
                bad.append(f"{path.name}: {module}")
    assert not bad, f"the reference imports production code: {bad}"


@pytest.mark.parametrize("layer", ["ops", "kernels"])
def test_ops_and_kernels_never_import_the_reference(layer):
    folder = PKG / "ops" if layer == "ops" else ROOT / "kernels"
    bad = [
        f"{path.name}: {module}"
        for path in sorted(folder.glob("*.py"))
        for module, _ in _imports(path)
        if _is_reference(module)
    ]
    assert not bad, bad


def test_public_modules_use_only_public_reference_names():
    bad = []
    for path in _production_files():
        aliases = set()  # names bound to a reference module in this file
        for module, asnames in _imports(path):
            if module == "alignops":
                aliases |= {alias for alias, name in asnames.items() if name == "reference"}
            elif _is_reference(module):
                for alias, name in asnames.items():
                    if name.startswith("_"):
                        bad.append(f"{path.relative_to(ROOT)}: imports {module}.{name}")
                    if module == "alignops.reference":  # `from .reference import ot as _ref`: a module
                        aliases.add(alias)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, f"production code reaches into the reference's private names: {bad}"


def test_the_walk_sees_the_reference_users():
    """The checks above read the files they mean to: the public modules that serve backend="torch"."""
    users = {
        path.relative_to(PKG).as_posix()
        for path in _production_files()
        if any(_is_reference(m) for m, _ in _imports(path))
    }
    assert {"preference.py", "ot/solver.py", "ctc.py", "policy.py"} <= users, users
