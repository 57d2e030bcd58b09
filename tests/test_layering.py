"""The package's import graph: no cycles, and every import goes down the layering (docs/architecture.md).

Every ``import`` of every module under ``src/orthotune`` counts, also those inside functions; relative
imports are resolved. Imports under ``if TYPE_CHECKING:`` never run, so they are checked against the
layering but take no part in cycles (a module may name a type of its own part in an annotation).
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import orthotune

#: The parts, lowest first: a module may import its own part and the parts of lower rank, nothing else.
#: A part is a subpackage of ``orthotune`` (or a module at its top level); ``__init__`` is the public API.
RANKS: dict[str, int] = {
    "version": 0,
    "ops": 1,
    "methods": 2,
    "layer": 3,
    "model": 4,
    "interop": 5,
    "training": 5,
    "__init__": 6,
    "recipes": 7,
    "cli": 8,
    "__main__": 9,
}


@dataclass(frozen=True)
class Import:
    """One imported module, where it is imported and how."""

    source: str
    target: str
    path: str
    line: int
    type_only: bool
    in_function: bool

    def where(self) -> str:
        how = " (type-only)" if self.type_only else " (inside a function)" if self.in_function else ""
        return f"{self.path}:{self.line}: {self.source} imports {self.target}{how}"


def package_modules(root: Path, package: str = "orthotune") -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """(node, under TYPE_CHECKING, inside a function) for every import statement of a module."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool, bool]] = []

    def visit(node: ast.AST, type_only: bool, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, type_only, in_function))
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.body:
                visit(child, True, in_function)
            for child in node.orelse:
                visit(child, type_only, in_function)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only, inner)

    visit(tree, False, False)
    return found


def imports(root: Path, package: str = "orthotune") -> list[Import]:
    """Every import of a module of ``package`` by a module of ``package``."""
    modules = package_modules(root, package)
    out = []
    for source, path in modules.items():
        here = source if path.name == "__init__.py" else source.rpartition(".")[0]
        rel = str(path.relative_to(root))
        for node, type_only, in_function in _import_nodes(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = here.split(".")
                    if node.level - 1 >= len(base_parts):
                        raise AssertionError(f"{rel}:{node.lineno}: relative import goes above the package")
                    base = ".".join(base_parts[: len(base_parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from a import b`: the module a.b when there is one, else the module a
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target == package or target.startswith(package + "."):
                    if target not in modules:
                        raise AssertionError(f"{rel}:{node.lineno}: {source} imports {target}, which does not exist")
                    out.append(Import(source, target, rel, node.lineno, type_only, in_function))
    return out


def part(module: str, package: str = "orthotune") -> str:
    """The part a module belongs to: its subpackage, its own name at the top level, or ``__init__`` for the root."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def layering_errors(found: list[Import], ranks: dict[str, int]) -> list[str]:
    """Imports of a part by a part that is not above it (siblings of one rank may not import each other)."""
    errors = []
    for imp in found:
        src, dst = part(imp.source), part(imp.target)
        if src == dst:
            continue
        if src not in ranks or dst not in ranks:
            unknown = src if src not in ranks else dst
            errors.append(f"{imp.where()}: {unknown!r} is in no layer; give it a rank in RANKS (tests/test_layering.py)")
        elif ranks[dst] >= ranks[src]:
            errors.append(f"{imp.where()}: {src} (rank {ranks[src]}) may not import {dst} (rank {ranks[dst]})")
    return errors


def cycles(found: list[Import]) -> list[list[Import]]:
    """Import cycles between modules, as the imports around each: per group of modules that reach each other
    (strongly connected component), the shortest cycle through each of its modules, without repeats."""
    graph: dict[str, list[Import]] = {}
    for imp in found:
        if not imp.type_only and imp.source != imp.target:
            graph.setdefault(imp.source, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in graph.get(node, []):
            if imp.target not in index:
                connect(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    found_cycles: dict[tuple[Import, ...], None] = {}
    for component in components:
        for start in sorted(component):
            cycle = _shortest_cycle(graph, component, start)
            turn = cycle.index(min(cycle, key=lambda imp: imp.source))  # one spelling per cycle
            found_cycles.setdefault(tuple(cycle[turn:] + cycle[:turn]), None)
    return [list(c) for c in found_cycles]


def _shortest_cycle(graph: dict[str, list[Import]], component: set[str], start: str) -> list[Import]:
    """The shortest cycle through ``start`` inside its component (breadth-first)."""
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for imp in graph.get(node, []):
                if imp.target == start:
                    return [*paths[node], imp]
                if imp.target in component and imp.target not in paths:
                    paths[imp.target] = [*paths[node], imp]
                    nxt.append(imp.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - every module of a component has one


def describe(cycle: list[Import]) -> str:
    names = " -> ".join([cycle[0].source, *(imp.target for imp in cycle)])
    return f"import cycle {names}:\n" + "\n".join(f"    {imp.where()}" for imp in cycle)


SRC = Path(orthotune.__file__).resolve().parent.parent


def test_no_import_cycles() -> None:
    found = cycles(imports(SRC))
    assert not found, f"{len(found)} import cycle(s); break each by moving code down a layer:\n" + "\n".join(map(describe, found))


def test_imports_go_down_the_layers() -> None:
    errors = layering_errors(imports(SRC), RANKS)
    assert not errors, f"{len(errors)} import(s) against the layering (docs/architecture.md):\n" + "\n".join(errors)


def test_the_package_is_imported_at_module_level() -> None:
    """An import of the package inside a function hides a dependency (often one that dodges a cycle); only the
    public API imports lazily (``orthotune.OrthoTrainer``, which would import transformers). A heavy third-party
    library is imported inside the function that needs it, not the orthotune module that wraps it."""
    late = [imp.where() for imp in imports(SRC) if imp.in_function and imp.source != "orthotune"]
    assert not late, "import these at the top of their module:\n" + "\n".join(late)


def test_the_checks_catch_cycles_and_upward_imports(tmp_path: Path) -> None:
    """On a small package: a cycle through a function-level import, an upward import, a type-only cycle."""
    files = {
        "pkg/__init__.py": "from .model import core\n",
        "pkg/ops/__init__.py": "",
        "pkg/ops/math.py": "def f():\n    from ..model import core\n",
        "pkg/model/__init__.py": "",
        "pkg/model/core.py": "from ..ops import math\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .io import X\n",
        "pkg/model/io.py": "from . import core\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    found = imports(tmp_path, "pkg")
    assert {(i.source, i.target, i.in_function, i.type_only) for i in found} == {
        ("pkg", "pkg.model.core", False, False),
        ("pkg.ops.math", "pkg.model.core", True, False),
        ("pkg.model.core", "pkg.ops.math", False, False),
        ("pkg.model.core", "pkg.model.io", False, True),
        ("pkg.model.io", "pkg.model.core", False, False),
    }
    assert [describe(c).splitlines()[0] for c in cycles(found)] == ["import cycle pkg.model.core -> pkg.ops.math -> pkg.model.core:"]
    errors = layering_errors(found, {"ops": 0, "model": 1, "__init__": 2})
    assert errors == ["pkg/ops/math.py:2: pkg.ops.math imports pkg.model.core (inside a function): ops (rank 0) may not import model (rank 1)"]
