"""The structure docs/architecture.md promises, checked on the source tree.

* every op type has all its pieces in its op module (schema, spec section, export, fake-quant,
  engine builder, cost) and a golden function, and its spec section exists;
* layers import only what they may; no module imports another module's ``_private`` name; the
  import graph, function-level imports included, has no cycle (so no import inside a function
  exists only to break one); ``sys.path`` is edited only in tests/conftest.py;
* the ViT / Swin decision lives only in the architecture registry (calib/archs.py);
* ``compile_stats`` covers every module that holds Numba kernels;
* the installed wheel holds no top-level ``program`` or ``training`` package.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from intsim import ops
from intsim.kernels import KERNEL_MODULES
from intsim.ops.base import EngineOp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("calib", "reference", "intsim", "training")
SPEC = (REPO / "docs" / "integer-spec.md").read_text()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, imported names, inside a function?, line) of every project import."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] in PACKAGES:
                        out.append((a.name, [], f, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg.split(".")
                    base = base[:len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] in PACKAGES:
                    names = [a.name for a in child.names]
                    # "from pkg import submodule" imports the submodule
                    subs = [n for n in names if f"{mod}.{n}" in MODULES]
                    for s in subs:
                        out.append((f"{mod}.{s}", [], f, child.lineno))
                    rest = [n for n in names if n not in subs]
                    if rest or not subs:
                        out.append((mod, rest, f, child.lineno))
            visit(child, f)

    visit(tree, False)
    return out


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _owner(mod: str) -> str:
    """The module an import refers to (a package's ``__init__`` or a module)."""
    while mod and mod not in MODULES:
        mod = mod.rsplit(".", 1)[0] if "." in mod else ""
    return mod


# ---- the operator registry --------------------------------------------------------------------

@pytest.mark.parametrize("op_type", sorted(ops.MODULES))
def test_every_op_module_holds_every_piece(op_type):
    m = ops.get(op_type)
    assert m.NAME == op_type
    for piece in ("SPEC", "INPUTS", "ATTRS", "TENSORS", "FLOAT", "ENGINE", "cost", "scratch_bits",
                  "export", "check_bounds", "fq_forward", "lower_onnx"):
        assert hasattr(m, piece), f"intsim/ops/{op_type}.py lacks {piece}"
    assert issubclass(m.ENGINE, EngineOp)
    # its spec section exists and names the op
    assert re.search(rf"^#+ {re.escape(m.SPEC)} `{op_type}`", SPEC, re.M), f"no spec section {m.SPEC} `{op_type}`"
    for dtype, shape in list(m.TENSORS.values()) + list(m.FLOAT.values()):
        assert dtype in ("int8", "int16", "int32", "int64", "float32", "float64")
        assert all(s in ops.base.SHAPE_SYMBOLS or s == "Q+1" for s in shape), shape
    # and the golden model, the spec's independent transcription, executes it
    import reference.golden as golden
    assert op_type in golden.OPS, f"reference/golden.py has no function for {op_type}"


def test_unknown_op_type_is_a_program_error():
    from intsim.program.program import ProgramError
    with pytest.raises(ProgramError, match="unknown op type 'conv'"):
        ops.get("conv")


# ---- layers and imports -----------------------------------------------------------------------

# Each layer (module prefix) and the project layers it may import (docs/architecture.md).
ALLOWED = {
    "intsim.program": ("intsim.program", "intsim.ops"),
    "intsim.kernels": ("intsim.kernels", "intsim.program.program"),
    "intsim.ops": ("intsim.ops", "intsim.kernels", "intsim.program"),
    "intsim.engine": ("intsim.engine", "intsim.ops", "intsim.kernels", "intsim.program"),
    "reference.golden": ("intsim.program.program",),
    "reference": ("reference", "intsim.program", "intsim.ops"),
    "calib": ("calib", "intsim.program", "intsim.ops", "reference"),
    "intsim.models": ("intsim.models", "intsim.errors", "intsim.data"),
}


def _layer(mod: str) -> str | None:
    best = None
    for prefix in ALLOWED:
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def test_layers_import_only_what_they_may():
    bad = []
    for name, imps in IMPORTS.items():
        layer = _layer(name)
        if layer is None:
            continue
        for mod, _, _, line in imps:
            if not any(mod == a or mod.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{MODULES[name].relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = []
    for name, imps in IMPORTS.items():
        for mod, names, _, line in imps:
            if _owner(mod) == name:
                continue
            for n in names:
                if n.startswith("_") and not (n.startswith("__") and n.endswith("__")):
                    bad.append(f"{MODULES[name].relative_to(REPO)}:{line} imports {mod}.{n}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_not_even_through_function_level_imports():
    graph: dict[str, set[str]] = {n: set() for n in MODULES}
    for name, imps in IMPORTS.items():
        for mod, _, _, _ in imps:
            tgt = _owner(mod)
            if tgt and tgt != name:
                graph[name].add(tgt)
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    import sys
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in graph:
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    assert not cycles, cycles


def test_golden_is_independent_of_the_implementations():
    imps = [m for m, _, _, _ in IMPORTS["reference.golden"]]
    assert all(m.startswith("intsim.program") for m in imps), imps


def test_sys_path_is_edited_only_in_the_tests_conftest():
    bad = [str(p.relative_to(REPO)) for p in MODULES.values() if "sys.path" in p.read_text()]
    assert not bad, bad


def test_the_architecture_decision_lives_only_in_the_registry():
    pat = re.compile(r"is_swin|arch == \"swin\"|arch == 'swin'")
    hits = [str(p.relative_to(REPO)) for n, p in MODULES.items()
            if n != "calib.archs" and pat.search(p.read_text())]
    assert not hits, hits


def test_compile_stats_covers_every_kernel_module():
    with_kernels = {n for n, p in MODULES.items() if n.startswith("intsim.") and "@njit" in p.read_text()}
    covered = {m.__name__ for m in KERNEL_MODULES}
    assert with_kernels == covered, (with_kernels, covered)


def test_the_wheel_has_no_generic_top_level_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {p.rstrip("*").rstrip(".") for p in include}
    assert tops == {"calib", "reference", "intsim"}, tops
    assert not (REPO / "program" / "__init__.py").exists()
