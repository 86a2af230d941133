"""The package's layers: no import cycles, and no module imports its package's __init__."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attngen"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """attngen modules that ``name`` imports, at any depth of its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            submodules = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            found.update(submodules)
            if len(submodules) < len(node.names):     # names defined in ``target`` itself
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


GRAPH = {name: sorted(t for t in _imports(name, path) if t in MODULES and t != name)
         for name, path in MODULES.items()}


def test_no_module_imports_its_package_init():
    offenders = [(name, t) for name, targets in GRAPH.items() for t in targets
                 if name.startswith(t + ".") and MODULES[t].name == "__init__.py"
                 and not MODULES[name].name == "__init__.py"]
    assert not offenders, offenders


def test_no_import_cycles():
    inits = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    graph = {n: [t for t in ts if t not in inits] for n, ts in GRAPH.items() if n not in inits}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_value_types_know_nothing_of_files_or_templates():
    for name in ("attngen.core.mask", "attngen.core.support", "attngen.core.tuning", "attngen.core.variant"):
        assert not {"attngen.generate.codegen", "attngen.generate.store", "attngen.generate.build", "attngen.runtime.registry",
                    "attngen.generate.spec"} & set(GRAPH[name]), (name, GRAPH[name])
