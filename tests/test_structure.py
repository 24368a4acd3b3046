"""The package's import structure, from the source (no import needed): no import cycle between
agentlit's modules, and no module reading another's private names.

Every ``import`` / ``from … import`` counts, at module level or inside a function (a deferred import
is still a dependency). A private name is one with a leading underscore: a private attribute
(``from x import _y``, ``x._y``) belongs to its module alone; a private module (``models/_helpers.py``)
to the package that holds it.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agentlit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _owner_of_private_module(name: str) -> str | None:
    """The package a private module belongs to (``agentlit.models`` for ``agentlit.models._helpers``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            return ".".join(parts[:i])
    return None


def _imports(module: str, path: Path) -> list[tuple[str, str | None, str, int]]:
    """(module imported from, name imported or None, the local name it is bound to, line) for every
    agentlit import of ``module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _target(module, path, node)
            if target.split(".")[0] == "agentlit":
                found += [(target, a.name, a.asname or a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None, a.asname or a.name.split(".")[0], node.lineno)
                      for a in node.names if a.name.split(".")[0] == "agentlit"]
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, name, _, _ in _imports(module, path):
            sub = f"{target}.{name}" if name else None
            graph[module].add(sub if sub in MODULES else target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _private_uses() -> list[str]:
    uses = []
    for module, path in MODULES.items():
        aliases: dict[str, str] = {}
        for target, name, bound, line in _imports(module, path):
            full = f"{target}.{name}" if name else target
            for imported in {target, full} & (set(MODULES) | {target}):
                owner = _owner_of_private_module(imported)
                if owner is not None and not (module == owner or module.startswith(owner + ".")):
                    uses.append(f"{module}:{line} imports the private module {imported}")
            if name and full not in MODULES and _private(name) and target != module:
                uses.append(f"{module}:{line} imports {target}.{name}")
            if name is None:  # import a.b (binds a) / import a.b as c (binds a.b)
                aliases[bound] = target if bound != target.split(".")[0] else bound
            elif full in MODULES:
                aliases[bound] = full
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                owner = ".".join([aliases[value.id], *reversed(chain)])
                if owner in MODULES and owner != module:
                    uses.append(f"{module}:{node.lineno} reads {owner}.{node.attr}")
    return sorted(set(uses))


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "agentlit.cli" in graph and "agentlit.tasks.base" in graph
    assert "agentlit.checkpoint" in graph["agentlit.export"]  # from .checkpoint import …
    assert "agentlit.tasks.networks" in graph["agentlit.tasks.classification"]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_reads_another_modules_private_names():
    assert _private_uses() == []
