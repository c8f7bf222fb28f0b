"""What every backend can store: the one set of input limits, checked at call time.

Each storage backend has its own edges: SQLite keeps times as a float of Unix seconds,
Redis as sorted-set scores (IEEE doubles too), PostgreSQL as ``timestamptz``;
PostgreSQL refuses NUL characters in text and enforces ``varchar`` lengths, SQLite and
Redis store both; no driver can encode a lone surrogate. qmlkit refuses, when a job is
made, every value that some backend could not store and read back exactly, so a job is
either stored identically on every backend or refused with a clear error and nothing
stored (issue 17):

- **Timestamps** (``at=``, the result of ``delay=``, a job's ``created_at`` and its state
  times) lie within `MIN_TIMESTAMP` .. `MAX_TIMESTAMP`, 1970-01-01 to the end of 2199
  (UTC). A double holds every microsecond exactly up to 2**33 s after the epoch (March
  2242), so SQLite's columns and Redis' scores round-trip each of these times to the
  microsecond; ``timestamptz`` holds far more. A far-away "never" is not a schedule:
  delete the job instead.
- **Delays and timeouts** are finite, non-negative (timeouts positive) numbers of seconds
  or ``timedelta`` values; strings, NaN and infinities are refused.
- **Job ids** (1 to `MAX_ID_LENGTH` characters), **job names and queue names** (1 to
  `MAX_NAME_LENGTH` characters) are strings with no NUL character and no lone surrogate.
- **Counters** (``priority``, ``max_retries``) fit in a signed 32-bit integer.
- **Arguments** are JSON: object keys are strings (a non-string key is refused, not
  coerced to a string, which could merge two keys into one), no NaN or infinity, no lone
  surrogate, integers of at most 4,300 digits (see `qmlkit.payload.encode_payload`).

Options are refused with `ConfigurationError`, arguments with `PayloadError`; both name
the bad field and value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from qmlkit.errors import ConfigurationError, PayloadError

if TYPE_CHECKING:
    from pydantic import ValidationError

#: Earliest timestamp a job may carry (aware UTC, inclusive): the Unix epoch.
MIN_TIMESTAMP = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: Latest timestamp a job may carry (aware UTC, inclusive): the last microsecond of 2199.
MAX_TIMESTAMP = datetime(2199, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)

#: Longest delay or timeout, in seconds: the span of the timestamp range.
MAX_SECONDS = (MAX_TIMESTAMP - MIN_TIMESTAMP).total_seconds()

#: Longest job id, in characters (the SQL schema's ``varchar(64)``).
MAX_ID_LENGTH = 64

#: Longest job name or queue name, in characters (the SQL schema's ``varchar(255)``).
MAX_NAME_LENGTH = 255

#: Largest ``priority`` / ``max_retries`` (a signed 32-bit SQL ``integer``).
MAX_INT32 = 2**31 - 1


def name_problem(value: object, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Say what makes ``value`` unusable as a job id, job name or queue name.

    Args:
        value: The candidate.
        max_length: Longest allowed length, in characters.

    Returns:
        ``None`` when every backend stores it as it is; else the reason, e.g.
        ``"contains a NUL character"``.
    """
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"is {len(value)} characters long, over the limit of {max_length}"
    if "\x00" in value:
        return "contains a NUL character, which PostgreSQL cannot store"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"is not valid Unicode (a lone surrogate "
                    f"{exc.object[exc.start:exc.end]!r} at position {exc.start})")
    return None


def check_name(value: object, field: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``value`` if it is a usable id or name; else raise naming ``field``.

    Args:
        value: The candidate queue name, job name or job id.
        field: Its name in the API, for the message (``"queue"``, ``"job_id"``, …).
        max_length: Longest allowed length, in characters.

    Returns:
        ``value`` unchanged.

    Raises:
        ConfigurationError: Not a string, empty, too long, or holding a NUL or a lone
            surrogate.
    """
    problem = name_problem(value, max_length)
    if problem is not None:
        raise ConfigurationError(f"{field} {problem}; got {_show(value)}")
    assert isinstance(value, str)  # name_problem refuses anything else
    return value


def storable_id(job_id: object) -> bool:
    """Whether some backend could hold a job with this id at all.

    An id with a NUL character or a lone surrogate can be neither stored nor even sent
    to every backend's driver, so `Storage.get` answers ``None`` for it without asking
    (length is not checked: rows stored before the limits existed stay readable).
    """
    if not isinstance(job_id, str) or "\x00" in job_id:
        return False
    if job_id.isascii():
        return True
    try:
        job_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def timestamp_problem(value: datetime) -> str | None:
    """Say why an aware datetime is outside the storable range, or ``None`` if inside."""
    if MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:
        return None
    return (f"{value.isoformat()} is outside the range every backend can store, "
            f"{MIN_TIMESTAMP.isoformat()} to {MAX_TIMESTAMP.isoformat()}")


def check_timestamp(value: object, field: str) -> datetime:
    """Return an aware datetime in UTC if it is within the storable range.

    Args:
        value: An aware datetime, any zone.
        field: Its name in the API, for the message (``"at"``, ``"delay"``, …).

    Returns:
        ``value`` converted to UTC.

    Raises:
        ConfigurationError: Not a datetime, naive, or outside `MIN_TIMESTAMP` ..
            `MAX_TIMESTAMP`.
    """
    if not isinstance(value, datetime):
        raise ConfigurationError(f"{field}= must be an aware datetime, got {_show(value)}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigurationError(
            f"{field}= must be an aware datetime (e.g. datetime.now(timezone.utc) + ...); "
            "a naive one would be read in an unknown time zone")
    try:
        utc = value.astimezone(timezone.utc)
    except OverflowError:  # e.g. datetime.max in a zone east of UTC
        raise ConfigurationError(f"{field}={value!r} cannot be expressed in UTC") from None
    problem = timestamp_problem(utc)
    if problem is not None:
        raise ConfigurationError(f"{field}={problem}")
    return utc


def seconds(value: object, field: str, *, allow_zero: bool = True) -> float:
    """Read a duration: a finite number of seconds or a ``timedelta``.

    Args:
        value: An ``int``, a ``float`` or a ``timedelta`` (``bool`` and strings are
            refused).
        field: Its name in the API, for the message (``"delay"``, ``"timeout"``).
        allow_zero: Whether zero is allowed (a delay) or not (a timeout).

    Returns:
        The duration in seconds, between 0 and `MAX_SECONDS`.

    Raises:
        ConfigurationError: Another type, NaN, infinite, negative (or zero when not
            allowed), or longer than `MAX_SECONDS`.
    """
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            s = float(value)
        except OverflowError:  # an int too big for a float
            s = math.inf
    else:
        raise ConfigurationError(
            f"{field} must be a number of seconds or a timedelta, got {_show(value)}")
    if math.isnan(s):
        raise ConfigurationError(f"{field} must be a number of seconds, got NaN")
    if allow_zero and s < 0:
        raise ConfigurationError(f"{field} must not be negative, got {value!r}")
    if not allow_zero and s <= 0:
        raise ConfigurationError(f"{field} must be positive, got {value!r}")
    if s > MAX_SECONDS:
        raise ConfigurationError(
            f"{field} of {value!r} is too long: at most {MAX_SECONDS:.0f} s (the span of "
            f"the storable time range, {MIN_TIMESTAMP.year}..{MAX_TIMESTAMP.year})")
    return s


def run_at(now: datetime, at: object = None, delay: object = None) -> datetime | None:
    """When a job made at ``now`` becomes runnable, from ``at=`` or ``delay=``.

    Args:
        now: Aware UTC, the job's creation time.
        at: An aware datetime, or ``None``.
        delay: Seconds or a ``timedelta`` from ``now``, or ``None``.

    Returns:
        The aware UTC time, or ``None`` when neither is given (run now).

    Raises:
        ConfigurationError: Both given; ``at`` naive, not a datetime or out of range; a
            bad ``delay`` (see `seconds`) or one that ends past `MAX_TIMESTAMP`.
    """
    if at is not None and delay is not None:
        raise ConfigurationError("give at= or delay=, not both")
    if at is not None:
        return check_timestamp(at, "at")
    if delay is not None:
        s = seconds(delay, "delay")
        when = now + (delay if isinstance(delay, timedelta) else timedelta(seconds=s))
        problem = timestamp_problem(when)
        if problem is not None:
            raise ConfigurationError(f"delay={delay!r} ends at {problem}")
        return when
    return None


def check_int32(value: object, field: str, *, minimum: int = -(2**31)) -> int:
    """Return ``value`` if it is an integer from ``minimum`` to `MAX_INT32`.

    Raises:
        ConfigurationError: Not an ``int`` (``bool`` is refused too), or out of range.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(f"{field} must be an integer, got {_show(value)}")
    if not minimum <= value <= MAX_INT32:
        raise ConfigurationError(f"{field} must be from {minimum} to {MAX_INT32}, got {value}")
    return value


def invalid_job(method: object, exc: ValidationError) -> ConfigurationError | PayloadError:
    """Turn a `Job` validation failure into a qmlkit error naming each bad field.

    Args:
        method: The job's name, for the message.
        exc: The pydantic error raised by building the job or its state.

    Returns:
        The error to raise (raise it ``from None``): a `PayloadError` when only the
        arguments or the metadata are to blame (e.g. a non-string key), the same error
        `qmlkit.payload.encode_payload` gives on the other paths; else a
        `ConfigurationError`.
    """
    errors = exc.errors(include_url=False)
    payload = [e for e in errors if e["loc"] and e["loc"][0] in ("args", "kwargs", "metadata")]
    if payload and len(payload) == len(errors):
        loc = payload[0]["loc"]
        if len(loc) == 3 and loc[2] == "[key]":
            return _bad_key(str(loc[0]), loc[1])
        return PayloadError(f"invalid arguments for {_show(method)}: "
                            f"{'.'.join(map(str, loc))}: {payload[0]['msg']}", where=str(loc[0]))
    parts = []
    for error in errors:
        field = ".".join(str(p) for p in error["loc"]) or "job"
        field = {"id": "job_id"}.get(field, field)
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message} (got {_show(error.get('input'))})")
    return ConfigurationError(f"invalid job for {_show(method)}: " + "; ".join(parts))


def _bad_key(where: str, key: object) -> PayloadError:
    return PayloadError(
        f"{where} has the key {key!r} of type {type(key).__name__}: JSON object keys must "
        "be strings (qmlkit refuses to convert it, since that can merge two keys and lose "
        "a value); use str keys", where=where)


# --- JSON object keys ---------------------------------------------------------------------

_CONTAINERS = (dict, list, tuple)


def check_keys(args: Sequence[Any], kwargs: Mapping[str, Any], where: str = "") -> None:
    """Refuse a non-string key anywhere in job arguments (JSON would coerce it).

    ``json`` turns ``{1: "a"}`` into ``{"1": "a"}`` silently, and ``{1: "a", "1": "b"}``
    into ``{"1": "b"}``: a value lost. Call this on values that have already encoded
    (so they hold no cycles and are not too deep). One pass over the containers, none
    over scalars: a few hundred nanoseconds for typical arguments.

    Args:
        args: Positional arguments (or any JSON list, with ``where`` naming it).
        kwargs: Keyword arguments (or any JSON object).
        where: A prefix for the path in the message (``""`` for arguments, where paths
            read ``args[0]['k']`` and ``kwargs['x']``; ``"metadata"`` for metadata).

    Raises:
        PayloadError: A key is not a string; ``where`` is the path of the object holding
            it, e.g. ``"args[0]['user']"``.
    """
    stack: list[Any] = [args, kwargs]
    pop, push = stack.pop, stack.append
    while stack:
        value = pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    _raise_bad_key(args, kwargs, where)
                if isinstance(item, _CONTAINERS):
                    push(item)
        else:
            for item in value:
                if isinstance(item, _CONTAINERS):
                    push(item)


def _raise_bad_key(args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Find the first non-string key (depth first) and raise naming its path."""
    roots: list[tuple[Any, str]] = (
        [(kwargs, where)] if where else [(list(args), "args"), (kwargs, "kwargs")])
    stack = list(reversed(roots))
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise _bad_key(path or "kwargs", key)
            stack.extend((item, f"{path}[{key!r}]") for key, item in reversed(value.items())
                         if isinstance(item, _CONTAINERS))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value)))
                         if isinstance(item, _CONTAINERS))
    raise PayloadError("a JSON object key is not a string", where=where or "payload")


def _show(value: object, limit: int = 80) -> str:
    """A short ``repr`` for messages (lone surrogates and NULs escaped)."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 1]}…"
