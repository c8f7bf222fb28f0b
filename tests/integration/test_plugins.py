"""The plugin architecture: discovery through entry points, every hook, bad plugins."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from qmlkit import App, Server, hookimpl
from qmlkit.errors import (
    DuplicateStorageScheme,
    MiddlewareError,
    PluginError,
    PluginLoadError,
    UnknownStorageScheme,
)
from qmlkit.plugins import describe_plugins, make_plugin_manager, resolve_storage
from qmlkit.storage.memory import MemoryStorage
from qmlkit.testing import wait_until

EXAMPLE = Path(__file__).resolve().parents[1] / "plugin_example"
QMLKIT = [sys.executable, "-m", "qmlkit.cli"]


@pytest.fixture(scope="session")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin package, pip-installed (a real wheel build) into its own folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


@pytest.fixture
def installed(example_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Make the installed example plugin visible to this process's entry-point scan."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.delenv("QMLKIT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("QMLKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    importlib.invalidate_caches()
    yield example_site
    sys.modules.pop("qmlkit_example.plugin", None)
    sys.modules.pop("qmlkit_example", None)


def env_with(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMLKIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- discovery ---------------------------------------------------------------------------


def test_installed_plugin_is_discovered_with_its_distribution(installed: Path) -> None:
    pm = make_plugin_manager()
    found = {p["name"]: p for p in describe_plugins(pm)}
    info = found["qmlkit-example:example"]
    assert (info["distribution"], info["version"]) == ("qmlkit-example", "1.0.0")
    assert info["hooks"] == ["qmlkit_enqueue_middleware", "qmlkit_job_state_changed",
                             "qmlkit_middleware", "qmlkit_storage", "qmlkit_storage_schemes"]
    assert info["schemes"] == ["example-memory"]
    assert isinstance(resolve_storage(pm, "example-memory://", {}), MemoryStorage)


def test_plugin_disabled_by_name_is_not_loaded(installed: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert "qmlkit-example:example" not in {
        p["name"] for p in describe_plugins(make_plugin_manager(disable=["qmlkit-example"]))}
    monkeypatch.setenv("QMLKIT_DISABLE_PLUGINS", "example")
    pm = make_plugin_manager()
    assert "qmlkit-example:example" not in {p["name"] for p in describe_plugins(pm)}
    with pytest.raises(UnknownStorageScheme):
        resolve_storage(pm, "example-memory://", {})


def test_qmlkit_plugins_command_lists_plugins_schemes_and_chain(installed: Path) -> None:
    out = subprocess.run([*QMLKIT, "plugins", "--json"], env=env_with(installed),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    listing = json.loads(out)
    names = [p["name"] for p in listing["plugins"]]
    assert names[:2] == ["qmlkit.storage", "qmlkit.logging"]
    assert "qmlkit-example:example" in names
    assert {"memory", "sqlite", "example-memory"} <= set(listing["schemes"])
    assert listing["middleware"] == ["qmlkit.processing.middleware.LoggingMiddleware",
                                     "qmlkit_example.plugin.record_attempt"]
    table = subprocess.run([*QMLKIT, "plugins"], env=env_with(installed),
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "qmlkit-example" in table and "1.0.0" in table and "example-memory" in table


def test_cli_worker_runs_plugin_middleware_and_observer_end_to_end(
    installed: Path, tmp_path: Path
) -> None:
    (tmp_path / "pluginapp.py").write_text(textwrap.dedent(f"""
        from qmlkit import App
        app = App("pluginapp", storage="sqlite:///{tmp_path / 'q.db'}")

        @app.job(name="double")
        def double(x):
            return 2 * x
    """))
    for enabled in (True, False):
        log = tmp_path / f"records-{enabled}.jsonl"
        extra = {"QMLKIT_EXAMPLE_LOG": str(log), "EXAMPLE_TENANT": "acme"}
        if not enabled:
            extra["QMLKIT_DISABLE_PLUGINS"] = "qmlkit-example"
        env = env_with(installed, **extra)
        env["PYTHONPATH"] += os.pathsep + str(tmp_path)
        job_id = subprocess.run([*QMLKIT, "enqueue", "pluginapp:app", "double", "--args", "[21]"],
                                env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, check=True).stdout.strip()
        worker = subprocess.Popen([*QMLKIT, "worker", "pluginapp:app", "--polling-interval",
                                   "0.05"], env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
        try:
            app = App("check", storage=f"sqlite:///{tmp_path / 'q.db'}", autoload=False)
            wait_until(lambda app=app, job_id=job_id: app.storage.get(job_id).state.name
                       == "Succeeded", timeout=30)
            job = app.storage.get(job_id)
            app.close()
        finally:
            worker.terminate()
            worker.wait(30)
        seen = records(log)
        if enabled:
            assert job.metadata == {"tenant": "acme"}
            attempts = [r for r in seen if r["event"] == "attempt"]
            assert [(r["job_id"], r["tenant"], r["pid"]) for r in attempts] == [
                (job_id, "acme", worker.pid)]
            changes = [(r["previous"], r["current"]) for r in seen
                       if r["event"] == "state" and r["job_id"] == job_id]
            assert changes == [(None, "Enqueued"), ("Enqueued", "Processing"),
                               ("Processing", "Succeeded")]
        else:
            assert job.metadata == {} and seen == []


def test_entry_point_that_fails_to_import_names_distribution_and_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qmlkit.observers]\nbroken = no_such_module.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(PluginLoadError) as info:
        make_plugin_manager()
    assert info.value.distribution == "broken-plugin"
    assert info.value.entry_point == "qmlkit.observers:broken = no_such_module.plugin"
    assert "QMLKIT_DISABLE_PLUGINS" in str(info.value)
    assert make_plugin_manager(disable=["broken"])  # and disabling it by name works


# --- bad plugins -------------------------------------------------------------------------


class SchemePlugin:
    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    @hookimpl
    def qmlkit_storage_schemes(self) -> list[str]:
        return [self.scheme]

    @hookimpl
    def qmlkit_storage(self, url: str, options: dict[str, object]) -> MemoryStorage | None:
        return MemoryStorage(url) if url.startswith(f"{self.scheme}://") else None


def test_two_plugins_claiming_one_scheme_is_an_error_naming_both() -> None:
    first, second = SchemePlugin("dup"), SchemePlugin("dup")
    pm = make_plugin_manager(autoload=False)
    pm.register(first, name="dist-a:dup")
    pm.register(second, name="dist-b:dup")
    with pytest.raises(DuplicateStorageScheme) as info:
        resolve_storage(pm, "dup://x", {})
    assert info.value.plugins == ["dist-a:dup", "dist-b:dup"]


def test_an_installed_plugin_takes_precedence_over_a_builtin_scheme() -> None:
    class Shadow(SchemePlugin):
        @hookimpl
        def qmlkit_storage(self, url: str, options: dict[str, object]) -> MemoryStorage | None:
            store = MemoryStorage(url)
            store.shadowed = True  # type: ignore[attr-defined]
            return store

    pm = make_plugin_manager(autoload=False, extra=[Shadow("memory")])
    assert getattr(resolve_storage(pm, "memory://", {}), "shadowed", False)


def test_misspelt_hook_name_is_rejected_at_load_time() -> None:
    class Typo:
        @hookimpl
        def qmlkit_job_state_chnaged(self, job: object) -> None: ...

    with pytest.raises(PluginError, match="qmlkit_job_state_chnaged"):
        make_plugin_manager(autoload=False, extra=[Typo()])


def test_hookimpl_with_unknown_argument_is_rejected_at_load_time() -> None:
    class WrongArgs:
        @hookimpl
        def qmlkit_job_state_changed(self, job: object, bogus: object) -> None: ...

    with pytest.raises(PluginError, match="bogus"):
        make_plugin_manager(autoload=False, extra=[WrongArgs()])


def test_middleware_returning_nothing_without_call_next_fails_the_job_naming_it() -> None:
    def forgetful(job, context, call_next):
        context.job  # noqa: B018

    app = App("mw", storage="memory://", autoload=False)

    @app.job
    def work() -> int:
        return 1

    server = Server.from_plugins(app=app, storage=app.storage, autoload=False,
                                 middleware=[forgetful],
                                 config={"polling_interval": timedelta(milliseconds=20)})
    job_id = work.enqueue()
    server.start()
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Failed")
    finally:
        server.stop()
    state = app.storage.get(job_id).state
    assert state.exception_type == "qmlkit.errors.MiddlewareError"
    assert "forgetful" in state.message and "call_next" in state.message
    assert app.storage.get(job_id).attempts == 1  # not retried


# --- every hook, called in order with the right arguments ------------------------------------


class Recorder:
    """A plugin implementing every hook, recording each call."""

    def __init__(self, name: str, calls: list[tuple[str, ...]]) -> None:
        self.name = name
        self.calls = calls
        self.lock = threading.Lock()

    def _add(self, *entry: str) -> None:
        with self.lock:
            self.calls.append((self.name, *entry))

    @hookimpl
    def qmlkit_storage_schemes(self) -> list[str]:
        return [f"rec-{self.name}"]

    @hookimpl
    def qmlkit_storage(self, url: str, options: dict[str, object]) -> MemoryStorage | None:
        self._add("storage", url, json.dumps(options))
        return MemoryStorage(url) if url == f"rec-{self.name}://" else None

    @hookimpl
    def qmlkit_middleware(self, config: dict[str, object]) -> list[object]:
        self._add("middleware", str(config["server_name"]))

        def around(job, context, call_next):
            self._add("before", job.method, str(context.attempt))
            result = call_next()
            self._add("after", job.method, repr(result))
            return result

        return [around]

    @hookimpl
    def qmlkit_enqueue_middleware(self, config: dict[str, object]) -> list[object]:
        self._add("enqueue_middleware", str(config["name"]))

        def stamp(jobs, call_next):
            self._add("enqueue", *[j.method for j in jobs])
            return call_next([j.model_copy(update={"metadata": {**j.metadata, self.name: 1}})
                              for j in jobs])

        return [stamp]

    @hookimpl
    def qmlkit_job_state_changed(self, job, previous, current) -> None:
        self._add("changed", previous.name if previous else "-", current.name)

    @hookimpl
    def qmlkit_server_started(self, server: Server) -> None:
        self._add("started", server.config.server_name)

    @hookimpl
    def qmlkit_server_stopping(self, server: Server) -> None:
        self._add("stopping", server.config.server_name)


@pytest.fixture
def recorded() -> Iterator[tuple[list[tuple[str, ...]], App, Server]]:
    calls: list[tuple[str, ...]] = []
    first, second = Recorder("a", calls), Recorder("b", calls)
    app = App("hooks", storage="rec-b://", autoload=False, plugins=[first, second])

    @app.job(name="echo")
    def echo(x: int) -> int:
        return x

    server = app.server(server_name="srv", worker_count=1,
                        polling_interval=timedelta(milliseconds=20))
    yield calls, app, server
    if server.is_running:
        server.stop()


def only(calls: list[tuple[str, ...]], kind: str) -> list[tuple[str, ...]]:
    return [c for c in calls if c[1] == kind]


def test_hook_qmlkit_storage(recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    calls, app, _ = recorded
    # Most recently registered first; the first non-None answer ("b") wins.
    assert only(calls, "storage") == [("b", "storage", "rec-b://", "{}")]
    assert app.storage.url == "rec-b://"


def test_hook_qmlkit_storage_schemes(recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    _, app, _ = recorded
    from qmlkit.plugins import known_schemes

    assert {"rec-a", "rec-b", "memory", "sqlite"} <= set(known_schemes(app.plugin_manager))


def test_hook_qmlkit_middleware(recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    calls, app, server = recorded
    assert only(calls, "middleware") == [("b", "middleware", "srv"), ("a", "middleware", "srv")]
    job_id = app.enqueue("echo", args=[5])
    server.start()
    wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded")
    server.stop()
    around = [c for c in calls if c[1] in ("before", "after")]
    assert around == [("b", "before", "echo", "1"), ("a", "before", "echo", "1"),
                      ("a", "after", "echo", "5"), ("b", "after", "echo", "5")]


def test_hook_qmlkit_enqueue_middleware(
        recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    calls, app, _ = recorded
    job_id = app.enqueue("echo", args=[1])
    assert only(calls, "enqueue_middleware") == [("b", "enqueue_middleware", "hooks"),
                                                 ("a", "enqueue_middleware", "hooks")]
    assert only(calls, "enqueue") == [("b", "enqueue", "echo"), ("a", "enqueue", "echo")]
    assert app.storage.get(job_id).metadata == {"a": 1, "b": 1}


def test_hook_qmlkit_job_state_changed(recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    calls, app, server = recorded
    job_id = app.enqueue("echo", args=[2])
    server.start()
    wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded")
    server.stop()
    app.delete(job_id)
    changed = [c for c in calls if c[1] == "changed"]
    # Each change reaches both observers, in pluggy's order (most recent plugin first).
    expected = [("-", "Enqueued"), ("Enqueued", "Processing"), ("Processing", "Succeeded"),
                ("Succeeded", "Deleted")]
    assert changed == [(who, "changed", p, c) for p, c in expected for who in ("b", "a")]


def test_hook_qmlkit_server_started(recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    calls, _, server = recorded
    server.start()
    assert only(calls, "started") == [("b", "started", "srv"), ("a", "started", "srv")]
    server.stop()


def test_hook_qmlkit_server_stopping(recorded: tuple[list[tuple[str, ...]], App, Server]) -> None:
    calls, _, server = recorded
    server.start()
    server.stop()
    assert only(calls, "stopping") == [("b", "stopping", "srv"), ("a", "stopping", "srv")]
    assert calls.index(("b", "started", "srv")) < calls.index(("b", "stopping", "srv"))


def test_observer_that_raises_is_isolated(tmp_path: Path) -> None:
    seen: list[str] = []

    class Broken:
        @hookimpl
        def qmlkit_job_state_changed(self, job, previous, current) -> None:
            raise RuntimeError("observer bug")

    class Fine:
        @hookimpl
        def qmlkit_job_state_changed(self, job, previous, current) -> None:
            seen.append(current.name)

    app = App("iso", storage="memory://", autoload=False, plugins=[Fine(), Broken()])

    @app.job
    def ok() -> None: ...

    job_id = ok.enqueue()
    server = app.server(polling_interval=timedelta(milliseconds=20))
    server.start()
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded")
    finally:
        server.stop()
    assert seen == ["Enqueued", "Processing", "Succeeded"]


def test_server_from_plugins_accepts_plain_callable_observers() -> None:
    seen: list[tuple[str | None, str]] = []
    app = App("obs", storage="memory://", autoload=False)

    @app.job
    def ok() -> None: ...

    server = Server.from_plugins(
        app=app, storage=app.storage, autoload=False,
        observers=[lambda job, prev, cur: seen.append((prev.name if prev else None, cur.name))],
        config={"polling_interval": timedelta(milliseconds=20)})
    job_id = ok.enqueue()
    server.start()
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded")
    finally:
        server.stop()
    assert seen == [("Enqueued", "Processing"), ("Processing", "Succeeded")]


def test_plugins_are_disabled_by_the_name_qmlkit_plugins_shows(
    installed: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("qmlkit-example:example", "QMLKIT-EXAMPLE"):
        monkeypatch.setenv("QMLKIT_DISABLE_PLUGINS", name)
        assert "qmlkit-example:example" not in {
            p["name"] for p in describe_plugins(make_plugin_manager())}
    monkeypatch.setenv("QMLKIT_DISABLE_PLUGINS", "no-such-plugin")
    with caplog.at_level("WARNING", logger="qmlkit.plugins"):
        make_plugin_manager()
    assert "no-such-plugin" in caplog.text
    monkeypatch.setenv("QMLKIT_DISABLE_PLUGINS", "")
    monkeypatch.setenv("QMLKIT_DISABLE_PLUGIN_AUTOLOAD", "0")  # "0" does not disable
    assert "qmlkit-example:example" in {p["name"] for p in describe_plugins(make_plugin_manager())}


def test_enqueue_middleware_that_stores_nothing_is_a_clear_error() -> None:
    class Drop:
        @hookimpl
        def qmlkit_enqueue_middleware(self, config: dict[str, object]) -> list[object]:
            return [lambda jobs, call_next: []]

    app = App("drop", storage="memory://", autoload=False, plugins=[Drop()])
    app.job(name="f")(lambda: None)
    with pytest.raises(MiddlewareError, match="stored nothing"):
        app.enqueue("f")
    assert app.storage.count_jobs() == {}
