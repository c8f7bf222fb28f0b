"""Transactions with retry: how every SQL storage statement reaches the database.

`Executor` owns a storage's engines once it is open, runs each read or write in one
transaction, and retries what a dialect calls transient (lock contention, a dropped
connection) with `qmlkit.backoff.Backoff` until the storage's ``busy_timeout_s``
deadline, then raises ``StorageUnavailable``. Hot paths run statements compiled once
per dialect and shape, executed on a DBAPI cursor (`Executor.run`): SQLAlchemy's
per-call statement building costs more than SQLite's own work for a small batch.
"""

from __future__ import annotations

import logging
import operator
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from qmlkit.backoff import Backoff
from qmlkit.errors import StorageError, StorageUnavailable

__all__ = ["RETRY_CAP_S", "RETRY_INITIAL_S", "Executor", "TransactionPolicy", "as_tuple",
           "driver_cursor"]

#: The SQL storage's logger (its name is part of the documented behaviour).
log = logging.getLogger("qmlkit.storage.sql")
T = TypeVar("T")

#: First and largest wait between retries of a busy or dropped database, in seconds.
RETRY_INITIAL_S, RETRY_CAP_S = 0.005, 0.5
_JITTER = random.Random()  # jitter, not cryptography; shared, seeded once


def as_tuple(value: Any) -> tuple[Any, ...]:
    """``itemgetter`` with one key returns a bare value; parameters need a tuple."""
    return value if isinstance(value, tuple) else (value,)


def driver_cursor(conn: Connection) -> Any:
    """A DBAPI cursor on the driver connection under ``conn``, in its transaction.

    Raises:
        sqlalchemy.exc.ResourceClosedError: ``conn`` was closed (it has no driver
            connection any more).
    """
    driver = conn.connection.driver_connection
    if driver is None:
        raise sa.exc.ResourceClosedError("the connection is closed")
    return driver.cursor()


class TransactionPolicy(Protocol):
    """What the executor asks of a dialect (`SQLDialect` provides both)."""

    def is_transient(self, exc: OperationalError) -> bool:
        """Whether an ``OperationalError`` is worth retrying."""
        ...

    def begin_raw(self, cursor: Any) -> None:
        """Start a raw write transaction on a DBAPI cursor."""
        ...


class Executor:
    """Runs a SQL storage's transactions, retrying transient errors with backoff.

    Args:
        dialect: Classifies errors (`SQLDialect.is_transient`) and starts raw
            transactions (`SQLDialect.begin_raw`).
        busy_timeout_s: How long one operation keeps retrying, in seconds.
        owner: Named (by ``repr``) in error messages and logs.
        opener: Called when an engine is needed before the storage was opened.
    """

    def __init__(self, dialect: TransactionPolicy, *, busy_timeout_s: float, owner: object,
                 opener: Callable[[], None]) -> None:
        self.dialect = dialect
        self.busy_timeout_s = busy_timeout_s
        self.owner = owner
        self._opener = opener
        self._engine: Engine | None = None
        self._autocommit: Engine | None = None
        self._sql_cache: dict[tuple[Any, ...], tuple[str, Any, dict[str, Any]]] = {}
        #: Whether the last call saw a dropped connection (for logging state changes).
        self.connection_lost = False

    # --- engines ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether engines are attached."""
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        """The transactional engine (opening the storage on first use)."""
        if self._engine is None:
            self._opener()
        assert self._engine is not None
        return self._engine

    @property
    def autocommit_engine(self) -> Engine | None:
        """The dialect's engine for single-statement autocommit calls, if it has one."""
        return self._autocommit

    def attach(self, engine: Engine, autocommit: Engine | None = None) -> None:
        """Use these engines from now on (called by the storage's ``open``)."""
        self._engine, self._autocommit = engine, autocommit

    def detach(self) -> list[Engine]:
        """Forget the engines and return them, for the caller to dispose of."""
        engines = [e for e in (self._engine, self._autocommit) if e is not None]
        self._engine = self._autocommit = None
        return engines

    # --- retry ---------------------------------------------------------------------

    def retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying lock contention and dropped connections with backoff.

        Raises:
            StorageUnavailable: A transient error outlasted ``busy_timeout_s``, or an
                ``OperationalError`` the dialect does not call transient.
            StorageError: Another driver error.
            sqlalchemy.exc.IntegrityError: Passed through (callers name the duplicate).
        """
        deadline = time.monotonic() + self.busy_timeout_s
        backoff = Backoff(RETRY_INITIAL_S, RETRY_CAP_S, rng=_JITTER)  # cheap: every call
        while True:
            delay = backoff.next()
            try:
                result = fn()
            except OperationalError as exc:
                if not self.dialect.is_transient(exc) or time.monotonic() >= deadline:
                    raise StorageUnavailable(f"{self.owner!r}: {exc.orig}") from exc
                self._note_connection_lost(exc)
                log.debug("storage busy (%s); retrying in %.3f s", exc.orig, delay)
            except IntegrityError:
                raise
            except DBAPIError as exc:
                if not exc.connection_invalidated or time.monotonic() >= deadline:
                    raise StorageError(f"{self.owner!r}: {exc.orig}") from exc
                self._note_connection_lost(exc)
            else:
                if self.connection_lost:
                    self.connection_lost = False
                    log.info("%r: connection restored", self.owner)
                return result
            time.sleep(backoff.jittered(delay))

    def _note_connection_lost(self, exc: DBAPIError) -> None:
        """Log, once per outage, that the database connection dropped (not lock contention)."""
        text = str(exc.orig).lower()
        if "locked" in text or "busy" in text or self.connection_lost:
            return
        self.connection_lost = True
        log.warning("%r: connection lost (%s); retrying with backoff", self.owner,
                    str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else exc)

    # --- transactions ------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (``BEGIN`` on SQLite); not retried by itself: wrap
        the whole read in `retry`."""
        with self.engine.connect().execution_options(qmlkit_read=True) as conn, conn.begin():
            yield conn

    def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in one write transaction, retried as `retry`."""

        def attempt() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return self.retry(attempt)

    def write_one(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(cursor)``, which issues exactly one statement, in autocommit mode if
        the dialect supplies an autocommit engine (one statement is its own transaction:
        the ``COMMIT`` round trip is saved), else as `write_raw`. ``fn`` must be safe to
        run again after a lost reply."""
        if self._engine is None:
            self._opener()
        if self._autocommit is None:
            return self.write_raw(fn)
        return self.write_raw(fn, engine=self._autocommit, commit=False)

    def write_raw(self, fn: Callable[[Any], T], *, engine: Engine | None = None,
                  commit: bool = True) -> T:
        """Run ``fn(cursor)`` in one write transaction on a pooled DBAPI connection, retried.

        The hot paths (enqueue, claim, acknowledge) use this: it skips SQLAlchemy's
        per-statement execution machinery. Driver errors are wrapped as SQLAlchemy's
        (``OperationalError``, …) so `retry` treats them like any other.

        Args:
            fn: Runs the statements on the cursor; its result is returned.
            engine: Default the transactional engine.
            commit: ``False`` on an autocommit connection.
        """
        engine = engine or self.engine
        dbapi = engine.dialect.loaded_dbapi

        def wrapped(exc: Exception) -> sa.exc.StatementError:  # a DBAPIError for driver errors
            return sa.exc.DBAPIError.instance(None, None, exc, dbapi.Error, dialect=engine.dialect)

        def attempt() -> T:
            try:  # the pool's connect errors are the driver's own: wrap them too
                raw = engine.raw_connection()
            except dbapi.Error as exc:
                raise wrapped(exc) from exc
            try:
                cursor = raw.cursor()
                try:
                    self.dialect.begin_raw(cursor)
                    result = fn(cursor)
                    if commit:
                        raw.commit()
                    return result
                except BaseException:
                    try:
                        raw.rollback()
                    except dbapi.Error:
                        raw.invalidate()
                    raise
                finally:
                    cursor.close()
            except dbapi.Error as exc:
                raise wrapped(exc) from exc
            finally:
                raw.close()  # back to the pool

        return self.retry(attempt)

    # --- compiled statements ----------------------------------------------------------

    def compiled(self, key: tuple[Any, ...], build: Callable[[], Any]
                 ) -> tuple[str, Any, dict[str, Any]]:
        """Return ``(sql, param_order, constants)``, compiling ``build()`` on first use.

        Args:
            key: Names the statement and its shape (e.g. ``("claim", 2)``).
            build: Returns the SQLAlchemy statement.
        """
        found = self._sql_cache.get(key)
        if found is None:
            compiled = build().compile(dialect=self.engine.dialect)
            order = (
                operator.itemgetter(*compiled.positiontup)
                if compiled.positional and compiled.positiontup else None
            )
            constants = {k: v for k, v in compiled.params.items() if v is not None}
            found = self._sql_cache[key] = (str(compiled), order, constants)
        return found

    def run(self, cursor: Any, key: tuple[Any, ...], build: Callable[[], Any],
            params: Any, many: bool = False) -> Any:
        """Execute a cached compiled statement on a DBAPI cursor; returns the cursor.

        Args:
            params: One mapping of bind names to values, or a list of them with ``many``.
        """
        sql, order, constants = self.compiled(key, build)
        if constants:
            params = [{**constants, **p} for p in params] if many else {**constants, **params}
        if order is not None:
            params = [as_tuple(order(p)) for p in params] if many else as_tuple(order(params))
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return cursor
