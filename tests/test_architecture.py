"""The package's layers (docs/architecture.md): each module imports only from its own layer or
the ones before it, no import cycles, and no module imports its package's __init__."""
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


#: the layers, lowest first: a module may import from its own layer and the ones before it
LAYERS = ["attngen.core", "attngen.generate", "attngen.runtime", "attngen.integrations",
          "attngen.bench", "attngen.cli", "attngen.emulator", "attngen.testing"]
#: modules outside the layers: the package's entry points, which re-export the public API
ENTRY_POINTS = {"attngen", "attngen.__main__", "attngen.distributed", "attngen.flash_attn",
                "attngen.flash_attn.cute", "attngen.flash_attn_interface"}


def _layer(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + "."))


def test_every_module_is_in_a_layer():
    loose = [n for n in MODULES if n not in ENTRY_POINTS and not any(
        n == layer or n.startswith(layer + ".") for layer in LAYERS)]
    assert not loose, f"modules in no layer (add them to LAYERS and docs/architecture.md): {loose}"


def test_no_module_imports_a_later_layer():
    upward = [(name, target) for name, targets in GRAPH.items() if name not in ENTRY_POINTS
              for target in targets if target not in ENTRY_POINTS and _layer(target) > _layer(name)]
    assert not upward, upward


def test_the_layer_order_is_enforced():
    """The check above fails on an upward import (a core module importing the registry)."""
    graph = {**GRAPH, "attngen.core.mask": [*GRAPH["attngen.core.mask"], "attngen.runtime.registry"]}
    upward = [(n, t) for n, ts in graph.items() if n not in ENTRY_POINTS
              for t in ts if t not in ENTRY_POINTS and _layer(t) > _layer(n)]
    assert ("attngen.core.mask", "attngen.runtime.registry") in upward


def test_value_types_know_nothing_of_files_or_templates():
    for name in ("attngen.core.mask", "attngen.core.support", "attngen.core.tuning", "attngen.core.variant"):
        assert not {n for n in GRAPH[name] if not n.startswith("attngen.core")}, (name, GRAPH[name])
