"""What the Redis backend adds to the shared contract: URLs and prefixes, bad input,
idempotent replays, and index hygiene after cleanup (field case C17)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from qmlkit_redis.storage import ForeignKeyType, RedisStorage, to_us

from qmlkit import App
from qmlkit.errors import ConfigurationError, StorageError, StorageUnavailable
from qmlkit.job import Deleted, Failed, Processing, Scheduled, Succeeded, utcnow
from qmlkit.plugins import make_plugin_manager, resolve_storage
from qmlkit.storage.base import Transition
from qmlkit.testing import RedisProcess, free_port, make_job, require_service, wait_until

pytestmark = [pytest.mark.redis]


def open_storage(url: str, **options: object) -> RedisStorage:
    store = resolve_storage(make_plugin_manager(), url, options)
    assert isinstance(store, RedisStorage)
    store.open()
    return store


@pytest.fixture
def storage(redis_url):
    store = open_storage(redis_url)
    yield store
    store.close()


@pytest.fixture
def raw():
    client = redis.Redis(host="127.0.0.1", port=6379, db=0, decode_responses=True)
    yield client
    client.close()


def keys_under(raw: redis.Redis, prefix: str) -> set[str]:
    return set(raw.scan_iter(match=f"{prefix}*", count=1000))


# --- URLs, discovery, prefixes -------------------------------------------------------------


def test_every_scheme_resolves_through_the_entry_point():
    pm = make_plugin_manager()
    for url in ("redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/0",
                "unix:///run/redis.sock?db=0"):
        assert isinstance(resolve_storage(pm, url, {}), RedisStorage)
    assert {"redis", "rediss", "unix"} <= {
        s for found in pm.hook.qmlkit_storage_schemes() for s in found}


def test_prefix_comes_from_the_url_or_the_option_and_leaves_the_url_for_redis():
    store = RedisStorage("redis://127.0.0.1:6379/0?prefix=app1:&socket_keepalive=true")
    assert store.prefix == "app1:"
    assert "prefix" not in store._redis_url and "socket_keepalive=true" in store._redis_url
    assert RedisStorage("redis://h/0?prefix=a:", prefix="b:").prefix == "b:"
    assert RedisStorage("redis://h/0").prefix == "qmlkit:"


def test_unknown_option_is_named():
    with pytest.raises(ConfigurationError, match="colour"):
        resolve_storage(make_plugin_manager(), "redis://127.0.0.1/0", {"colour": "red"})


def test_everything_stays_under_the_prefix(own_redis, redis_prefix):
    # On a Redis of the test's own: on the shared one, other sessions write meanwhile.
    storage = open_storage(f"{own_redis.url}?prefix={redis_prefix}")
    raw = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        storage.enqueue_many([make_job(queue=q) for q in ("a", "b")])
        now = utcnow()
        storage.enqueue(make_job(state=Scheduled(enqueue_at=now, scheduled_at=now),
                                 expires_at=now + timedelta(days=1)))  # the one-job script
        storage.claim(worker_id="w", server_name="s", queues=(), limit=1, now=now)
        keys = set(raw.scan_iter(count=1000))
        assert keys and all(key.startswith(redis_prefix) for key in keys)
    finally:
        raw.close()
        storage.close()


def test_two_prefixes_on_one_redis_do_not_see_each_other(redis_url, redis_prefix):
    other = open_storage(redis_url, prefix=redis_prefix + "other:")
    mine = open_storage(redis_url)
    try:
        mine.enqueue(make_job())
        assert other.count_jobs() == {}
        assert other.claim(worker_id="w", server_name="s", queues=(), limit=5, now=utcnow()) == []
    finally:
        mine.close()
        other.close()


# --- bad input -----------------------------------------------------------------------------


def test_a_unix_socket_url_with_a_prefix_works(tmp_path):
    if not RedisProcess.available():
        require_service("redis-server binary", "127.0.0.1", 1)  # skips locally, fails in CI
    sock = tmp_path / "redis.sock"
    server = RedisProcess(tmp_path, extra_args=["--unixsocket", str(sock), "--unixsocketperm",
                                                "700"])
    server.start()
    try:
        store = open_storage(f"unix://{sock}?db=0&prefix=sock:")
        try:
            store.enqueue(make_job())
            assert len(store.claim(worker_id="w", server_name="s", queues=(), limit=5,
                                   now=utcnow())) == 1
        finally:
            store.close()
    finally:
        server.stop()


def test_a_password_in_the_query_string_is_masked_everywhere(redis_url):
    url = redis_url.replace("127.0.0.1:6379", f"127.0.0.1:{free_port()}") + "&password=QUERY-SECRET"
    store = RedisStorage(url, connect_timeout_s=0.5, retry_timeout_s=0.5)
    assert "QUERY-SECRET" not in repr(store)
    with pytest.raises(StorageUnavailable) as info:  # nothing listens there
        store.open()
    assert "QUERY-SECRET" not in str(info.value)


def test_a_port_that_is_not_redis_is_named_at_open():
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_like_http() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_like_http, daemon=True).start()
    try:
        with pytest.raises(ConfigurationError,
                           match=f"127.0.0.1:{port} does not answer as a Redis"):
            RedisStorage(f"redis://127.0.0.1:{port}/0", connect_timeout_s=2).open()
    finally:
        listener.close()


def test_unreachable_host_fails_at_open_naming_host_and_port():
    port = free_port()
    store = RedisStorage(f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.5)
    with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{port}"):
        store.open()


def test_wrong_password_fails_at_open_naming_host_and_port_never_the_password(tmp_path):
    if not RedisProcess.available():
        require_service("redis-server binary", "127.0.0.1", 1)  # skips locally, fails in CI
    server = RedisProcess(tmp_path, extra_args=["--requirepass", "right-one"])
    server.start()
    try:
        for url in (f"redis://:not-the-pass@127.0.0.1:{server.port}/0",
                    f"redis://127.0.0.1:{server.port}/0"):
            with pytest.raises(ConfigurationError) as info:
                open_storage(url)
            text = str(info.value)
            assert f"127.0.0.1:{server.port}" in text
            assert "not-the-pass" not in text and "right-one" not in text
        store = open_storage(f"redis://:right-one@127.0.0.1:{server.port}/0")
        assert "right-one" not in repr(store)
        store.close()
    finally:
        server.stop()


def test_a_foreign_fixed_key_is_reported_at_open(redis_url, raw, redis_prefix):
    raw.set(f"{redis_prefix}counts", "someone else's")
    with pytest.raises(ForeignKeyType) as info:
        open_storage(redis_url)
    assert info.value.key == f"{redis_prefix}counts"
    assert (info.value.found, info.value.expected) == ("string", "hash")
    assert "prefix" in str(info.value)


def test_a_foreign_queue_key_is_reported_by_claim_and_changes_nothing(storage, raw, redis_prefix):
    storage.enqueue(make_job(queue="good"))
    raw.set(f"{redis_prefix}queue:theirs", "x")
    with pytest.raises(ForeignKeyType) as info:
        storage.claim(worker_id="w", server_name="s", queues=("theirs",), limit=5, now=utcnow())
    assert info.value.key == f"{redis_prefix}queue:theirs"
    assert storage.count_jobs() == {("good", "Enqueued"): 1}
    # A worker serving other queues is not disturbed.
    assert len(storage.claim(worker_id="w", server_name="s", queues=("good",), limit=5,
                             now=utcnow())) == 1


def test_a_foreign_key_where_a_job_should_be_is_reported_by_get(storage, raw, redis_prefix):
    raw.set(f"{redis_prefix}job:abc", "x")
    with pytest.raises(StorageError, match=f"{redis_prefix}job:abc"):
        storage.get("abc")


def test_an_undecodable_job_fails_alone_with_a_reason(storage, raw, redis_prefix):
    bad, good = make_job(), make_job()
    storage.enqueue_many([bad, good])
    raw.hset(f"{redis_prefix}job:{bad.id}", "payload", "{not json")
    assert storage.get(bad.id).state.name == "Failed"
    claimed = storage.claim(worker_id="w", server_name="s", queues=(), limit=5, now=utcnow())
    assert [j.id for j in claimed] == [good.id]
    stored = raw.hgetall(f"{redis_prefix}job:{bad.id}")
    assert stored["state"] == "Failed" and "cannot be decoded" in stored["state_data"]


def test_a_hand_edited_time_fails_that_job_not_the_batch(storage, raw, redis_prefix):
    # Redis does not undo a script that fails half way: one bad field must not leave a
    # whole claimed batch in Processing with no server holding it.
    jobs = [make_job(args=[i]) for i in range(10)]
    storage.enqueue_many(jobs)
    raw.hset(f"{redis_prefix}job:{jobs[3].id}", "created_at", "not-a-time")
    claimed = storage.claim(worker_id="w", server_name="s", queues=(), limit=10, now=utcnow())
    assert sorted(j.args[0] for j in claimed) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert storage.get(jobs[3].id).state.name == "Failed"  # quarantined, with the reason
    held = raw.smembers(f"{redis_prefix}processing:s")
    assert held == {j.id for j in claimed}
    storage.change_state(jobs[3].id, Deleted(deleted_at=utcnow()))  # it can be removed


def test_a_foreign_processing_key_fails_the_claim_before_any_change(storage, raw, redis_prefix):
    storage.enqueue_many([make_job() for _ in range(3)])
    raw.set(f"{redis_prefix}processing:s", "theirs")
    with pytest.raises(ForeignKeyType) as info:
        storage.claim(worker_id="w", server_name="s", queues=(), limit=5, now=utcnow())
    assert info.value.key == f"{redis_prefix}processing:s"
    assert storage.count_jobs() == {("default", "Enqueued"): 3}
    assert len(storage.claim(worker_id="w", server_name="other", queues=(), limit=5,
                             now=utcnow())) == 3


# --- replays after a lost reply -------------------------------------------------------------


def test_an_acknowledgement_applied_twice_is_not_reported_stale(storage):
    storage.enqueue(make_job())
    (job,) = storage.claim(worker_id="w", server_name="s", queues=(), limit=1, now=utcnow())
    item = Transition(job, Succeeded(succeeded_at=utcnow(), duration_ms=1.0, result=1))
    first = storage.transition_many([item])
    again = storage.transition_many([item])  # the retry after a lost reply
    assert first[0].state.name == again[0].state.name == "Succeeded"
    # A different outcome with the same token is still refused.
    other = Transition(job, Failed(failed_at=utcnow(), exception_type="E", message="m"))
    assert isinstance(storage.transition_many([other])[0], StorageError)


def test_a_claim_replayed_after_a_lost_reply_hands_back_the_same_jobs(storage):
    storage.enqueue_many([make_job() for _ in range(5)])
    now = utcnow()
    first = storage.claim(worker_id="w1", server_name="s", queues=(), limit=3, now=now)
    # As if that reply had been lost: the worker's next claim presents the same claim again.
    state = Processing(started_at=now, worker_id="w1", server_name="s")
    storage._pending_claims[("s", "w1")] = [3, str(to_us(now)), "s", state.model_dump_json(),
                                            "0"]
    again = storage.claim(worker_id="w1", server_name="s", queues=(), limit=3, now=utcnow())
    assert sorted((j.id, j.attempts) for j in again) == sorted((j.id, j.attempts) for j in first)
    assert storage.count_jobs() == {("default", "Processing"): 3, ("default", "Enqueued"): 2}
    # With nothing left from that claim, a replay claims afresh.
    storage.transition_many([Transition(j, Succeeded(succeeded_at=now, duration_ms=1))
                             for j in again])
    storage._pending_claims[("s", "w1")] = [3, str(to_us(now)), "s", state.model_dump_json(),
                                            "0"]
    assert len(storage.claim(worker_id="w1", server_name="s", queues=(), limit=3,
                             now=utcnow())) == 2


def test_a_state_change_retried_after_a_lost_reply_is_applied_once(storage):
    job = storage.enqueue(make_job())
    deleted = Deleted(deleted_at=utcnow(), reason="by hand")
    args = [job.id, job.state.model_dump_json(), "0", "Deleted", deleted.model_dump_json(),
            "", "", ""]
    assert storage._script("CHANGE_STATE", args) == 1
    assert storage._script("CHANGE_STATE", args) == 1  # the retry finds it applied
    assert storage.count_jobs() == {("default", "Deleted"): 1}
    assert storage.get(job.id).state == deleted


@pytest.mark.parametrize("n", [1, 3])
def test_a_retried_enqueue_finds_its_jobs_stored(storage, n):
    jobs = [make_job(args=[i]) for i in range(n)]
    script = "ENQUEUE_ONE" if n == 1 else "ENQUEUE"  # what enqueue_many calls
    values = storage._new_values(jobs)
    storage._script(script, ["0", *values])
    assert storage._script(script, ["1", *values]) == ["OK"]  # the replay
    assert storage._script(script, ["0", *values])[0] == "DUP"
    # Another job with a stored id is a duplicate, replay or not.
    other = storage._new_values([jobs[-1]._replace(args=["other"])])
    assert storage._script(script, ["1", *other]) == ["DUP", jobs[-1].id]
    assert storage.count_jobs() == {("default", "Enqueued"): n}
    assert [storage.get(j.id).args for j in jobs] == [j.args for j in jobs]


# --- cleanup leaves no index entries behind (C17) --------------------------------------------


def test_delete_expired_leaves_no_index_entry_of_a_deleted_job_c17(storage, raw, redis_prefix):
    now = utcnow()
    past = now - timedelta(minutes=10)
    storage.enqueue_many([make_job(args=[i], queue=f"q{i % 3}") for i in range(300)])
    claimed = []
    for n in range(3):
        claimed += storage.claim(worker_id=f"w{n}", server_name=f"srv{n}", queues=(), limit=100,
                                 now=now)
    big = "e" * 100_000
    outcomes = [
        Transition(j, Failed(failed_at=now, exception_type="E", message=big), expires_at=past)
        if k % 2 else
        Transition(j, Succeeded(succeeded_at=now, duration_ms=1), expires_at=past)
        for k, j in enumerate(claimed[:200])
    ]
    storage.transition_many(outcomes)
    kept = {j.id for j in claimed[200:]}  # still Processing: never removed
    deleted = {j.id for j in claimed[:200]}
    while storage.delete_expired(now=now, limit=64) == 64:
        pass
    for job_id in deleted:
        assert storage.get(job_id) is None
    # Scan every key under the prefix: no member of any zset, set or hash names a deleted job.
    for key in keys_under(raw, redis_prefix):
        kind = raw.type(key)
        if kind == "zset":
            members = set(raw.zrange(key, 0, -1))
        elif kind == "set":
            members = raw.smembers(key)
        elif kind == "hash" and not key.startswith(f"{redis_prefix}job:"):
            members = set(raw.hkeys(key))
        else:
            continue
        names = {m.rpartition(":")[2] for m in members} | members
        assert not names & deleted, f"{key} still references deleted jobs"
        assert not key.endswith(tuple(deleted))
    assert sum(storage.count_jobs().values()) == 100
    assert {j.id for j in storage.list_jobs(limit=1000)} == kept


def test_app_drains_on_redis_end_to_end(redis_url):
    app = App("e2e", storage=redis_url)
    seen: list[int] = []

    @app.job(name="add")
    def add(i: int) -> int:
        seen.append(i)
        return i

    add.enqueue_many([(i,) for i in range(200)])
    server = app.server(worker_count=2, polling_interval=0.05)
    server.start()
    try:
        wait_until(lambda: server.storage.count_jobs() == {("default", "Succeeded"): 200},
                   timeout=60)
    finally:
        server.stop()
    assert sorted(seen) == list(range(200))
    app.close()
