"""The server-side Lua scripts of `qmlkit_redis.storage.RedisStorage`, from ``lua/*.lua``.

Every storage operation that must be atomic is one script: Redis runs a script to its
end before it serves any other command, so a script sees and leaves the keys in one
consistent state. The scripts ship as ``.lua`` files inside this package (read with
`importlib.resources`, so a wheel, a zip and an editable install all find them, as
Dramatiq ships its broker scripts). Each script starts with ``core.lua`` and
``index.lua`` (or ``newjob.lua`` and ``new.lua``), local helpers that keep the secondary
indexes (queue sorted sets, state indexes, per-server processing sets, counts, the due
and expiry sorted sets) in step with the job hash. Index writes are gathered and sent as
one command per key at the end of a script (``flush()``), so a batch of N jobs costs N
hash writes plus a handful of index commands; with a single job they go out at once,
which is cheaper. A single enqueue has a script of its own (``enqueue_one.lua``),
straight-line and without the helpers it does not need (making ``core.lua``'s closures
alone took some 3 µs per call, measured against 15 µs for the whole enqueue script).

Conventions: ``ARGV[1]`` is the key prefix; times are integer microseconds since the Unix
epoch, passed and stored as decimal strings (never turned into Lua numbers, whose
string form keeps only 14 digits); a queue entry is ``<16-digit enqueued µs>:<job id>``
scored by ``-priority``, so ``ZPOPMIN``/``ZRANGE`` give priority first, then FIFO.
Scripts read every key they will write before their first write where they can, so a
key of a foreign type (``WRONGTYPE``) aborts them before anything has changed. Each
file's header comment gives its ``ARGV`` and its reply.
"""

from __future__ import annotations

from importlib.resources import files

#: Fields of a job hash, in the order the scripts return them (``JOBF`` in index.lua).
JOB_FIELDS = (
    "payload", "metadata", "method", "queue", "priority", "max_retries", "timeout_s",
    "created_at", "attempts", "retry_count", "expires_at", "state", "state_data", "progress",
)


def source(name: str) -> str:
    """The text of ``lua/<name>.lua`` in this package.

    Raises:
        FileNotFoundError: No such script (a broken installation).
    """
    # One name per ``joinpath`` call: Traversable takes several only from Python 3.11.
    script = files(__package__).joinpath("lua").joinpath(f"{name}.lua")
    return script.read_text(encoding="utf-8")


#: Key prefix, gathered index writes, counts and ``flush()``: what every script needs.
CORE = source("core")
#: Moving a stored job between states with its indexes (``leave``/``enter``).
INDEX = source("index")
#: New jobs' groups of values and hash fields (``new_fields``), and the replay check.
NEWJOB = source("newjob")
#: Storing new jobs (``store_new``), for bulk enqueue and recurring ticks.
NEW = NEWJOB + source("new")
#: The helpers of the scripts that move stored jobs.
LIB = CORE + INDEX

ENQUEUE = CORE + NEW + source("enqueue")
ENQUEUE_ONE = NEWJOB + source("enqueue_one")
CLAIM = LIB + source("claim")
TRANSITION = LIB + source("transition")
CHANGE_STATE = LIB + source("change_state")
PROMOTE = LIB + source("promote")
REQUEUE = LIB + source("requeue")
DELETE_EXPIRED = LIB + source("delete_expired")
UPSERT_RECURRING = source("upsert_recurring")
FIRE_RECURRING = CORE + NEW + source("fire_recurring")
PROGRESS = source("progress")
HEARTBEAT = source("heartbeat")

#: Every script's name in this module, loaded by SHA (``EVALSHA``) on first use.
SCRIPTS = ("ENQUEUE", "ENQUEUE_ONE", "CLAIM", "TRANSITION", "CHANGE_STATE", "PROMOTE",
           "REQUEUE", "PROGRESS", "DELETE_EXPIRED", "UPSERT_RECURRING", "FIRE_RECURRING",
           "HEARTBEAT")
