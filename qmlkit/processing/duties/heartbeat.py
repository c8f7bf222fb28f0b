"""The heartbeat duty: keep this server's registry entry fresh and reclaim dead peers' jobs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmlkit.job import utcnow
from qmlkit.processing.duties.base import DutyBase

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime

__all__ = ["HeartbeatDuty"]

log = logging.getLogger("qmlkit.processing.server")  # the logger these lines always had


class HeartbeatDuty(DutyBase):
    """Every ``heartbeat_interval``: heartbeat (registering again if a peer presumed this
    server dead), then requeue the Processing jobs of servers whose heartbeat is older
    than ``dead_server_timeout``.

    The registry entry also shows the pool's busy slots (``ServerInfo.busy``): when they
    changed since the last beat, the entry is written again (`Storage.register_server`
    replaces it), so ``qmlkit servers`` and the dashboard are at most one interval late.

    Each success is recorded in the claim ledger (`ClaimLedger.beat`), which is how a
    worker knows, without a storage round trip, that it may start its next job. Before
    each heartbeat, a beat older than the ledger's trust window (a SIGSTOP'd or cut off
    server) loses the server's claims (`ClaimLedger.check`: running attempts cancelled,
    unstarted ones not started); so does an answer that this server's row is gone
    (`ClaimLedger.presumed_dead`), before the server registers again.

    It beats through the whole grace period of ``stop()`` (``through_grace``), until
    every attempt is stored or released; only then does the server deregister. So a
    peer never presumes a draining server dead and reruns the job it is finishing.
    """

    name = "heartbeat"
    through_grace = True
    failure = "heartbeat failed"
    run_at_start = False
    nudgeable = False

    def enabled(self, config: ServerConfig) -> bool:
        """See `Duty.enabled`: ``config.enable_heartbeat``."""
        return config.enable_heartbeat

    def interval(self, runtime: Runtime) -> float:
        """See `Duty.interval`: ``heartbeat_interval``."""
        return runtime.config.heartbeat_interval.total_seconds()

    def __init__(self) -> None:
        super().__init__()
        self._published_busy: int | None = None  # the busy slots the registry shows

    def run_once(self, runtime: Runtime) -> float | None:
        """Heartbeat once (refreshing the registry's busy slots if they changed) and
        reclaim the jobs of dead servers."""
        if runtime.server_id is None:
            return None
        storage, claims = runtime.storage, runtime.claims
        if claims.check():
            log.warning("server %s: last heartbeat %.1f s ago, peers may presume it dead: "
                        "running attempts cancelled, unstarted claims dropped",
                        runtime.server_id, claims.heartbeat_age() or 0.0)
        began = claims.clock()
        now = utcnow()
        if storage.heartbeat(runtime.server_id, now=now):
            claims.beat(began)
        else:
            cancelled = claims.presumed_dead()
            log.warning("server %s was presumed dead by a peer (%d running attempt(s) "
                        "cancelled); registering again", runtime.server_id, len(cancelled))
            began = claims.clock()
            info = runtime.server_info()
            storage.register_server(info)
            claims.beat(began)
            self._published_busy = info.busy
        info = runtime.server_info()
        if info.busy != self._published_busy:  # register = replace the row, fresh beat
            storage.register_server(info)
            self._published_busy = info.busy
        changes = storage.reclaim_dead_servers(
            heartbeat_before=now - runtime.config.dead_server_timeout, now=now
        )
        if changes:
            log.warning("reclaimed %d job(s) from dead servers", len(changes))
            runtime.notify(changes)
            runtime.runnable(changes)
        return None
