"""Raw redis-py loops, no qmlkit: what one enqueue round trip costs in three shapes
(issue #16 item 2: one-by-one enqueue against Huey's).

- the writes of qmlkit-redis's single enqueue (a job hash, its queue entry, the
  ``jobs`` and state indexes, the counts) in one ``EVALSHA``, as ``enqueue_one.lua``;
- the same writes as a ``MULTI``/``EXEC`` pipeline (one round trip, no script);
- one ``LPUSH`` of one message, Huey's shape (no hash, no index).

Run: ``.venv/bin/python bench/redis_enqueue_shapes.py`` (Redis at 127.0.0.1:6379; keys
under a random prefix, deleted after). Prints, per shape, the best of 3 rounds of 5,000
calls and the client's CPU per call. No test asserts these figures.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import redis

N = 5000
SCRIPT = """
local P, id = ARGV[1], ARGV[2]
local k = P .. 'job:' .. id
if redis.call('EXISTS', k) == 1 then return {'DUP', id} end
redis.call('HSET', k, 'payload', ARGV[3], 'metadata', '{}', 'method', 'm', 'queue', 'default',
  'priority', '0', 'max_retries', '3', 'timeout_s', '', 'created_at', ARGV[4], 'attempts', '0',
  'retry_count', '0', 'state', 'Enqueued', 'state_data', ARGV[5], 'due', ARGV[4],
  'qmember', ARGV[4] .. ':' .. id)
redis.call('ZADD', P .. 'queue:default', 0, ARGV[4] .. ':' .. id)
redis.call('ZADD', P .. 'jobs', ARGV[4], id)
redis.call('ZADD', P .. 'state:Enqueued', ARGV[4], id)
redis.call('HINCRBY', P .. 'counts', 'default|Enqueued', 1)
return {'OK'}
"""
PAYLOAD = '{"args":[1],"kwargs":{}}'
STATE = json.dumps({"name": "Enqueued", "enqueued_at": "2026-12-04T20:00:00Z",
                    "queue": "default", "reason": None})


def shapes(r: redis.Redis, prefix: str) -> dict[str, Callable[[], None]]:
    """The three enqueue shapes, each one call = one job = one round trip."""
    sha = r.script_load(SCRIPT)

    def evalsha() -> None:
        now, jid = str(time.time_ns() // 1000), uuid.uuid4().hex
        r.evalsha(sha, 0, prefix, jid, PAYLOAD, now, STATE)

    def multi() -> None:
        now, jid = str(time.time_ns() // 1000), uuid.uuid4().hex
        pipe = r.pipeline(transaction=True)
        pipe.hset(prefix + "job:" + jid, mapping={
            "payload": PAYLOAD, "metadata": "{}", "method": "m", "queue": "default",
            "priority": "0", "max_retries": "3", "timeout_s": "", "created_at": now,
            "attempts": "0", "retry_count": "0", "state": "Enqueued", "state_data": STATE,
            "due": now, "qmember": now + ":" + jid})
        pipe.zadd(prefix + "queue:default", {now + ":" + jid: 0})
        pipe.zadd(prefix + "jobs", {jid: now})
        pipe.zadd(prefix + "state:Enqueued", {jid: now})
        pipe.hincrby(prefix + "counts", "default|Enqueued", 1)
        pipe.execute()

    def lpush() -> None:
        r.lpush(prefix + "huey-like", '{"id":"%s","args":[1]}' % uuid.uuid4().hex)

    return {"EVALSHA of the enqueue script": evalsha,
            "MULTI/EXEC pipeline, the same writes": multi,
            "LPUSH of one message (Huey's shape)": lpush}


def main() -> None:
    r = redis.Redis(decode_responses=True)
    prefix = "rawenq-" + uuid.uuid4().hex[:6] + ":"
    try:
        for name, call in shapes(r, prefix).items():
            for _ in range(300):  # warm-up
                call()
            best, cpu = 0.0, 0.0
            for _ in range(3):
                wall, began = time.perf_counter(), time.process_time()
                for _ in range(N):
                    call()
                rate = N / (time.perf_counter() - wall)
                if rate > best:
                    best, cpu = rate, (time.process_time() - began) / N * 1e6
            print(f"{name:40s} {best:8,.0f} /s  client CPU {cpu:5.1f} µs/call")
    finally:
        keys = list(r.scan_iter(prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])


if __name__ == "__main__":
    main()
