"""qmlkit hooks of the example plugin. Importing this module stays cheap.

- Storage: the URL scheme ``example-memory://`` gives an in-process storage.
- Middleware: on enqueue, stamp ``metadata["tenant"]`` (from ``EXAMPLE_TENANT``); on
  execution, read it back and record one line per attempt.
- Observer: record every committed state change.

Records go to the file named by ``QMLKIT_EXAMPLE_LOG``, one JSON object per line, so a
test (or you) can see what ran, in which process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qmlkit import hookimpl

SCHEMES = ("example-memory",)


def _record(**fields: Any) -> None:
    path = os.environ.get("QMLKIT_EXAMPLE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as out:  # one short line: appends stay whole
            out.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


@hookimpl
def qmlkit_storage_schemes() -> Sequence[str]:
    """The schemes ``qmlkit_storage`` below answers."""
    return SCHEMES


@hookimpl
def qmlkit_storage(url: str, options: Mapping[str, Any]) -> Any:
    """An in-process storage for ``example-memory://``; ``None`` for other schemes."""
    if url.partition("://")[0] not in SCHEMES:
        return None
    from qmlkit.storage.memory import MemoryStorage  # heavy imports only when chosen

    return MemoryStorage(url, **options)


def stamp_tenant(jobs: list[Any], call_next: Callable[[list[Any]], list[str]]) -> list[str]:
    """Enqueue middleware: stamp the tenant onto every job's metadata."""
    tenant = os.environ.get("EXAMPLE_TENANT", "default-tenant")
    stamped = [job.model_copy(update={"metadata": {**job.metadata, "tenant": tenant}})
               for job in jobs]
    return call_next(stamped)


def record_attempt(job: Any, context: Any, call_next: Callable[[], Any]) -> Any:
    """Execution middleware: record the attempt and the tenant it carries."""
    _record(event="attempt", job_id=job.id, method=job.method,
            tenant=job.metadata.get("tenant"), attempt=context.attempt)
    return call_next()


@hookimpl
def qmlkit_enqueue_middleware(config: Mapping[str, Any]) -> Sequence[Any]:
    """Client side: stamp the tenant."""
    return [stamp_tenant]


@hookimpl
def qmlkit_middleware(config: Mapping[str, Any]) -> Sequence[Any]:
    """Worker side: record attempts."""
    return [record_attempt]


@hookimpl
def qmlkit_job_state_changed(job: Any, previous: Any, current: Any) -> None:
    """Record each committed change as ``previous -> current``."""
    _record(event="state", job_id=job.id,
            previous=previous.name if previous is not None else None, current=current.name)
