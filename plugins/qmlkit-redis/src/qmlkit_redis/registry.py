"""Recurring templates and the server registry of `RedisStorage`.

Each write is one Lua script (`qmlkit_redis.lua`), called through the connection's
``_script``/``_call`` with retry, like every other operation.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from qmlkit.errors import DuplicateJob
from qmlkit.job import Job
from qmlkit.recurring import RecurringJob
from qmlkit.storage.base import ServerInfo, StateChange
from qmlkit_redis.connection import RedisConnection
from qmlkit_redis.encoding import from_us, opt_us, pad, to_us

__all__ = ["RedisRegistry"]

T = TypeVar("T")


class RedisRegistry(RedisConnection):
    """The recurring-template and server-registry half of `RedisStorage`.

    Built on `RedisConnection` (its client, key prefix and scripts with retry), as
    `RedisStorage` is; the method resolution order is the same as with a mixin.
    """

    if TYPE_CHECKING:  # supplied by RedisStorage
        @staticmethod
        def _enqueued_json(now: datetime, reason: str | None) -> tuple[str, str]: ...

    # --- recurring templates ----------------------------------------------------------------

    def upsert_recurring(self, template: RecurringJob, *, keep_schedule: bool = False) -> None:
        """See `Storage.upsert_recurring`: one script, so ``keep_schedule`` is atomic."""
        self._script("UPSERT_RECURRING", [
            template.id, template.model_dump_json(), opt_us(template.next_run_at),
            opt_us(template.last_run_at), "1" if keep_schedule else "0"])

    def _template(self, definition: str, next_us: str | None, last_us: str | None) -> RecurringJob:
        template = RecurringJob.model_validate_json(definition)
        return template.model_copy(update={
            "next_run_at": from_us(next_us) if next_us else None,
            "last_run_at": from_us(last_us) if last_us else None,
        })

    def get_recurring(self, template_id: str) -> RecurringJob | None:
        """See `Storage.get_recurring`."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for name in ("recurring", "recurring-next", "recurring-last"):
                pipe.hget(self._k(name), template_id)
            return pipe.execute()

        definition, next_us, last_us = self._call(read)
        return None if definition is None else self._template(definition, next_us, last_us)

    def list_recurring(self) -> list[RecurringJob]:
        """See `Storage.list_recurring`."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            for name in ("recurring", "recurring-next", "recurring-last"):
                pipe.hgetall(self._k(name))
            return pipe.execute()

        defs, nexts, lasts = self._call(read)
        return [self._template(defs[i], nexts.get(i), lasts.get(i)) for i in sorted(defs)]

    def remove_recurring(self, template_id: str) -> bool:
        """See `Storage.remove_recurring`."""
        def write(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            for name in ("recurring", "recurring-next", "recurring-last"):
                pipe.hdel(self._k(name), template_id)
            return pipe.execute()

        return bool(self._call(write)[0])

    def fire_recurring(
        self,
        template_id: str,
        *,
        expected_next_run_at: datetime,
        next_run_at: datetime,
        job: Job | None,
    ) -> bool:
        """See `Storage.fire_recurring`: a compare-and-set script storing the tick's job."""
        values = self._new_values([job]) if job is not None else []
        out = self._script("FIRE_RECURRING", [
            template_id, to_us(expected_next_run_at), to_us(next_run_at),
            to_us(expected_next_run_at) if job is not None else "", "0",
            "1" if job is not None else "0", *values,
        ], replay=lambda a: [*a[:5], "1", *a[6:]])
        if out[0] == "DUP":
            raise DuplicateJob(out[1])
        return bool(out[0] == 1)

    # --- server registry ----------------------------------------------------------------------

    def register_server(self, info: ServerInfo) -> None:
        """See `Storage.register_server`: the row and its heartbeat in one MULTI/EXEC."""
        def write(_: int) -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._k("servers"), info.id, info.model_dump_json())
            pipe.zadd(self._k("heartbeats"), {info.id: to_us(info.last_heartbeat)})
            pipe.execute()

        self._call(write)

    def heartbeat(self, server_id: str, *, now: datetime) -> bool:
        """See `Storage.heartbeat`."""
        return bool(self._script("HEARTBEAT", [server_id, to_us(now)]))

    def deregister_server(self, server_id: str) -> None:
        """See `Storage.deregister_server`."""
        def write(_: int) -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(self._k("servers"), server_id)
            pipe.zrem(self._k("heartbeats"), server_id)
            pipe.execute()

        self._call(write)

    def list_servers(self) -> list[ServerInfo]:
        """See `Storage.list_servers`."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self._k("servers"))
            pipe.zrange(self._k("heartbeats"), 0, -1, withscores=True)
            return pipe.execute()

        rows, beats = self._call(read)
        last = {server_id: from_us(int(score)) for server_id, score in beats}
        infos = []
        for server_id, text in rows.items():
            info = ServerInfo.model_validate_json(text)
            if server_id in last:
                info = info.model_copy(update={"last_heartbeat": last[server_id]})
            infos.append(info)
        return sorted(infos, key=lambda i: i.started_at)

    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`: one script removes the rows and requeues."""
        head, tail = self._enqueued_json(now, "reclaimed")
        flat = self._script("REQUEUE", ["reclaim", to_us(heartbeat_before), pad(now), head, tail])
        return self._decode_changes(flat)


