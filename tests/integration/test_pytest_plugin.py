"""The ``qmlkit`` pytest plugin (``pytest11`` entry point) and ``drain``, run as a user
would: a test file using the fixtures, in a pytest subprocess (pytester)."""

from __future__ import annotations

import importlib.metadata
from datetime import timedelta

import pytest

from qmlkit import App
from qmlkit.processing.retry import RetryPolicy
from qmlkit.testing.drain import drain

pytest_plugins = ["pytester"]

QUICK = RetryPolicy(max_retries=2, base_delay=timedelta(milliseconds=50), jitter=0)

USER_TESTS = '''
from datetime import timedelta
from qmlkit.processing.retry import RetryPolicy

def test_inline_on_memory(qmlkit_app):
    @qmlkit_app.job
    def add(a, b):
        return a + b
    with qmlkit_app.inline():
        job_id = add.enqueue(1, 2)
    assert str(qmlkit_app.storage_spec) == "memory://"
    assert qmlkit_app.storage.get(job_id).state.result == 3

def test_drain_on_sqlite(qmlkit_sqlite_app, qmlkit_drain, tmp_path):
    app = qmlkit_sqlite_app
    assert str(app.storage_spec).startswith("sqlite:///" + str(tmp_path))
    tries = []

    @app.job(retry=RetryPolicy(max_retries=2, base_delay=timedelta(milliseconds=50), jitter=0))
    def flaky():
        tries.append(1)
        if len(tries) < 2:
            raise ConnectionError("once")
        return "ok"

    @app.job
    def fan_out(n):
        for _ in range(n):
            flaky.enqueue()
        return n

    fan_out.enqueue(1)
    outcome = qmlkit_drain(app, timeout=30)
    assert sorted(job.state.name for job in outcome) == ["Succeeded", "Succeeded"]
    assert sorted(map(str, outcome.results())) == ["1", "ok"]
    assert app.storage.count_jobs() == {("default", "Succeeded"): 2}

def test_factory_makes_isolated_apps(qmlkit_app_factory):
    one, two = qmlkit_app_factory(), qmlkit_app_factory(storage="sqlite", inline=True)
    @one.job(name="x")
    def x():
        return 1
    one.enqueue("x")
    assert two.storage.list_jobs() == []
'''


def test_plugin_is_registered_through_pytest11() -> None:
    eps = importlib.metadata.entry_points(group="pytest11")
    assert any(ep.value == "qmlkit.testing.pytest_plugin" for ep in eps)


def test_users_tests_run_with_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user_jobs=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=240)
    result.assert_outcomes(passed=3)


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_off="def test_needs(qmlkit_app):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:qmlkit", "-q", timeout=240)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'qmlkit_app' not found*"])


@pytest.fixture(params=["memory", "sqlite"])
def drain_app(request: pytest.FixtureRequest) -> App:
    url = request.getfixturevalue(f"{request.param}_url")
    application = App("drain", storage=url, autoload=False)
    yield application
    application.close()


def test_drain_waits_for_retries_and_child_jobs(drain_app: App) -> None:
    tries: list[int] = []

    @drain_app.job(retry=QUICK)
    def flaky(i: int) -> int:
        tries.append(i)
        if tries.count(i) < 3:
            raise ConnectionError("again")
        return i

    @drain_app.job(queue="other")
    def parent(n: int) -> int:
        flaky.enqueue_many([(i,) for i in range(n)])
        return n

    parent.enqueue(3)
    outcome = drain(drain_app, timeout=60)
    assert sorted(outcome.results(flaky.name)) == [0, 1, 2]
    assert outcome.results(parent.name) == [3] and outcome.failed == []
    assert all(job.attempts == 3 for job in outcome.succeeded if job.method == flaky.name)
    assert not drain_app.server().is_running  # nothing left running


def test_drain_reports_failures_and_leaves_future_schedules(drain_app: App) -> None:
    @drain_app.job(max_retries=0)
    def broken() -> None:
        raise ValueError("no")

    broken.enqueue()
    later = broken.schedule(delay=3600)
    outcome = drain(drain_app, timeout=60)
    assert [job.state.name for job in outcome] == ["Failed"]
    assert outcome.failed[0].state.exception_type == "ValueError"
    assert drain_app.storage.get(later).state.name == "Scheduled"  # type: ignore[union-attr]


def test_drain_times_out_naming_what_is_left(drain_app: App) -> None:
    @drain_app.job
    def later() -> None: ...

    later.schedule(delay=3600)
    with pytest.raises(TimeoutError, match=r"1 job\(s\) still"):
        drain(drain_app, timeout=0.3, include_scheduled=True)
