"""The process pool's parts without processes: settling a dead child's jobs, the
attempt reporter's recycling, the supervisor's view of a child, `WorkerLost`."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from qmlkit import App, WorkerLost
from qmlkit.job import utcnow
from qmlkit.processing.config import ServerConfig
from qmlkit.processing.outcome import store_outcomes
from qmlkit.processing.pools.children import Reporter, rss_mib
from qmlkit.processing.pools.settle import Ending, settle
from qmlkit.processing.pools.supervisor import (
    HARD_TIMEOUT_MARGIN_S,
    ChildHandle,
    hard_timeout_margin,
)


@pytest.fixture
def app() -> Any:
    application = App("unit", storage="memory://", autoload=False)

    @application.job(name="work", max_retries=0)
    def work() -> None:
        return None

    @application.job(name="again")
    def again() -> None:
        return None

    yield application
    application.close()


def _claim(app: Any, server: str, count: int, method: str = "work") -> list[Any]:
    for _ in range(count):
        app.enqueue(method)
    return app.storage.claim(worker_id=f"{server}:worker:0", server_name=f"{server}#u1",
                             queues=[], limit=count, now=utcnow())


def _settle(app: Any, ending: Ending) -> dict[str, int]:
    import threading

    never = threading.Event()
    return settle(app.storage, ending, registry=app.registry, config=ServerConfig(),
                  store=lambda items: store_outcomes(app.storage, items, aborting=never,
                                                     observed=True))


def test_settle_times_out_the_overrun_and_releases_the_rest(app: Any) -> None:
    overrun, running, unstarted = _claim(app, "h:proc0-aaaaaa", 3)
    other = _claim(app, "h:proc1-bbbbbb", 1)[0]  # a sibling's job: left alone
    ending = Ending("h:proc0-aaaaaa", -signal.SIGTERM,
                    running={(overrun.id, overrun.attempts): 1.0,
                             (running.id, running.attempts): None},
                    overran={(overrun.id, overrun.attempts)}, release_running=True)
    counts = _settle(app, ending)
    assert counts == {"timeout": 1, "lost": 0, "released": 2}
    failed = app.storage.get(overrun.id).state
    assert failed.name == "Failed" and failed.exception_type.endswith("JobTimeout")
    assert app.storage.get(running.id).state.name == "Enqueued"
    assert app.storage.get(unstarted.id).state.name == "Enqueued"
    assert app.storage.get(other.id).state.name == "Processing"


def test_settle_fails_running_attempts_of_a_crash_with_the_retry_policy(app: Any) -> None:
    (final,) = _claim(app, "h:proc0-cccccc", 1, "work")  # max_retries=0
    (retried,) = _claim(app, "h:proc0-cccccc", 1, "again")  # default policy: 3 retries
    ending = Ending("h:proc0-cccccc", -signal.SIGSEGV,
                    running={(final.id, final.attempts): None,
                             (retried.id, retried.attempts): None})
    assert _settle(app, ending) == {"timeout": 0, "lost": 2, "released": 0}
    failed = app.storage.get(final.id).state
    assert failed.name == "Failed" and "SIGSEGV" in failed.message
    assert app.storage.get(retried.id).state.name == "AwaitingRetry"


def test_settle_is_fenced_a_job_stored_meanwhile_is_untouched(app: Any) -> None:
    (job,) = _claim(app, "h:proc0-dddddd", 1)
    app.storage.requeue_stranded(started_before=utcnow(), now=utcnow())  # a peer took it
    ending = Ending("h:proc0-dddddd", -9, running={(job.id, job.attempts): None})
    assert _settle(app, ending) == {"timeout": 0, "lost": 0, "released": 0}
    assert app.storage.get(job.id).state.name == "Enqueued"


def test_worker_lost_names_signal_and_exit_code() -> None:
    assert "killed by SIGKILL, exit code -9" in str(WorkerLost(-9))
    assert "died (exit code 3)" in str(WorkerLost(3))  # the code once, not twice
    assert WorkerLost(-11).signal_name == "SIGSEGV"


def test_reporter_reports_begin_end_and_recycles_after_max_jobs() -> None:
    sent: list[tuple[Any, ...]] = []
    reasons: list[str] = []
    config = ServerConfig(max_jobs_per_child=2)
    reporter = Reporter(sent.append, config, reasons.append)

    class FakeJob:
        id, attempts, timeout_s = "j1", 1, 2.5

    assert reporter(FakeJob(), None, lambda: 7) == 7  # type: ignore[arg-type]
    assert sent[0][:4] == ("begin", "j1", 1, 2.5) and sent[1] == ("end", "j1", 1)
    assert reasons == []
    with pytest.raises(ValueError, match="boom"):
        reporter(FakeJob(), None, lambda: (_ for _ in ()).throw(ValueError("boom")))  # type: ignore[arg-type]
    assert sent[-1] == ("end", "j1", 1) and reasons == ["max_jobs_per_child=2 reached"]


def test_reporter_recycles_over_max_memory() -> None:
    reasons: list[str] = []
    reporter = Reporter(lambda _m: None, ServerConfig(max_memory_per_child=1), reasons.append)

    class FakeJob:
        id, attempts, timeout_s = "j", 1, None

    reporter(FakeJob(), None, lambda: None)  # type: ignore[arg-type]
    assert rss_mib() > 1 and "max_memory_per_child=1" in reasons[0]


def test_child_handle_finds_overdue_attempts_from_reports() -> None:
    class FakeProcess:
        pid, exitcode = 123, -15

    child = ChildHandle(slot=0, server_name="h:proc0-x", process=FakeProcess(),  # type: ignore[arg-type]
                        reports=None, control=None)  # type: ignore[arg-type]
    child._apply(("begin", "a", 1, 1.0, 100.0))
    child._apply(("begin", "b", 1, None, 100.0))
    child._apply(("begin", "c", 2, 5.0, 100.0))
    child._apply(("end", "c", 2))
    assert child.overdue(101.0) == []
    assert child.overdue(101.0 + HARD_TIMEOUT_MARGIN_S) == [("a", 1)]
    ending = child.ending(stopping=True)
    # "c" ended a moment ago: a suspect of the crash too (released here, as running ones)
    assert ending.running == {("a", 1): 1.0, ("b", 1): None, ("c", 2): 5.0}
    assert ending.release_running  # SIGTERM while the pool stops: released, not failed


def test_an_asyncio_child_gets_a_hard_timeout_margin_that_grows_with_its_slots() -> None:
    # A kill of an asyncio child restarts all its attempts in flight, and its own
    # cancellation waits behind them on the loop: the margin grows with its slots.
    assert hard_timeout_margin("threads", 500) == HARD_TIMEOUT_MARGIN_S
    assert hard_timeout_margin("asyncio", 1) == pytest.approx(HARD_TIMEOUT_MARGIN_S + 0.002)
    assert hard_timeout_margin("asyncio", 500) == pytest.approx(1.2)
    assert hard_timeout_margin("asyncio", 100_000) == 2.0  # capped

    class FakeProcess:
        pid, exitcode = 123, -15

    child = ChildHandle(slot=0, server_name="h:proc0-x", process=FakeProcess(),  # type: ignore[arg-type]
                        reports=None, control=None,  # type: ignore[arg-type]
                        margin_s=hard_timeout_margin("asyncio", 500))
    child._apply(("begin", "a", 1, 1.0, 100.0))
    assert child.overdue(101.0 + HARD_TIMEOUT_MARGIN_S) == []  # a thread child's margin
    assert child.overdue(101.0 + 1.2) == [("a", 1)]


def test_process_pool_refuses_memory_storage_and_unimportable_app() -> None:
    from qmlkit import ConfigurationError

    app = App("unit2", storage="sqlite:///unused-unit.db", autoload=False)
    with pytest.raises(ConfigurationError, match="app_spec"):
        app.server(pool="processes", app_spec="no_such_module_xyz:app")
    with pytest.raises(ConfigurationError, match="not a module-level attribute"):
        app.server(pool="processes")


def test_child_handle_suspects_an_attempt_that_ended_just_before_a_crash() -> None:
    class FakeProcess:
        pid, exitcode = 124, -11

    child = ChildHandle(slot=0, server_name="h:proc0-y", process=FakeProcess(),  # type: ignore[arg-type]
                        reports=None, control=None)  # type: ignore[arg-type]
    child._apply(("begin", "a", 1, None, 100.0))
    child._apply(("end", "a", 1))
    assert child.running == {}
    assert child.ending(stopping=False).running == {("a", 1): None}
    child.killed_at = 1.0  # killed by the supervisor: nothing is suspect
    assert child.ending(stopping=False).running == {}


def test_child_handle_forgets_ended_attempts_past_the_suspect_window_oldest_first() -> None:
    import time

    from qmlkit.processing.pools.supervisor import SUSPECT_WINDOW_S, Attempt

    class FakeProcess:
        pid, exitcode = 125, 0

    child = ChildHandle(slot=0, server_name="h:proc0-z", process=FakeProcess(),  # type: ignore[arg-type]
                        reports=None, control=None)  # type: ignore[arg-type]
    now = time.monotonic()
    # Ended in order, as reports arrive: two past the window, one inside it.
    child.ended[("old1", 1)] = (now - SUSPECT_WINDOW_S - 2.0, Attempt(None, None))
    child.ended[("old2", 1)] = (now - SUSPECT_WINDOW_S - 1.0, Attempt(None, None))
    child.ended[("recent", 1)] = (now - SUSPECT_WINDOW_S / 2, Attempt(None, None))
    child._apply(("begin", "new", 1, None, now))
    child._apply(("end", "new", 1))
    assert list(child.ended) == [("recent", 1), ("new", 1)]
