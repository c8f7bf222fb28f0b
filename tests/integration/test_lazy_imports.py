"""A worker imports only what its storage, wake-up transport and pool use (issue #16, memory).

Each test runs a real server, or the real ``qmlkit worker`` command, in a fresh
interpreter (``sys.modules`` of this pytest process holds everything the other tests
imported) with the installed plugins autoloaded, as in production, and reads which
optional modules that process loaded. Memory figures themselves are
``bench/memory.py``'s; what is asserted here is the behaviour behind them: a module
that is not used is not imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.testing import wait_until

#: Modules no worker needs unless asked for: wake-ups (kombu and what it brings), the sync
#: bridge of the asyncio pool (greenlet), recurring templates (croniter), the table
#: printing verbs (rich), the dashboard, the process pool, and the storage backends not
#: configured (SQLAlchemy's PostgreSQL dialect included: a SQLite storage needs only its
#: own). Matched as module names or their package prefixes, the first entry that matches
#: naming the module in `packages`.
OPTIONAL = ("kombu", "amqp", "vine", "greenlet", "croniter", "rich", "fastapi", "starlette",
            "uvicorn", "jinja2", "multiprocessing", "qmlkit.dashboard", "qmlkit.cli.inspect",
            "qmlkit.cli.admin", "qmlkit.cli.dashboard", "qmlkit.processing.pools.processes",
            "qmlkit.processing.syncbridge", "qmlkit_postgres.storage", "psycopg",
            "qmlkit_redis.storage", "redis", "sqlalchemy.dialects.postgresql", "sqlalchemy",
            "qmlkit.storage.sql")

#: Runs one server in a fresh interpreter and prints the `OPTIONAL` modules it loaded.
#: argv: storage URL, pool, wake-up URL ("" for none), "sync" to add a sync middleware.
PROBE = textwrap.dedent("""
    import json, sys
    from qmlkit import App, Server

    url, pool, wakeup, middleware = sys.argv[1:5]
    app = App("lazy-imports", storage=url, wakeup_url=wakeup or None)  # None: off

    @app.job(name="sync_job")
    def sync_job() -> int:
        return 1

    @app.job(name="async_job")
    async def async_job() -> int:
        return 2

    def passing(job, context, call_next):
        return call_next()

    config = {"pool": pool, "worker_count": 2, "polling_interval": 0.05,
              "wakeup_url": wakeup or None, "wakeup_exchange": "lazy." + url[-12:]}
    server = Server.from_plugins(app=app, storage=url, config=config,
                                 middleware=[passing] if middleware == "sync" else [])
    server.start()
    try:
        job = async_job if pool == "asyncio" else sync_job
        assert job.enqueue().result(timeout=30) in (1, 2)
    finally:
        server.stop()
        app.close()
    optional = json.loads(sys.argv[5])
    print(json.dumps(sorted(m for m in sys.modules
                            if any(m == o or m.startswith(o + ".") for o in optional))))
""")


def loaded_by_server(tmp_path: Path, url: str, *, pool: str = "threads", wakeup: str = "",
                     middleware: str = "") -> set[str]:
    """The `OPTIONAL` modules a fresh interpreter loaded to run one job on ``url``."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, url, pool, wakeup, middleware, json.dumps(OPTIONAL)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def packages(modules: set[str]) -> set[str]:
    """``{"kombu", "sqlalchemy"}`` of ``{"kombu.connection", "sqlalchemy.engine", …}``."""
    return {next(o for o in OPTIONAL if m == o or m.startswith(o + ".")) for m in modules}


def test_a_sqlite_thread_pool_server_loads_sqlalchemy_and_nothing_optional(
        tmp_path: Path, sqlite_url: str) -> None:
    loaded = packages(loaded_by_server(tmp_path, sqlite_url))
    assert loaded == {"sqlalchemy", "qmlkit.storage.sql"}


def test_an_asyncio_pool_loads_greenlet_only_for_a_sync_middleware(
        tmp_path: Path, sqlite_url: str) -> None:
    # The built-in logging middleware has an async form: no bridge is needed.
    assert packages(loaded_by_server(tmp_path, sqlite_url, pool="asyncio")) == {
        "sqlalchemy", "qmlkit.storage.sql"}
    with_sync = packages(loaded_by_server(tmp_path, sqlite_url, pool="asyncio",
                                          middleware="sync"))
    assert with_sync == {"sqlalchemy", "qmlkit.storage.sql", "greenlet",
                         "qmlkit.processing.syncbridge"}


def test_kombu_loads_when_a_wakeup_url_is_configured(tmp_path: Path, sqlite_url: str) -> None:
    loaded = packages(loaded_by_server(tmp_path, sqlite_url,
                                       wakeup=f"filesystem://{tmp_path / 'wakeups'}"))
    assert {"kombu", "sqlalchemy"} <= loaded
    assert not loaded & {"greenlet", "croniter", "rich", "psycopg", "redis", "qmlkit.dashboard",
                         "qmlkit.processing.pools.processes"}


@pytest.mark.redis
def test_a_redis_server_loads_neither_sqlalchemy_nor_psycopg(tmp_path: Path,
                                                             redis_url: str) -> None:
    # qmlkit-postgres is installed and autoloaded: its entry point must stay cheap.
    loaded = packages(loaded_by_server(tmp_path, redis_url))
    assert loaded == {"redis", "qmlkit_redis.storage"}


#: The app of the CLI test: its job reports the `OPTIONAL` modules of the worker running it.
CLI_APP = """
import sys
from qmlkit import App

app = App("lazy-cli", storage={url!r})
OPTIONAL = {optional!r}


@app.job(name="loaded")
def loaded():
    return sorted(m for m in sys.modules
                  if any(m == o or m.startswith(o + ".") for o in OPTIONAL))
"""


def test_the_qmlkit_worker_command_loads_no_cli_verb_rich_or_process_pool(
        tmp_path: Path, sqlite_url: str) -> None:
    name = f"qk_lazy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CLI_APP.format(url=sqlite_url, optional=OPTIONAL))
    client = App("lazy-cli-client", storage=sqlite_url, autoload=False)
    handle = client.enqueue("loaded")
    log = tmp_path / "worker.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", f"{name}:app", "--threads", "1",
             "--polling-interval", "0.05", "--wakeup", "none"],  # kombu: see the wake-up test
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])),
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: handle.state == "Succeeded" or proc.poll() is not None,
                   timeout=60)
        assert proc.poll() is None, log.read_text()
        loaded = packages(set(handle.result(timeout=5)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        client.close()
    assert loaded == {"sqlalchemy", "qmlkit.storage.sql"}, log.read_text()
