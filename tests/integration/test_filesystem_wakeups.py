"""The ``filesystem://`` transport the embedded SQLite default uses: several listeners
and publishers on one folder, which never grows, and an idle listener that does not
spin (`qmlkit.wakeup.filesystem`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qmlkit.wakeup.filesystem as fs
from qmlkit.testing import wait_until
from qmlkit.wakeup import WakeupListener, WakeupPublisher


def rows(table: Path) -> list[list[str]]:
    return list(json.loads(table.read_text() or "[]"))


def test_bindings_made_at_the_same_time_are_all_kept(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    gate = threading.Barrier(16)

    def bind(n: int) -> None:
        gate.wait()
        fs.keep_binding(control, "fs.race", f"q{n}")

    threads = [threading.Thread(target=bind, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(r[-1] for r in rows(control / "fs.race.exchange")) == sorted(
        f"q{n}" for n in range(16))


def test_listeners_in_other_processes_hear_every_wakeup_and_leave_nothing_behind(
        tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path / 'wk'}"
    listeners = []
    code = ("import sys, time; from qmlkit.wakeup import WakeupListener\n"
            f"l = WakeupListener({url!r}, lambda q: q and print(q, flush=True), 'fs.many')\n"
            "l.start(); l.connected.wait(30); print('ready', flush=True); sys.stdin.read()\n"
            "l.stop()\n")
    for _ in range(3):
        listeners.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True))
    publisher = WakeupPublisher(url, "fs.many")
    try:
        for proc in listeners:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for n in range(20):
            publisher.publish([f"queue-{n}"])
            for proc in listeners:  # each process hears each one, in turn
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == f"queue-{n}"
    finally:
        publisher.close()
        for proc in listeners:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(30)
    assert [p.returncode for p in listeners] == [0, 0, 0]
    folder = tmp_path / "wk"
    assert list((folder / "data").iterdir()) == [] and list((folder / "taken").iterdir()) == []
    assert rows(folder / "control" / "fs.many.exchange") == []  # clean stops unbind


def test_a_pruned_binding_is_put_back_at_the_next_upkeep(tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path / 'wk'}"
    heard: list[str | None] = []
    listener = WakeupListener(url, heard.append, "fs.keep", name="kept")
    listener.start()
    publisher = WakeupPublisher(url, "fs.keep")
    table = tmp_path / "wk" / "control" / "fs.keep.exchange"
    try:
        wait_until(listener.connected.is_set, timeout=10)
        fs.update_table(table, lambda _: [])  # as a prune after a long freeze would
        listener._upkeep()  # what the listener runs every UPKEEP_S
        assert len(rows(table)) == 1
        publisher.publish(["mail"])
        wait_until(lambda: "mail" in heard, timeout=10)
    finally:
        publisher.close()
        listener.stop()


def test_stale_files_of_every_kind_are_pruned(tmp_path: Path) -> None:
    data, taken, control = tmp_path / "data", tmp_path / "taken", tmp_path / "control"
    for folder in (data, taken, control):
        folder.mkdir()
    (control / "fs.x.exchange").write_text(json.dumps([["", "", "fs.x.dead"],
                                                       ["", "", "fs.x.live"]]))
    old = time.time() - fs.STALE_S - 5
    stale = [data / "1_a.fs.x.dead.msg", data / "2_b.fs.x.dead.msg.tmp", taken / "3_c.fs.x.y.msg"]
    for path in stale:
        path.write_text("{}")
        os.utime(path, (old, old))
    fresh = data / "4_d.fs.x.live.msg"
    fresh.write_text("{}")
    assert fs.prune_filesystem(data, control) == 3
    assert not any(p.exists() for p in stale) and fresh.exists()
    assert rows(control / "fs.x.exchange") == [["", "", "fs.x.live"]]


@pytest.mark.skipif(fs.watch_folder("/") is None, reason="inotify is Linux-only")
def test_an_idle_listener_waits_on_the_folder_instead_of_listing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listings = {"n": 0}
    real = os.listdir

    def counted(path: str) -> list[str]:
        if threading.current_thread().name == "qmlkit-wakeup-listen":
            listings["n"] += 1
        return real(path)

    monkeypatch.setattr(fs.os, "listdir", counted)
    heard: list[str | None] = []
    listener = WakeupListener(f"filesystem://{tmp_path / 'wk'}", heard.append, "fs.idle")
    listener.start()
    try:
        wait_until(listener.connected.is_set, timeout=10)
        before = listings["n"]
        idle_until = time.monotonic() + 1.0  # one idle second, measured
        wait_until(lambda: time.monotonic() >= idle_until, timeout=5, interval=0.1)
        # Listed on each drain timeout (POLL_S) at most, not every 2 ms (~500 a second).
        assert listings["n"] - before < 50
    finally:
        listener.stop()
