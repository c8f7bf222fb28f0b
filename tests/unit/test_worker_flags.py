"""``qmlkit worker``'s pool flags (issue #14, item 3): --pool, -c/--concurrency, and the
--threads / QMLKIT_THREADS spellings older scripts use."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from qmlkit import App
from qmlkit.cli.worker import config_fields, server_flags, worker

#: An app for `worker` to load; the flag checks refuse before any server starts.
app = App("flags", storage="memory://", autoload=False)


@click.command()
@server_flags
def show(**flags: object) -> None:
    click.echo(json.dumps(config_fields(flags), default=str))


@pytest.mark.parametrize(("args", "env"), [
    (["-c", "7"], {}),
    (["--concurrency", "7"], {}),
    (["--threads", "7"], {}),
    ([], {"QMLKIT_CONCURRENCY": "7"}),
    ([], {"QMLKIT_THREADS": "7"}),
])
def test_concurrency_has_one_field_under_every_spelling(args, env) -> None:
    result = CliRunner().invoke(show, args, env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"worker_count": 7}


def test_pool_is_chosen_by_name_or_environment() -> None:
    assert json.loads(CliRunner().invoke(show, ["--pool", "asyncio", "-c", "500"]).output) == {
        "pool": "asyncio", "worker_count": 500}
    env = CliRunner().invoke(show, [], env={"QMLKIT_POOL": "threads"})
    assert json.loads(env.output) == {"pool": "threads"}


def test_an_unknown_pool_is_refused_naming_the_choices() -> None:
    result = CliRunner().invoke(show, ["--pool", "gevent"])
    assert result.exit_code == 2
    assert "gevent" in result.output and "asyncio" in result.output


@pytest.mark.parametrize("value", ["", ",", " ", " , "])
def test_queues_naming_no_queue_is_a_usage_error_not_every_queue(value: str) -> None:
    result = CliRunner().invoke(show, ["--queues", value])
    assert result.exit_code == 2
    assert "--queues" in result.output and "names no queue" in result.output


def test_star_still_means_every_queue() -> None:
    assert json.loads(CliRunner().invoke(show, ["--queues", "*"]).output) == {"queues": []}


@pytest.mark.parametrize(("args", "env"), [
    (["--processes", "2"], {}),
    (["--pool", "asyncio", "--max-jobs-per-child", "5"], {}),
    (["--child-pool", "asyncio"], {}),
    ([], {"QMLKIT_PROCESSES": "2"}),
])
def test_process_pool_flags_without_the_process_pool_are_refused(args, env) -> None:
    result = CliRunner().invoke(worker, ["tests.unit.test_worker_flags:app", *args], env=env)
    assert result.exit_code == 2, result.output
    assert "only applies to the process pool" in result.output  # one flag each
    assert "--pool processes" in result.output


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--wakeup", "none"], {}, None),
    (["--wakeup", "OFF"], {}, None),
    ([], {"QMLKIT_WAKEUP_URL": "none"}, None),
    (["--wakeup", "auto"], {}, "auto"),
    ([], {"QMLKIT_WAKEUP_URL": "redis://127.0.0.1:6379/0"}, "redis://127.0.0.1:6379/0"),
])
def test_wakeup_flag_turns_wakeups_off_keeps_auto_or_names_a_url(args, env, expected) -> None:
    result = CliRunner().invoke(show, args, env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"wakeup_url": expected}


def test_no_wakeup_flag_leaves_the_apps_setting() -> None:
    assert json.loads(CliRunner().invoke(show, [], env={"QMLKIT_WAKEUP_URL": None}).output) == {}
