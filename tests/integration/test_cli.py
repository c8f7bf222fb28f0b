"""The ``qmlkit`` command, through click's ``CliRunner`` (a subprocess for the worker).

Each test writes a small application module into its own ``tmp_path`` (with a unique
module name, since imports are cached per process) on a SQLite file there, and checks
what the command prints against what is stored.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner, Result

from qmlkit import App
from qmlkit.cli import main
from qmlkit.testing import wait_until

#: The repository root, put on the worker subprocess's PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parents[2]

APP_MODULE = """
from qmlkit import App

app = App("cli-test", storage={url!r}, autoload=False)


@app.job(name="add")
def add(a, b):
    return a + b


@app.job(name="boom", max_retries=0)
def boom(text):
    raise ValueError(text)
"""


@dataclass
class CliApp:
    """An application module on disk and the handles a test needs."""

    spec: str  # "module:app", as given on the command line
    url: str  # its SQLite storage URL
    db: Path  # the SQLite file
    folder: Path  # where the module lives (the working directory)
    module: ModuleType  # the imported module (the same one the CLI loads)

    @property
    def app(self) -> App:
        return self.module.app

    def state_of(self, job_id: str) -> str:
        job = self.app.storage.get(job_id)
        assert job is not None
        return job.state.name


@pytest.fixture
def cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliApp]:
    name = f"qk_cli_app_{uuid.uuid4().hex[:8]}"
    db = tmp_path / "cli.db"
    url = f"sqlite:///{db}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(url=url))
    monkeypatch.chdir(tmp_path)  # the CLI imports APP from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("QMLKIT_APP", "QMLKIT_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    module = importlib.import_module(name)
    yield CliApp(f"{name}:app", url, db, tmp_path, module)
    module.app.close()
    sys.modules.pop(name, None)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def run_to_completion(cli: CliApp, *job_ids: str) -> None:
    """Run an in-process server until every job in ``job_ids`` has left Enqueued."""
    server = cli.app.server(worker_count=1, polling_interval=timedelta(milliseconds=50),
                            enable_cleanup=False, log_attempts=False)
    server.start()
    try:
        wait_until(lambda: all(cli.state_of(j) in ("Succeeded", "Failed") for j in job_ids),
                   timeout=10)
    finally:
        server.stop()


# --- enqueue ---------------------------------------------------------------------------


def test_enqueue_prints_the_id_of_the_stored_job(cli_app: CliApp) -> None:
    result = invoke("enqueue", cli_app.spec, "add", "--args", "[1,2]", "--kwargs", "{}")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    job = cli_app.app.storage.get(job_id)
    assert job is not None
    assert (job.method, job.args, job.kwargs, job.state.name) == ("add", [1, 2], {}, "Enqueued")
    run_to_completion(cli_app, job_id)
    assert cli_app.app.storage.get(job_id).state.result == 3


def test_enqueue_with_delay_and_priority_stores_a_scheduled_job(cli_app: CliApp) -> None:
    result = invoke("enqueue", cli_app.spec, "add", "--args", "[1,2]", "--delay", "60",
                    "--priority", "7")
    assert result.exit_code == 0, result.output
    job = cli_app.app.storage.get(result.stdout.strip())
    assert job.state.name == "Scheduled" and job.priority == 7
    assert (job.state.enqueue_at - job.created_at).total_seconds() == pytest.approx(60)


def test_enqueue_with_bad_args_json_names_the_option_and_stores_nothing(cli_app: CliApp) -> None:
    result = invoke("enqueue", cli_app.spec, "add", "--args", "[1,")
    assert result.exit_code != 0
    assert "JSON" in result.output
    assert "--args" in result.output, result.output
    assert cli_app.app.storage.count_jobs() == {}


def test_enqueue_with_args_that_are_not_a_list_is_refused(cli_app: CliApp) -> None:
    result = invoke("enqueue", cli_app.spec, "add", "--args", '{"a": 1}')
    assert result.exit_code != 0
    assert "--args" in result.output and "list" in result.output
    result = invoke("enqueue", cli_app.spec, "add", "--kwargs", "[1]")
    assert result.exit_code != 0
    assert "--kwargs" in result.output
    assert cli_app.app.storage.count_jobs() == {}


def test_enqueue_with_a_malformed_app_spec_is_refused(cli_app: CliApp) -> None:
    result = invoke("enqueue", "no_colon_here", "add")
    assert result.exit_code != 0
    assert "module:attribute" in result.output
    result = invoke("enqueue", "qk_missing_module_xyz:app", "add")
    assert result.exit_code != 0
    assert "qk_missing_module_xyz" in result.output


# --- jobs list / show / retry / delete, stats ------------------------------------------


@pytest.fixture
def populated(cli_app: CliApp) -> dict[str, str]:
    """Two Succeeded, one Failed and two Enqueued jobs; returns their ids by label."""
    app = cli_app.app
    ids = {"ok1": app.enqueue("add", args=[1, 2]), "ok2": app.enqueue("add", args=[3, 4]),
           "bad": app.enqueue("boom", args=["ünïcødé ✓ 中文"])}
    run_to_completion(cli_app, *ids.values())
    ids["wait1"] = app.enqueue("add", args=[5, 6])
    ids["wait2"] = app.enqueue("add", args=[7, 8], queue="other")
    return ids


def json_lines(result: Result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_jobs_list_json_shows_every_job_with_its_state(
    cli_app: CliApp, populated: dict[str, str]
) -> None:
    listed = json_lines(invoke("jobs", "list", "--app", cli_app.spec, "--json"))
    states = {row["id"]: row["state"]["name"] for row in listed}
    assert states == {populated["ok1"]: "Succeeded", populated["ok2"]: "Succeeded",
                      populated["bad"]: "Failed", populated["wait1"]: "Enqueued",
                      populated["wait2"]: "Enqueued"}


def test_jobs_list_filters_by_state_queue_and_method(
    cli_app: CliApp, populated: dict[str, str]
) -> None:
    failed = json_lines(invoke("jobs", "list", "--app", cli_app.spec, "--state", "failed",
                               "--json"))
    assert [row["id"] for row in failed] == [populated["bad"]]
    assert failed[0]["state"]["message"] == "ünïcødé ✓ 中文"
    other = json_lines(invoke("jobs", "list", "--app", cli_app.spec, "--queue", "other",
                              "--json"))
    assert [row["id"] for row in other] == [populated["wait2"]]
    booms = json_lines(invoke("jobs", "list", "--app", cli_app.spec, "--method", "boom",
                              "--json"))
    assert [row["id"] for row in booms] == [populated["bad"]]
    limited = json_lines(invoke("jobs", "list", "--app", cli_app.spec, "--limit", "2",
                                "--json"))
    assert len(limited) == 2


def run_cli(cli: CliApp, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``qmlkit ARGS`` as a subprocess whose output is a pipe, not a terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(cli.folder), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["QMLKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-m", "qmlkit.cli", *args], cwd=cli.folder, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_jobs_list_table_shows_each_job_and_its_state(
    cli_app: CliApp, populated: dict[str, str]
) -> None:
    result = invoke("jobs", "list", "--app", cli_app.spec)
    assert result.exit_code == 0, result.output
    assert result.output.count("Succeeded") == 2
    assert result.output.count("Failed") == 1
    assert result.output.count("Enqueued") == 2
    assert result.output.count(" boom ") == 1 and result.output.count(" add ") == 4


def test_jobs_list_table_prints_whole_ids_when_output_is_a_pipe(
    cli_app: CliApp, populated: dict[str, str]
) -> None:
    result = run_cli(cli_app, "jobs", "list", "--app", cli_app.spec)
    assert result.returncode == 0, result.stderr
    # the id is what `jobs show/retry/delete` take, so it must be printed whole
    for job_id in populated.values():
        assert job_id in result.stdout, f"{job_id} missing or cut in:\n{result.stdout}"


def test_jobs_show_prints_the_job_as_json(cli_app: CliApp, populated: dict[str, str]) -> None:
    result = invoke("jobs", "show", populated["bad"], "--app", cli_app.spec)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["id"] == populated["bad"] and shown["method"] == "boom"
    assert shown["state"]["name"] == "Failed"
    assert shown["state"]["exception_type"] == "ValueError"
    assert "ünïcødé ✓ 中文" in shown["state"]["stack_trace"]
    assert next(s["name"] for s in shown["history"]) == "Enqueued"
    assert shown["history"][-1] == shown["state"]
    result = invoke("jobs", "show", populated["wait1"], "--app", cli_app.spec)
    assert json.loads(result.stdout)["state"]["name"] == "Enqueued"


def test_jobs_show_of_an_unknown_id_fails(cli_app: CliApp) -> None:
    cli_app.app.storage  # noqa: B018 - the database exists, without that job
    result = invoke("jobs", "show", "no-such-id", "--app", cli_app.spec)
    assert result.exit_code != 0
    assert "no-such-id" in result.output


def test_jobs_retry_enqueues_a_failed_job(cli_app: CliApp, populated: dict[str, str]) -> None:
    result = invoke("jobs", "retry", populated["bad"], "--app", cli_app.spec)
    assert result.exit_code == 0, result.output
    assert populated["bad"] in result.output
    job = cli_app.app.storage.get(populated["bad"])
    assert job.state.name == "Enqueued" and job.state.reason == "retried by hand"
    # an Enqueued job cannot be retried: a clear error, nothing changed
    result = invoke("jobs", "retry", populated["wait1"], "--app", cli_app.spec)
    assert result.exit_code != 0
    assert "Enqueued" in result.output
    assert cli_app.state_of(populated["wait1"]) == "Enqueued"


def test_jobs_delete_moves_a_job_to_deleted(cli_app: CliApp, populated: dict[str, str]) -> None:
    result = invoke("jobs", "delete", populated["wait1"], "--app", cli_app.spec,
                    "--reason", "not needed")
    assert result.exit_code == 0, result.output
    job = cli_app.app.storage.get(populated["wait1"])
    assert job.state.name == "Deleted" and job.state.reason == "not needed"
    assert job.expires_at is not None
    result = invoke("jobs", "delete", "no-such-id", "--app", cli_app.spec)
    assert result.exit_code != 0 and "no-such-id" in result.output


def test_stats_counts_jobs_by_queue_and_state(cli_app: CliApp, populated: dict[str, str]) -> None:
    result = invoke("stats", "--app", cli_app.spec, "--json")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["default"]["Succeeded"] == 2
    assert counts["default"]["Failed"] == 1
    assert counts["default"]["Enqueued"] == 1
    assert counts["other"]["Enqueued"] == 1
    assert sum(sum(per_state.values()) for per_state in counts.values()) == 5
    table = invoke("stats", "--app", cli_app.spec)
    assert table.exit_code == 0, table.output
    total_row = [line for line in table.output.splitlines() if " all " in line]
    assert len(total_row) == 1 and total_row[0].split("│")[-2].strip() == "5", table.output


def test_stats_table_prints_whole_queue_names_when_output_is_a_pipe(
    cli_app: CliApp, populated: dict[str, str]
) -> None:
    result = run_cli(cli_app, "stats", "--app", cli_app.spec)
    assert result.returncode == 0, result.stderr
    assert "default" in result.stdout and "other" in result.stdout, result.stdout


# --- environment variables and storage errors -----------------------------------------


def test_storage_comes_from_qmlkit_storage(cli_app: CliApp, populated: dict[str, str]) -> None:
    listed = json_lines(invoke("jobs", "list", "--json", env={"QMLKIT_STORAGE": cli_app.url}))
    assert {row["id"] for row in listed} == set(populated.values())
    result = invoke("stats", "--json", env={"QMLKIT_STORAGE": cli_app.url})
    assert json.loads(result.stdout)["default"]["Succeeded"] == 2


def test_app_comes_from_qmlkit_app(cli_app: CliApp, populated: dict[str, str]) -> None:
    listed = json_lines(invoke("jobs", "list", "--json", "--state", "Failed",
                               env={"QMLKIT_APP": cli_app.spec}))
    assert [row["id"] for row in listed] == [populated["bad"]]
    result = invoke("jobs", "show", populated["ok1"], env={"QMLKIT_APP": cli_app.spec})
    assert json.loads(result.stdout)["state"]["result"] == 3


def test_storage_option_overrides_the_apps_storage(cli_app: CliApp, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    result = invoke("enqueue", cli_app.spec, "add", "--args", "[1,2]", "--storage", other)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert cli_app.app.storage.get(job_id) is None
    listed = json_lines(invoke("jobs", "list", "--json", "--app", cli_app.spec,
                               "--storage", other))
    assert [row["id"] for row in listed] == [job_id]


def test_unknown_storage_scheme_lists_the_known_schemes(cli_app: CliApp) -> None:
    result = invoke("jobs", "list", "--storage", "mongodb://localhost/jobs")
    assert result.exit_code != 0
    assert "mongodb" in result.output
    assert "sqlite" in result.output and "memory" in result.output
    result = invoke("stats", env={"QMLKIT_STORAGE": "mongodb://localhost/jobs"})
    assert result.exit_code != 0 and "sqlite" in result.output


def test_missing_sqlite_directory_is_named(cli_app: CliApp, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    result = invoke("stats", "--storage", f"sqlite:///{missing / 'q.db'}")
    assert result.exit_code != 0
    assert str(missing) in result.output
    assert not missing.exists()


# --- garbage rows ------------------------------------------------------------------------


def corrupt(db: Path, job_id: str, column: str, value: str) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(f"UPDATE qmlkit_jobs SET {column} = ? WHERE id = ?", (value, job_id))
    finally:
        conn.close()


def stored_state(db: Path, job_id: str) -> str:
    conn = sqlite3.connect(db)
    try:
        (state,) = conn.execute("SELECT state FROM qmlkit_jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return state


def test_garbage_rows_are_listed_and_quarantined_by_the_worker(cli_app: CliApp) -> None:
    # Given two rows with garbage in them, enqueued before three good jobs
    app = cli_app.app
    bad_payload = app.enqueue("add", args=[0, 0])
    bad_state = app.enqueue("add", args=[0, 1])
    good = [app.enqueue("add", args=[i, i]) for i in range(1, 4)]
    corrupt(cli_app.db, bad_payload, "payload", "{this is not json")
    corrupt(cli_app.db, bad_state, "state_data", "\x00garbage\xff")
    # Then listing still works, and shows the bad rows as Failed with the reason
    listed = {row["id"]: row for row in
              json_lines(invoke("jobs", "list", "--app", cli_app.spec, "--json"))}
    assert set(listed) == {bad_payload, bad_state, *good}
    for job_id in (bad_payload, bad_state):
        assert listed[job_id]["state"]["name"] == "Failed"
        assert "cannot be decoded" in listed[job_id]["state"]["message"]
    table = invoke("jobs", "list", "--app", cli_app.spec)
    assert table.exit_code == 0, table.output
    shown = invoke("jobs", "show", bad_state, "--app", cli_app.spec)
    assert shown.exit_code == 0 and json.loads(shown.stdout)["state"]["name"] == "Failed"
    assert invoke("stats", "--app", cli_app.spec, "--json").exit_code == 0

    # When a worker runs
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(cli_app.folder), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["QMLKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    log = cli_app.folder / "worker.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", cli_app.spec, "--threads", "2",
             "--polling-interval", "0.1"],
            cwd=cli_app.folder, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        # Then the good jobs run and the bad rows are quarantined as Failed in storage
        wait_until(lambda: all(cli_app.state_of(j) == "Succeeded" for j in good)
                   or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, log.read_text()
        assert [app.storage.get(j).state.result for j in good] == [2, 4, 6]
        wait_until(lambda: stored_state(cli_app.db, bad_payload) == "Failed"
                   and stored_state(cli_app.db, bad_state) == "Failed", timeout=10)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()
    assert "quarantined" in log.read_text()


def test_worker_stale_after_requeues_a_stranded_job_on_start(cli_app: CliApp) -> None:
    # A job left Processing by a worker killed without heartbeats is requeued by the
    # next worker that starts, once its claim is older than --stale-after.
    from qmlkit.job import utcnow

    app = cli_app.app
    job_id = app.enqueue("add", args=[20, 1])
    (claimed,) = app.storage.claim(worker_id="gone:0", server_name="gone", queues=[],
                                   limit=1, now=utcnow())
    assert claimed.id == job_id
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(cli_app.folder), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["QMLKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    log = cli_app.folder / "stale.log"
    wait_until(lambda: (utcnow() - claimed.state.started_at).total_seconds() > 0.5)
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", cli_app.spec, "--threads", "1",
             "--polling-interval", "0.1", "--stale-after", "0.5"],
            cwd=cli_app.folder, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: cli_app.state_of(job_id) == "Succeeded" or proc.poll() is not None,
                   timeout=20)
        assert cli_app.state_of(job_id) == "Succeeded", log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert "requeued 1 stranded" in log.read_text()


def test_enqueue_sends_its_wakeup_on_the_exchange_given(cli_app: CliApp, tmp_path: Path) -> None:
    # Client and workers must agree on the exchange; the CLI can name it, as an option
    # or through QMLKIT_WAKEUP_EXCHANGE.
    from qmlkit.wakeup import WakeupListener

    url = f"filesystem://{tmp_path / 'wk'}"
    heard: list[str | None] = []
    listener = WakeupListener(url, heard.append, "cli.exchange", name="cli")
    listener.start()
    try:
        wait_until(lambda: listener.connected.is_set(), timeout=10)
        heard.clear()
        result = invoke("enqueue", cli_app.spec, "add", "--args", "[1,2]", "--queue", "viaopt",
                        "--wakeup", url, "--wakeup-exchange", "cli.exchange")
        assert result.exit_code == 0, result.output
        wait_until(lambda: "viaopt" in heard, timeout=10)
        result = invoke("enqueue", cli_app.spec, "add", "--args", "[1,2]", "--queue", "viaenv",
                        env={"QMLKIT_WAKEUP_URL": url, "QMLKIT_WAKEUP_EXCHANGE": "cli.exchange"})
        assert result.exit_code == 0, result.output
        wait_until(lambda: "viaenv" in heard, timeout=10)
    finally:
        listener.stop()


def test_worker_refuses_a_mistyped_wakeup_url_naming_it(cli_app: CliApp) -> None:
    result = CliRunner().invoke(main, ["worker", cli_app.spec, "--wakeup",
                                       "redis:/127.0.0.1:6379/0"])
    assert result.exit_code != 0
    assert "redis:/127.0.0.1:6379/0" in result.output and "is not a URL" in result.output


# --- hostile --args / --kwargs (issue 17) ------------------------------------------------------

BAD_JSON = {
    "deep": "[" * 50_000 + "]" * 50_000,
    "digits": "[" + "9" * 5000 + "]",
    "nan": "[NaN]",
    "infinity": '{"a": -Infinity}',
    "huge-float": "[1e400]",
    "truncated": "[1,",
    "empty": "",
    "single-quotes": "{'a': 1}",
}


@pytest.mark.parametrize("option", ["--args", "--kwargs"])
@pytest.mark.parametrize("text", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_enqueue_with_any_bad_json_is_a_usage_error(cli_app: CliApp, option: str,
                                                    text: str) -> None:
    result = CliRunner().invoke(main, ["enqueue", cli_app.spec, "add", option, text])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert option in result.output and "Traceback" not in result.output
    assert cli_app.app.storage.count_jobs() == {}


def test_recurring_add_with_deep_json_is_a_usage_error(cli_app: CliApp) -> None:
    result = CliRunner().invoke(main, ["recurring", "add", "r1", "0 * * * *", "add",
                                       "--app", cli_app.spec, "--args", "[" * 50_000])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert cli_app.app.list_recurring() == []


CLOSING_APP = """
import sys
from qmlkit import App

app = App("cli-close", storage={url!r}, autoload=False)


@app.job(name="close_streams", max_retries=0)
def close_streams():
    sys.stdout.close()
    sys.stderr.close()
    return "closed"


@app.job(name="add")
def add(a, b):
    return a + b
"""


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_a_job_closing_sys_stderr_fails_no_later_job_and_the_worker_logs_on(
        cli_app: CliApp, pool: str) -> None:
    # logging's own error handler writes to sys.stderr: once a job had closed it, every
    # later attempt's log line raised ValueError into that attempt. The worker logs to a
    # stream of its own on a copy of descriptor 2, and a log line never fails a job.
    name = f"qk_close_app_{uuid.uuid4().hex[:8]}"
    (cli_app.folder / f"{name}.py").write_text(CLOSING_APP.format(url=cli_app.url))
    client = App("cli-close", storage=cli_app.url, autoload=False)
    try:
        closer = client.enqueue("close_streams")
        later = [client.enqueue("add", args=[i, 1]) for i in range(5)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(cli_app.folder), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["QMLKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        log = cli_app.folder / f"close-{pool}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qmlkit.cli", "worker", f"{name}:app", "--pool", pool,
                 "-c", "1", "--polling-interval", "0.1"],
                cwd=cli_app.folder, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            def states() -> set[str]:
                return {client.storage.get(j).state.name for j in [closer, *later]}

            wait_until(lambda: states() <= {"Succeeded", "Failed"} or proc.poll() is not None,
                       timeout=30)
            assert states() == {"Succeeded"}, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        assert [client.storage.get(j).state.result for j in later] == [1, 2, 3, 4, 5]
        text = log.read_text()
        assert code == 0, text
        # every attempt's line reached the log, those after the streams were closed too
        assert text.count("outcome=ok") == 6, text
    finally:
        client.close()
        sys.modules.pop(name, None)
