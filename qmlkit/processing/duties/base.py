"""The ``Duty`` protocol and the one periodic runner every duty runs under."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime

__all__ = ["Duty", "DutyBase", "run_duty"]

log = logging.getLogger("qmlkit.processing.server")  # the logger these lines always had


class Duty(Protocol):
    """One background duty of a server: a name, when it runs, and one run."""

    # Read-only members: a class attribute (as on `DutyBase`) or an instance one will do.
    @property
    def name(self) -> str:
        """Short name; the thread is ``qmlkit-<name>``."""

    @property
    def run_at_start(self) -> bool:
        """Run once as soon as started (else wait one interval first)."""

    @property
    def failure(self) -> str:
        """What a failed run logs, e.g. ``"promoting due jobs failed"``."""

    def enabled(self, config: ServerConfig) -> bool:
        """Whether a server with ``config`` runs this duty."""

    def interval(self, runtime: Runtime) -> float:
        """The longest wait before the next run, in seconds (computed before each run)."""

    def run_once(self, runtime: Runtime) -> float | None:
        """Do the duty's work once; return a sooner wait in seconds, or ``None``.

        Raises:
            Exception: Anything; the runner logs it and runs again after the interval.
        """

    def nudge(self) -> None:
        """Cut the current wait short: run again now."""

    def pause(self, seconds: float, stopping: threading.Event) -> None:
        """Wait up to ``seconds``, less if nudged or (for some duties) stopping."""


class DutyBase:
    """What most duties share: a nudge event, and a pause that a nudge cuts short.

    A duty with ``nudgeable = False`` pauses on the server's stopping event instead,
    and ignores nudges.
    """

    name: ClassVar[str] = "duty"
    run_at_start: ClassVar[bool] = True
    failure: ClassVar[str] = "duty failed"
    nudgeable: ClassVar[bool] = True

    def __init__(self) -> None:
        self.nudged = threading.Event()

    def nudge(self) -> None:
        """See `Duty.nudge`."""
        self.nudged.set()

    def pause(self, seconds: float, stopping: threading.Event) -> None:
        """See `Duty.pause`."""
        if not self.nudgeable:
            stopping.wait(seconds)
            return
        self.nudged.wait(seconds)
        self.nudged.clear()


def run_duty(duty: Duty, runtime: Runtime) -> None:
    """Run ``duty`` until the runtime's stopping event is set (a thread's target).

    Each round computes the interval, runs the duty once (a raise is logged, never
    fatal: a duty must outlive any failure) and pauses for the interval or the sooner
    wait the run returned (never below 0). A duty whose ``through_grace`` is true runs
    until ``runtime.halted`` instead (set once a stopping server's attempts are all
    stored or released), so a draining server keeps its registry row fresh.
    """
    # A duty with ``through_grace`` (the heartbeat) runs until the server has halted.
    stopping = runtime.halted if getattr(duty, "through_grace", False) else runtime.stopping
    if not duty.run_at_start:
        duty.pause(duty.interval(runtime), stopping)
    while not stopping.is_set():
        wait = duty.interval(runtime)
        try:
            sooner = duty.run_once(runtime)
            if sooner is not None:
                wait = min(wait, max(0.0, sooner))
        except Exception as exc:  # a duty must outlive any failure
            log.warning("%s: %s: %s", duty.failure, type(exc).__name__, exc)
        if stopping.is_set():
            return
        duty.pause(wait, stopping)
