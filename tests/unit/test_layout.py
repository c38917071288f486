"""
The package's layout shows its architecture (docs/architecture.md): no
module imports another that imports it back, lazily (inside a function)
or not; imports flow only downward through the layers, api -> driver ->
layers -> store / backends -> archive -> model / errors; and no module is
longer than a reader can hold in their head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "txgraph"

#: The longest module allowed, in lines.
MAX_LINES = 800

#: The layers, top first: a module may import only from its own layer or
#: those below it.  The first matching prefix decides a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "entry points and tools",
        (
            "txgraph.tap",
            "txgraph.twisted",
            "txgraph.admin",
            "txgraph.statedir",
            "txgraph.testing",
            "txgraph.gc",
            "txgraph.systemd",
        ),
    ),
    ("api", ("txgraph.api",)),
    ("driver", ("txgraph.driver", "txgraph.snapshotter", "txgraph.filters")),
    ("layers", ("txgraph.layers",)),
    (
        "store and backends",
        ("txgraph.store", "txgraph.snapshotstore", "txgraph.backends", "txgraph.mounts", "txgraph.thin", "txgraph.engine"),
    ),
    ("archive", ("txgraph.archive",)),
    ("model and errors", ("txgraph.model", "txgraph.errors", "txgraph.faults", "txgraph")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """
    The txgraph modules that C{path} imports anywhere in it (at the top,
    in functions, under C{TYPE_CHECKING}).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from txgraph.layers import operations" imports a module;
            # "from txgraph.backends import LayerInfo" imports a name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return rank
    raise AssertionError(f"{module} is in no layer of test_layout.LAYERS")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """
    One import cycle of C{graph}, or None.
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    """
    No two modules import each other, directly or through others, at the
    top or lazily in a function.
    """
    assert _cycle(_graph()) is None


def test_lazy_imports_and_cycles_are_seen(tmp_path: Path) -> None:
    """
    The checks see an import inside a function, and find a cycle.
    """
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from txgraph.statedir import open_driver\n")
    assert _imports(path, "txgraph.mod", set(_modules())) == {"txgraph.statedir"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_flow_downward() -> None:
    """
    Every import goes to the module's own layer or one below it.
    """
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target) < _layer(module)
    ]
    assert upward == []


def test_backend_contract_imports_no_backend() -> None:
    """
    The backend contract does not import its implementations; start-up
    finds them through txgraph.backends.catalog.
    """
    graph = _graph()
    assert not {t for t in graph["txgraph.backends"] if t.startswith("txgraph.backends.")}


def test_daemon_does_not_import_the_admin_command_line() -> None:
    """
    The daemon serves the admin socket without importing the admin
    command line (or anything only the command line needs).
    """
    graph = _graph()
    seen: set[str] = set()
    todo = ["txgraph.tap"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert not seen & {
        "txgraph.admin.cli",
        "txgraph.admin.client",
        "txgraph.admin.make_thin",
        "txgraph.engine",
    }


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_short(name: str) -> None:
    """
    No module is longer than MAX_LINES.
    """
    path = _modules()[name]
    lines = len(path.read_text().splitlines())
    relative = str(path.relative_to(PACKAGE.parent))
    assert lines <= MAX_LINES, f"{relative} has {lines} lines (at most {MAX_LINES})"
