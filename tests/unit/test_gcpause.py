"""`qmlkit.gcpause`: the collector is held off during a bulk enqueue and comes back as it
was, across nesting, threads, errors and fork."""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Iterator

import pytest

from qmlkit import App
from qmlkit.errors import PayloadError
from qmlkit.gcpause import PAUSE_FROM, gc_paused, inserting_with_gc_paused


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    assert gc.isenabled(), "a pause was left on"
    if not was:
        gc.disable()


def test_a_pause_holds_the_collector_off_and_nests() -> None:
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused(10**6):
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause goes on
    assert gc.isenabled()


def test_fewer_jobs_than_the_threshold_pause_nothing() -> None:
    with gc_paused(PAUSE_FROM - 1):
        assert gc.isenabled()
    seen = []
    insert = inserting_with_gc_paused(lambda jobs: seen.append(gc.isenabled()) or jobs,
                                      [1] * (PAUSE_FROM - 1))
    insert([1])
    big = inserting_with_gc_paused(lambda jobs: seen.append(gc.isenabled()) or jobs,
                                   [1] * PAUSE_FROM)
    assert big([1, 2]) == [1, 2]
    assert seen == [True, False]


def test_a_collector_turned_off_by_the_program_stays_off() -> None:
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_inside_ends_the_pause() -> None:
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_concurrent_pauses_end_with_the_last() -> None:
    inside, release = threading.Barrier(3), threading.Event()
    states: list[bool] = []

    def bulk() -> None:
        with gc_paused():
            inside.wait(5)
            release.wait(5)

    threads = [threading.Thread(target=bulk) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(5)  # both threads are in their pause
    states.append(gc.isenabled())
    with gc_paused():  # a third joins and leaves while the others stay
        pass
    states.append(gc.isenabled())
    release.set()
    for t in threads:
        t.join(5)
    assert states == [False, False]
    assert gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="needs os.fork")
def test_a_child_forked_during_a_pause_has_the_collector_on() -> None:
    read, write = os.pipe()
    with gc_paused():
        pid = os.fork()
        if pid == 0:  # the child: report, and leave without running the parent's cleanup
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_enqueue_many_pauses_and_ends_the_pause_on_error(tmp_path) -> None:
    app = App("gc", storage=f"sqlite:///{tmp_path}/gc.db", autoload=False)
    seen: list[bool] = []

    @app.job(name="gc.f")
    def f(x: object) -> None:
        return None

    real = app.storage.enqueue_many

    def spy(jobs):  # the storage's insert runs inside the pause
        seen.append(gc.isenabled())
        return real(jobs)

    app.storage.enqueue_many = spy  # type: ignore[method-assign]
    try:
        f.enqueue_many([(i,) for i in range(3)])
        assert seen == [False]
        assert gc.isenabled()
        with pytest.raises(PayloadError):
            f.enqueue_many([(1,), (object(),)])
        assert gc.isenabled()
        f.enqueue(1)  # a single enqueue pauses nothing
        assert seen == [False, False, True]
    finally:
        app.close()


def test_freeze_startup_heap_freezes_what_is_alive_and_leaves_the_collector_on() -> None:
    import gc

    from qmlkit.gcpause import freeze_startup_heap

    was_on = gc.isenabled()
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 1000  # modules, classes, the test run
        assert gc.isenabled() == was_on
        later = [[]]  # made after the freeze: still tracked, still collectable
        assert gc.is_tracked(later) and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()  # the rest of the test run collects as before
