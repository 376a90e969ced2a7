"""The floor plan, checked: which folder of ``llamascope_sdk`` may import which, no import cycle
between modules (imports inside functions count; ``if TYPE_CHECKING:`` ones do not), no library
module importing another of the package inside a function, and no function longer than 80
lines (signature and body, not counting its docstring) unless its docstring gives the
(measured) reason.

The order below is the README's package map, lowest first: a module may import its own folder
and the folders before it, never one after it. The package root (``__init__``, ``__main__``)
sits above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llamascope_sdk"
LAYERS = ["base", "corpus", "core", "loading", "steering", "training", "mining", "store",
          "evaluation", "explain", "trace", "benchmark", "serve", "cli"]
MAX_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every runtime import of the package."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.startswith("llamascope_sdk"):
                    for alias in child.names:  # `from pkg import submodule` imports the submodule
                        sub = f"{module}.{alias.name}"
                        target = sub if _exists(sub) else module
                        found.append((target, inner, child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((a.name, inner, child.lineno) for a in child.names
                             if a.name.startswith("llamascope_sdk"))
            visit(child, inner)

    visit(tree, False)
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.parent / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"__main__"}:
        return len(LAYERS)  # the package root is the top
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_module_sits_in_a_listed_folder() -> None:
    stray = [m for m in MODULES if _layer(m) < 0]
    assert not stray, f"modules outside the folders of the plan: {stray}"


def test_no_folder_imports_a_folder_above_it() -> None:
    upward = [f"{m}:{line} imports {t}" for m, deps in GRAPH.items() for t, _, line in deps
              if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_library_code_imports_the_package_at_module_level_only() -> None:
    """The CLI is exempt: its commands import their library lazily so that `llamascope --help`
    and argument errors answer without loading torch (bench/bench_cli.py measures it)."""
    hidden = [f"{m}:{line} imports {t} inside a function" for m, deps in GRAPH.items()
              for t, inner, line in deps if inner and _layer(m) < LAYERS.index("cli")]
    assert not hidden, "\n".join(hidden)


def _cycles() -> list[list[str]]:
    edges = {m: sorted({t for t, _, _ in deps if t in MODULES and t != m})
             for m, deps in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


def _long_functions() -> list[str]:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                first = node.body[0]
                if doc and isinstance(first, ast.Expr):  # the docstring is prose, not code
                    length -= (first.end_lineno or first.lineno) - first.lineno + 1
                if length > MAX_LINES and "measured" not in doc.lower():
                    long.append(f"{name}.{node.name}: {length} lines")
    return long


def test_no_function_longer_than_80_lines_without_a_measured_reason() -> None:
    assert _long_functions() == []


@pytest.mark.parametrize("layers", [LAYERS])
def test_the_readme_draws_the_same_plan(layers: list[str]) -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("<!-- package-map -->")[1]
    drawn = [line.split()[0].rstrip("/") for line in block.strip().splitlines()[1:-1]
             if line.strip() and not line[0].isspace()]
    assert drawn == layers
