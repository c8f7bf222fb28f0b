"""Connection helpers of qmlkit-postgres: idle pre-ping, ending lost backends, and
telling configuration errors from outages in the server's messages."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

__all__ = ["PRE_PING_AFTER_IDLE_S", "end_backends", "first_line", "is_config_error",
           "ping_idle_connections", "with_server_options"]


def with_server_options(connect_args: Mapping[str, Any], url: sa.URL,
                        settings: str) -> dict[str, Any]:
    """``connect_args`` with ``settings`` (libpq ``options``, e.g. ``"-c name=value"``)
    appended to any ``options`` the user gave there or in the URL's query, so both apply
    from the connection's start (a later ``-c`` wins).

    Args:
        connect_args: The engine's ``connect_args`` (not changed).
        url: The engine's URL; its ``options`` query value, if any, comes first.
        settings: What to append.

    Returns:
        A new ``connect_args`` dict.
    """
    given = [url.query.get("options"), connect_args.get("options")]
    options = [o for o in given if isinstance(o, str) and o]
    return {**connect_args, "options": " ".join([*options, settings])}


def end_backends(cursor: Any, pids: list[int]) -> None:
    """Terminate those of ``pids`` still running a statement, and wait until they are gone.

    Used before a claim is retried: a statement whose connection dropped keeps running
    on the server until it notices. Terminating it rolls it back unless it has already
    committed; either way the retry then sees the final state of its rows.
    """
    if not pids:
        return
    if cursor.connection.info.server_version >= 140000:  # waits for the exit itself
        cursor.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE pid = ANY(%s) AND state <> 'idle' AND pid <> pg_backend_pid()", (pids,))
        cursor.fetchall()
        return
    cursor.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE pid = ANY(%s) AND state <> 'idle' AND pid <> pg_backend_pid()", (pids,))
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
        if cursor.fetchone()[0] == 0:
            return
        time.sleep(0.02)


def first_line(error: Any) -> str:
    """The first line of a driver error's message (or "connection failed")."""
    return (str(error).strip().splitlines() or ["connection failed"])[0]


def is_config_error(text: str) -> bool:
    """Errors that waiting will not fix: credentials, missing database or role, bad
    connection options, SSL refused."""
    text = text.lower()
    return any(part in text for part in (
        "password authentication failed", "does not exist", "no password supplied",
        "authentication failed", "invalid connection option", "invalid sslmode",
        "server does not support ssl", "invalid dsn", "invalid integer value",
        "invalid value for parameter",
    ))


#: A pooled connection idle for longer than this is pinged before use (seconds).
PRE_PING_AFTER_IDLE_S = 1.0


def ping_idle_connections(engine: sa.Engine, idle_s: float) -> None:
    """Pre-ping pooled connections that sat idle for more than ``idle_s`` seconds.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip on every checkout; a worker checks
    out a connection per batch, so this pings only connections that may have gone stale
    (the pessimistic-disconnect recipe of SQLAlchemy's pooling documentation). A dead
    one raises ``DisconnectionError``, and the pool replaces it with a fresh connection.
    Connections that break while busy are caught by the storage's retry with backoff.
    """
    @sa.event.listens_for(engine, "checkin")
    def checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["qmlkit_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("qmlkit_idle_since")
        if since is None or time.monotonic() - since < idle_s:
            return
        try:
            dbapi_connection.execute("SELECT 1")
            if not dbapi_connection.autocommit:
                dbapi_connection.rollback()
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc
