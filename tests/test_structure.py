"""The shape of the house (issue #13): no reach into another module's private names,
and rooms small enough to read (import cycles: ``tests/unit/test_layout.py``).

Everything here is computed from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The source trees checked: the core package and each plugin's ``src/``.
SOURCE_ROOTS = [ROOT, *sorted((ROOT / "plugins").glob("*/src"))]
PACKAGES = ["qmlkit", "qmlkit_postgres", "qmlkit_redis"]

MAX_FILE_LINES = 500  #: lines per source file
MAX_FUNCTION_LINES = 60  #: lines per function body, docstring excluded
#: Functions that are data tables (one statement per table or column), exempt.
DATA_TABLES = {("qmlkit/storage/sql/schema.py", "build_metadata")}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the checked packages."""
    found: dict[str, Path] = {}
    for base in SOURCE_ROOTS:
        for package in PACKAGES:
            top = base / package
            if not top.is_dir():
                continue
            for path in top.rglob("*.py"):
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _imports(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every import in the file, at any depth
    (``TYPE_CHECKING`` blocks and function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", node.level, name, is_package)
            yield target, [alias.name for alias in node.names], node.lineno


def test_structure_sees_the_packages():
    assert "qmlkit" in MODULES and "qmlkit.job" in MODULES
    assert any(name.startswith("qmlkit_postgres") for name in MODULES)


def test_no_module_imports_another_modules_private_name():
    offences = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            if target == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            dotted = [part for part in target.split(".") if part.startswith("_")
                      and not part.startswith("__")]
            if private or dotted:
                offences.append(f"{path.relative_to(ROOT)}:{line}: {target} {private}")
    assert offences == []


def _source_files() -> list[Path]:
    return sorted(MODULES.values())


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_file_is_at_most_500_lines(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def _is_data_table(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function whose body is a docstring and one ``return`` of a literal table."""
    body = [s for s in node.body if not (isinstance(s, ast.Expr)
                                         and isinstance(s.value, ast.Constant))]
    return (len(body) == 1 and isinstance(body[0], ast.Return)
            and isinstance(body[0].value, (ast.List, ast.Tuple, ast.Dict, ast.Set)))


def test_no_function_over_60_lines():
    long = []
    for path in _source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                body = body[1:]
            where = (str(path.relative_to(ROOT)), node.name)
            if not body or _is_data_table(node) or where in DATA_TABLES:
                continue
            lines = (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []
