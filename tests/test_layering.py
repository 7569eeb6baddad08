"""Import layering of the medsim package, read from the source (``ast``; nothing is imported).

Every ``import`` / ``from ... import`` of a medsim module counts, wherever it is (module level or inside a function),
except under ``if TYPE_CHECKING:``. ``from medsim.pkg import name`` counts as importing ``medsim.pkg.name`` when that
is a submodule, else ``medsim.pkg``.

* **No cycles.** Importing ``medsim.a.b`` also runs ``medsim/a/__init__.py``, so it counts as importing ``medsim.a``
  too, except from inside ``medsim.a`` itself (a package's ``__init__`` importing its submodules, or submodules
  importing each other, do not import the package back: it is already being initialised). An explicit
  ``from medsim.a import x`` of a name defined in the ``__init__`` does count.
* **No upward imports.** Each module belongs to a stage (STAGES, lowest first); it may import only modules of its own
  or a lower stage. Within a package (same stage) submodules may import each other, as long as there is no cycle.
* **Every module has a stage.** A new module must be added to STAGES (that is the point: decide where it belongs).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

PACKAGE = "medsim"
SOURCE = ROOT / PACKAGE

# Stage of each module (a package's entry covers all its submodules, the longest matching entry wins).
ROOT_PACKAGE = "medsim"  # its __init__ (the version) imports nothing from medsim: below every stage
STAGES: dict[str, int] = {
    "medsim.errors": 0, "medsim.files": 0, "medsim.templates": 0,
    "medsim.dicom": 1, "medsim.preprocess": 1, "medsim.phash": 1,
    "medsim.ingest": 2, "medsim.dicomweb": 2,
    "medsim.model": 3,
    "medsim.index": 4, "medsim.operating_point": 4, "medsim.feedback": 4, "medsim.vectors": 4,
    "medsim.build": 5, "medsim.watch": 5, "medsim.search": 5, "medsim.duplicates": 5, "medsim.baselines": 5,
    "medsim.build_ray": 5, "medsim.explain": 5, "medsim.cohort": 5,
    "medsim.evaluate": 6, "medsim.evaluate.calibrate": 6, "medsim.train": 6,
    "medsim.server": 7, "medsim.orthanc": 7,
    "medsim.cli": 8, "medsim.stack": 8, "medsim.__main__": 8,
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int
    implicit: bool = False  # the package whose __init__ runs because a submodule of it was imported

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        how = " (its package __init__)" if self.implicit else ""
        return f"{self.where()}: {self.importer} -> {self.imported}{how}"


def _modules() -> dict[str, Path]:
    """medsim's modules (dotted name -> file); a package is its __init__.py."""
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _explicit_imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, path, node.lineno) for alias in node.names if _ours(alias.name)]
            continue
        base = node.module or ""
        if node.level:  # relative: resolve against the importer's package
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        if not _ours(base):
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.append(Import(name, sub if sub in modules else base, path, node.lineno))
    return found


def _graph() -> tuple[dict[str, Path], list[Import]]:
    """All modules and all import edges between them (explicit, plus the implicit package __init__ edges)."""
    modules = _modules()
    edges: list[Import] = []
    for name, path in modules.items():
        for imp in _explicit_imports(name, path, modules):
            if imp.imported == PACKAGE and PACKAGE not in modules:
                continue  # `import medsim` of the namespace package runs no code
            edges.append(imp)
            parts = imp.imported.split(".")
            for i in range(len(parts) - 1, 0, -1):
                parent = ".".join(parts[:i])
                if parent not in modules:
                    continue
                if name == parent or name.startswith(parent + "."):
                    break  # inside that package: it is already initialised, and so are its parents
                edges.append(Import(name, parent, path, imp.line, implicit=True))
    return modules, list(dict.fromkeys(edges))  # one edge per import statement and target


def _stage(module: str) -> int | None:
    if module == ROOT_PACKAGE:
        return 0
    keys = [k for k in STAGES if module == k or module.startswith(k + ".")]
    return STAGES[max(keys, key=len)] if keys else None


def _cycles(edges: list[Import]) -> list[list[Import]]:
    """One shortest cycle per strongly connected component (Tarjan, then BFS inside the component)."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for e in edges:
        if e.importer != e.imported:
            graph[e.importer].setdefault(e.imported, e)  # first import statement of that pair
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # recursion depth is bounded by the module count
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(set(graph) | {e.imported for e in edges}):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        previous: dict[str, Import] = {}
        queue = [start]
        while queue:  # BFS from start back to start, inside the component
            v = queue.pop(0)
            for w, e in sorted(graph[v].items()):
                if w not in component or w in previous:
                    continue
                previous[w] = e
                if w == start:
                    queue = []
                    break
                queue.append(w)
        chain, node = [], start
        while True:
            e = previous[node]
            chain.append(e)
            node = e.importer
            if node == start:
                break
        cycles.append(chain[::-1])
    return cycles


def test_every_module_has_a_stage():
    modules, edges = _graph()
    unknown = sorted(m for m in modules if _stage(m) is None)
    missing = sorted({str(e) for e in edges if e.imported not in modules})
    problems = []
    if unknown:
        problems.append("modules without a stage (add them to STAGES in tests/test_layering.py, at the lowest "
                        "stage whose modules they need):\n  " + "\n  ".join(f"{m} ({modules[m].relative_to(ROOT)})"
                                                                            for m in unknown))
    if missing:
        problems.append("imports of medsim modules that do not exist:\n  " + "\n  ".join(missing))
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    _, edges = _graph()
    cycles = _cycles(edges)
    text = "\n".join(
        f"cycle {' -> '.join([c[0].importer] + [e.imported for e in c])}:\n    " + "\n    ".join(map(str, c))
        for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) among medsim's modules:\n{text}"


def test_no_upward_imports():
    modules, edges = _graph()
    upward = []
    for e in edges:
        low, high = _stage(e.importer), _stage(e.imported)
        if low is not None and high is not None and high > low:
            upward.append(f"{e.where()}: {e.importer} (stage {low}) -> {e.imported} (stage {high})"
                          + (" (its package __init__)" if e.implicit else ""))
    assert not upward, ("imports of a higher stage (a module may import only its own or lower stages; see STAGES in "
                        "tests/test_layering.py):\n  " + "\n  ".join(sorted(set(upward))))


def test_the_checker_sees_function_level_and_submodule_imports(tmp_path):
    """The walker itself: imports inside functions, `from pkg import submodule`, relative imports, TYPE_CHECKING."""
    source = tmp_path / "medsim" / "model"
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("from medsim.model import bundle\n")
    (source / "bundle.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medsim import cli\n"
        "def f():\n    from . import network\n    import medsim.errors\n")
    modules = {"medsim.model": source / "__init__.py", "medsim.model.bundle": source / "bundle.py",
               "medsim.model.network": source / "network.py", "medsim.errors": tmp_path / "errors.py"}
    found = lambda name: {(e.imported, e.line) for e in _explicit_imports(name, modules[name], modules)}  # noqa: E731
    assert found("medsim.model") == {("medsim.model.bundle", 1)}
    assert found("medsim.model.bundle") == {("medsim.model.network", 5), ("medsim.errors", 6)}
    a, b = (Import("medsim.x", "medsim.y", source / "bundle.py", 1), Import("medsim.y", "medsim.x",
                                                                             source / "bundle.py", 2))
    (cycle,) = _cycles([a, b])
    assert {e.importer for e in cycle} == {"medsim.x", "medsim.y"}
    assert _stage("medsim.model.embedder") == 3 and _stage("medsim.evaluate.calibrate") == 6
    assert _stage("medsim.nothing") is None
