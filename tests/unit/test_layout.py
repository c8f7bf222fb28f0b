"""The package's layout: no import cycle (TYPE_CHECKING imports included), duties never
import the server, hookspecs stay on the ground floor; and App.with_storage."""

from __future__ import annotations

import ast
from pathlib import Path

import qmlkit
from qmlkit import App

ROOT = Path(qmlkit.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ["qmlkit", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every qmlkit module ``name`` imports, wherever the import is (TYPE_CHECKING too).
    ``from pkg import x`` counts ``pkg`` as well as ``pkg.x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_no_import_cycle_among_qmlkit_modules() -> None:
    assert _cycles(_graph()) == []


def test_duties_never_import_the_server_nor_the_client() -> None:
    graph = _graph()
    duties = [m for m in graph if m.startswith("qmlkit.processing.duties")]
    assert duties
    for duty in duties:
        assert not graph[duty] & {"qmlkit.processing.server", "qmlkit.client", "qmlkit.app"}, duty


def test_the_server_never_imports_the_app() -> None:
    assert not _graph()["qmlkit.processing.server"] & {"qmlkit.client", "qmlkit.app"}


def test_hookspecs_import_only_the_ground_floor() -> None:
    ground = {"qmlkit.job", "qmlkit.errors", "qmlkit.recurring", "qmlkit.config",
              "qmlkit.protocols", "qmlkit.storage.base", "qmlkit.storage"}
    assert _graph()["qmlkit.hookspecs"] <= ground


def test_with_storage_copies_the_app_with_the_same_registry() -> None:
    app = App("shop", storage="memory://", autoload=False, wakeup_url="memory://")
    app.job(name="noop")(lambda: None)
    other = app.with_storage("memory://", options={})
    assert other.registry is app.registry
    assert other.name == "shop" and other.wakeup_url == "memory://"
    assert other.storage_spec == "memory://" and other.storage is not app.storage
    other.enqueue("noop")
    assert other.storage.count_jobs() != app.storage.count_jobs()
    quiet = app.with_storage(app.storage, wakeup_url=None, wakeup_exchange="x")
    assert quiet.wakeup_url is None and quiet.wakeup_exchange == "x"
    assert quiet.storage is app.storage
    app.close()
    other.close()
