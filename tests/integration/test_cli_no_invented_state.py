"""Inspection commands never create a SQLite database (issue #15 item 6); ``worker``
and ``enqueue`` still do; a worker that leaves registered queues unserved says so."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qmlkit.cli import main
from qmlkit.cli.worker import unserved_queues, warn_unserved
from qmlkit.testing import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_MODULE = """
from qmlkit import App

app = App("queues", storage={url!r}, autoload=False)

@app.job(name="add")
def add(a, b):
    return a + b

@app.job(name="mail", queue="mail")
def mail(to):
    return to

@app.job(name="report", queue="reports")
def report():
    return 1
"""

READERS = [
    ("jobs", "list"), ("jobs", "show", "some-id"), ("jobs", "retry", "some-id"),
    ("jobs", "delete", "some-id"), ("stats",), ("servers",), ("recurring", "list"),
    ("recurring", "remove", "t"), ("recurring", "trigger", "t"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("QMLKIT_APP", "QMLKIT_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("verb", READERS, ids=lambda v: " ".join(v[:2]))
def test_inspection_refuses_a_missing_sqlite_file_naming_it(workdir: Path,
                                                            verb: tuple[str, ...]) -> None:
    result = invoke(*verb, "--storage", "sqlite:///typo.db")
    assert result.exit_code == 2, result.output
    assert str(workdir / "typo.db") in result.output and "does not create" in result.output
    assert not (workdir / "typo.db").exists()


def test_bare_stats_refuses_the_default_database_when_it_is_missing(workdir: Path) -> None:
    result = invoke("stats")
    assert result.exit_code == 2 and str(workdir / "qmlkit.db") in result.output
    assert "--app module:app" in result.output  # the likely mistake: no app named
    assert list(workdir.iterdir()) == []


def test_dashboard_refuses_a_missing_sqlite_file(workdir: Path) -> None:
    pytest.importorskip("fastapi")
    result = invoke("dashboard", "--storage", "sqlite:///typo.db", "--port", "0")
    assert result.exit_code == 2 and "typo.db" in result.output
    assert not (workdir / "typo.db").exists()


def test_enqueue_and_recurring_add_create_it_and_then_stats_reads_it(workdir: Path,
                                                                   app_module: str) -> None:
    result = invoke("enqueue", app_module, "add", "--args", "[1, 2]",
                    "--storage", "sqlite:///new.db")
    assert result.exit_code == 0, result.output
    assert (workdir / "new.db").exists()
    stats = invoke("stats", "--storage", "sqlite:///new.db", "--json")
    assert stats.exit_code == 0 and '"Enqueued": 1' in stats.output
    added = invoke("recurring", "add", "t", "* * * * *", "x.y", "--storage", "sqlite:///rec.db")
    assert added.exit_code == 0 and (workdir / "rec.db").exists()


def test_memory_and_existing_files_are_not_refused(workdir: Path) -> None:
    assert invoke("stats", "--storage", "memory://").exit_code == 0


def test_unserved_queues_names_registered_queues_left_out() -> None:
    from qmlkit import App

    app = App("q", storage="memory://", autoload=False)
    app.job(name="a")(lambda: None)
    app.job(name="b", queue="mail")(lambda: None)
    assert unserved_queues(app.registry, ("default",)) == ["mail"]
    assert unserved_queues(app.registry, ()) == []  # '*': every queue
    assert unserved_queues(app.registry, ("default", "mail")) == []


def test_warn_unserved_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    from qmlkit import App

    app = App("q", storage="memory://", autoload=False)
    app.job(name="b", queue="mail")(lambda: None)
    app.job(name="c", queue="zeta")(lambda: None)
    with caplog.at_level(logging.WARNING, logger="qmlkit.cli"):
        warn_unserved(app.registry, ("default",))
    (record,) = caplog.records
    assert "mail, zeta" in record.getMessage() and "--queues '*'" in record.getMessage()


@pytest.fixture
def app_module(workdir: Path) -> Iterator[str]:
    name = f"qk_queues_{uuid.uuid4().hex[:8]}"
    (workdir / f"{name}.py").write_text(APP_MODULE.format(url="sqlite:///w.db"))
    yield f"{name}:app"


def start_worker(workdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ, QMLKIT_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=os.pathsep.join([str(workdir), str(REPO_ROOT)]))
    log = workdir / f"worker-{uuid.uuid4().hex[:4]}.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "qmlkit.cli", "worker", *args,
                                 "--no-heartbeat"], cwd=workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    return proc, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_creates_the_database_and_warns_of_unserved_queues(workdir: Path,
                                                                   app_module: str) -> None:
    proc, log = start_worker(workdir, app_module)
    try:
        wait_until(lambda: "will not run" in log.read_text() or proc.poll() is not None,
                   timeout=30)
        wait_until(lambda: (workdir / "w.db").exists() or proc.poll() is not None, timeout=30)
    finally:
        stop(proc)
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "will not run" in line]
    assert len(warnings) == 1, text
    assert "mail, reports" in warnings[0] and "--queues '*'" in warnings[0]
    assert (workdir / "w.db").exists()


def test_worker_on_every_queue_does_not_warn(workdir: Path, app_module: str) -> None:
    proc, log = start_worker(workdir, app_module, "--queues", "*")
    try:
        wait_until(lambda: (workdir / "w.db").exists() or proc.poll() is not None, timeout=30)
    finally:
        stop(proc)
    assert "will not run" not in log.read_text()
