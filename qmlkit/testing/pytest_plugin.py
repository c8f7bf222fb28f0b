"""qmlkit's pytest plugin: isolated apps and ``drain`` for the tests of your jobs.

Registered through the ``pytest11`` entry point (``qmlkit = "qmlkit.testing.pytest_plugin"``
in qmlkit-core's pyproject), so installing qmlkit-core makes the fixtures available; opt
out with ``-p no:qmlkit``. Importing this module loads nothing of qmlkit: the fixtures
import it when a test asks for them. The model is Celery's ``celery_app`` /
``celery_worker`` fixtures and Dramatiq's ``stub_broker`` + ``Worker.join()``.

Fixtures:

- ``qmlkit_app``: a fresh ``App`` on ``memory://`` (no entry-point plugins loaded),
  closed after the test. Register jobs on it inside the test or a fixture.
- ``qmlkit_sqlite_app``: the same on a new SQLite file under ``tmp_path``.
- ``qmlkit_app_factory``: ``make(name="test", storage="memory://", **App options)``
  builds more apps, each closed after the test; ``storage="sqlite"`` means a new file
  under ``tmp_path``.
- ``qmlkit_drain``: `qmlkit.testing.drain.drain` (``drain(app, timeout=30.0, ...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from qmlkit.client import App
    from qmlkit.testing.drain import DrainResult

__all__ = ["qmlkit_app", "qmlkit_app_factory", "qmlkit_drain", "qmlkit_sqlite_app"]


@pytest.fixture
def qmlkit_app_factory(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """Yield ``make(name="test", storage="memory://", **options) -> App``.

    ``storage="sqlite"`` is a new SQLite file under ``tmp_path`` (one per call); any other
    string is a storage URL. ``options`` are ``App`` keyword arguments (``inline=True``,
    ``plugins=[...]``, ``wakeup_url``...); ``autoload`` defaults to ``False`` so the
    test sees only the plugins it names. Every app made is closed after the test.
    """
    from qmlkit.client import App

    made: list[App] = []

    def make(name: str = "test", storage: str = "memory://", **options: Any) -> App:
        if storage == "sqlite":
            storage = f"sqlite:///{tmp_path / f'qmlkit-{len(made)}.db'}"
        options.setdefault("autoload", False)
        app = App(name, storage=storage, **options)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


@pytest.fixture
def qmlkit_app(qmlkit_app_factory: Callable[..., App]) -> App:
    """A fresh ``App("test")`` on ``memory://``, closed after the test."""
    return qmlkit_app_factory()


@pytest.fixture
def qmlkit_sqlite_app(qmlkit_app_factory: Callable[..., App]) -> App:
    """A fresh ``App("test")`` on a new SQLite file under ``tmp_path``, closed after."""
    return qmlkit_app_factory(storage="sqlite")


@pytest.fixture
def qmlkit_drain() -> Callable[..., DrainResult]:
    """`qmlkit.testing.drain.drain`: ``drain(app, timeout=30.0, ...) -> DrainResult``."""
    from qmlkit.testing.drain import drain

    return drain
