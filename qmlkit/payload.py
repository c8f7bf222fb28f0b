"""Job arguments and metadata as JSON: one strict encoder and one size limit for every
backend (field cases C12, C13). Re-exported by `qmlkit.job`."""

from __future__ import annotations

import json
import sys
from typing import Any

import qmlkit.limits as limits
from qmlkit.errors import PayloadError

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "encode_json", "encode_metadata", "encode_payload"]

#: Largest encoded size of a job's ``args`` plus ``kwargs``, in bytes (UTF-8 JSON).
#: The same limit applies on every backend (field case C12).
DEFAULT_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024

#: Strict compact JSON encoding (no NaN, non-ASCII kept), made once. It detects cycles
#: (``ValueError``): the error path's encoder.
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _unknown(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _fast_encoder() -> Any:
    """The C encoder behind ``_ENCODE``, made once and without its cycle check.

    ``JSONEncoder.encode`` builds a new C encoder (and a dict for the cycle check) on
    every call; this one is built once, so encoding a small value costs about half.
    Without the cycle check a cycle ends in ``RecursionError``, which `encode_payload`
    turns into the same error `_ENCODE` gives. Same output as ``_ENCODE``. ``None``
    where the interpreter has no C encoder (then ``_ENCODE`` serves)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    try:  # the arguments JSONEncoder.iterencode gives it, cycle check (markers) off
        encoder = make(None, _unknown, json.encoder.encode_basestring, None, ":", ",",
                       False, False, False) if make is not None else None
    except TypeError:  # pragma: no cover - another interpreter's signature
        encoder = None
    if encoder is None:  # pragma: no cover - CPython has it
        return None

    def encode(value: Any) -> str:
        return "".join(encoder(value, 0))

    return encode


_FAST: Any = _fast_encoder() or _ENCODE


def encode_json(value: Any, where: str) -> str:
    """Encode ``value`` as strict JSON text (no NaN, no unknown types).

    Args:
        value: What to encode.
        where: What it is, for the error: ``"args[0]"``, ``"result"``, …

    Returns:
        Compact JSON text, non-ASCII characters kept as they are.

    Raises:
        PayloadError: ``value`` (or something inside it) is not JSON-serialisable.
    """
    try:
        return _ENCODE(value)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{where} is not JSON-serialisable: {exc}", where=where) from exc


def encode_metadata(metadata: dict[str, Any], max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode a job's metadata as JSON text, checking type and size like the arguments.

    Args:
        metadata: The job's metadata (a JSON object).
        max_bytes: Largest allowed size of the UTF-8 encoding, in bytes (the storage's
            payload limit).

    Returns:
        Compact JSON text (``"{}"`` when empty).

    Raises:
        PayloadError: Not JSON-serialisable, a key that is not a string, a lone
            surrogate, or over ``max_bytes`` (``where="metadata"``).
    """
    if not metadata:
        return "{}"
    text = encode_json(metadata, "metadata")
    limits.check_keys((), metadata, "metadata")  # metadata is rare: walk it always
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise PayloadError(
            f"job metadata holds a string that is not valid Unicode "
            f"({exc.object[exc.start:exc.end]!r}, a lone surrogate)", where="metadata",
        ) from None
    if size > max_bytes:
        raise PayloadError(
            f"job metadata encodes to {size} bytes, over the limit of {max_bytes} bytes",
            where="metadata")
    return text


def encode_payload(
    args: list[Any] | tuple[Any, ...],
    kwargs: dict[str, Any],
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """Encode a job's arguments as one JSON text, checking type and size.

    Args:
        args: Positional arguments.
        kwargs: Keyword arguments (string keys).
        max_bytes: Largest allowed size of the UTF-8 encoding, in bytes.

    Returns:
        ``{"args": [...], "kwargs": {...}}`` as compact JSON text.

    Raises:
        PayloadError: An argument is not JSON-serialisable (the error names it, e.g.
            ``kwargs['fh']``), a float is NaN or infinite, an object key anywhere is not
            a string (refused, not coerced: ``{1: "a", "1": "b"}`` would lose a value;
            ``where`` is the path of the object, e.g. ``args[0]['user']``), a string
            holds a lone surrogate, the arguments are nested deeper than the
            interpreter's recursion limit, or the encoding is over ``max_bytes``.
    """
    try:
        head = _FAST(args if type(args) is list else list(args))
        # The text of _ENCODE({"args": [...], "kwargs": {...}}), built around the parts.
        text = (f'{{"args":{head},"kwargs":{_FAST(kwargs)}}}' if kwargs
                else f'{{"args":{head},"kwargs":{{}}}}')
    except (TypeError, ValueError, RecursionError) as exc:
        _explain(args, kwargs, exc)
        raise
    # A non-string key needs an object: in the arguments, or among the keyword names.
    # The test is a C scan of the text, so most calls skip the walk.
    if "{" in head or (kwargs and (text.count("{") > 2 or not all(
            type(key) is str for key in kwargs))):
        limits.check_keys(args, kwargs)
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a bad decode
            raise PayloadError(
                f"job arguments hold a string that is not valid Unicode "
                f"({exc.object[exc.start:exc.end]!r}, a lone surrogate)", where="payload",
            ) from None
    if size > max_bytes:
        raise PayloadError(
            f"job arguments encode to {size} bytes, over the limit of {max_bytes} bytes; "
            "store large data elsewhere and pass a reference",
            where="payload",
        )
    return text


def _explain(args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any],
             exc: BaseException) -> None:
    """Raise the `PayloadError` naming what in the arguments could not be encoded.

    The encoding failed with ``exc``; this encodes each argument again with the
    cycle-checking encoder, to name the first one that fails.

    Raises:
        PayloadError: The first argument that fails (``where`` e.g. ``args[1]``), or
            the arguments as a whole when they are nested too deeply to encode.
    """
    try:
        for i, arg in enumerate(args):
            encode_json(arg, f"args[{i}]")
        for key, arg in kwargs.items():
            if not isinstance(key, str):
                raise PayloadError(f"keyword {key!r} is not a string", where="kwargs")
            encode_json(arg, f"kwargs[{key!r}]")
    except RecursionError:
        pass
    if isinstance(exc, RecursionError):
        raise PayloadError("job arguments are nested too deeply to encode as JSON (about "
                           f"{sys.getrecursionlimit()} levels at most)", where="payload") from None
