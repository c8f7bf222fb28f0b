"""Distribution names and packaging hygiene (issue #15 item 1).

The name ``qmlkit`` on the public package index belongs to an unrelated project: the
core distribution is ``qmlkit-core``, and nothing here may depend on a bare ``qmlkit``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECTS = sorted(p for p in ROOT.rglob("pyproject.toml")
                    if not {".venv", "node_modules", "site"} & set(p.relative_to(ROOT).parts)
                    and "peers" not in p.relative_to(ROOT).parts)


def requirements(data: dict) -> list[str]:
    project = data.get("project", {})
    found = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        found += extra
    found += data.get("build-system", {}).get("requires", [])
    return found


def test_the_core_distribution_is_qmlkit_core() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["name"] == "qmlkit-core"


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pyproject_depends_on_a_bare_qmlkit(pyproject: Path) -> None:
    data = tomllib.loads(pyproject.read_text())
    names = {re.sub(r"[-_.]+", "-", Requirement(r).name.lower()) for r in requirements(data)}
    assert "qmlkit" not in names, pyproject


@pytest.mark.parametrize("plugin", ["qmlkit-postgres", "qmlkit-redis"])
def test_plugins_depend_on_qmlkit_core_in_a_compatible_range(plugin: str) -> None:
    data = tomllib.loads((ROOT / "plugins" / plugin / "pyproject.toml").read_text())
    (core,) = [Requirement(r) for r in data["project"]["dependencies"]
               if Requirement(r).name == "qmlkit-core"]
    assert "0.1.0" in core.specifier and "0.2.0" not in core.specifier


def test_postgres_depends_on_psycopg_with_the_binary_wheel_as_an_extra() -> None:
    data = tomllib.loads((ROOT / "plugins/qmlkit-postgres/pyproject.toml").read_text())
    deps = [Requirement(r) for r in data["project"]["dependencies"]]
    assert [d.extras for d in deps if d.name == "psycopg"] == [set()]
    binary = [Requirement(r) for r in data["project"]["optional-dependencies"]["binary"]]
    assert [(d.name, d.extras) for d in binary] == [("psycopg", {"binary"})]


@pytest.mark.parametrize("package", ["qmlkit", "plugins/qmlkit-postgres/src/qmlkit_postgres",
                                     "plugins/qmlkit-redis/src/qmlkit_redis"])
def test_every_package_has_a_py_typed_marker(package: str) -> None:
    assert (ROOT / package / "py.typed").is_file()


def test_every_core_dependency_is_imported_somewhere() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Used by a library rather than imported: kombu imports redis (and, undeclared by
    # kombu 5.7, packaging) for redis:// wake-ups.
    indirect = {"redis", "packaging"}
    sources = "\n".join(p.read_text() for p in (ROOT / "qmlkit").rglob("*.py"))
    for requirement in data["project"]["dependencies"]:
        name = Requirement(requirement).name.lower()
        if name in indirect:
            continue
        module = name.replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), name
