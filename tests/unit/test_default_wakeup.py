"""``wakeup_url="auto"``: what each storage offers, and how an explicit setting wins.

Resolution builds kombu connection objects but connects to nothing, so these need no
running service (the plugin packages must be installed, as the README's command does).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qmlkit import App, ServerConfig
from qmlkit.errors import ConfigurationError
from qmlkit.storage.capabilities import DefaultWakeup, WakeupProvider, default_wakeup
from qmlkit.storage.memory import MemoryStorage
from qmlkit.storage.sql import SQLStorage
from qmlkit.wakeup import AUTO, resolve_wakeup, wakeup_setting
from tests.conftest import require_plugin


def test_sqlite_offers_a_folder_beside_its_file(tmp_path: Path) -> None:
    store = SQLStorage(f"sqlite:///{tmp_path / 'shop.db'}")
    assert isinstance(store, WakeupProvider)
    assert default_wakeup(store) == DefaultWakeup(f"filesystem://{tmp_path}/shop.db-wakeup")
    url, exchange = resolve_wakeup(AUTO, "qmlkit.wakeup", store)
    assert (url, exchange) == (f"filesystem://{tmp_path}/shop.db-wakeup", "qmlkit.wakeup")
    assert (tmp_path / "shop.db-wakeup" / "data").is_dir()  # made when first resolved


def test_a_folder_path_that_needs_escaping_round_trips(tmp_path: Path) -> None:
    odd = tmp_path / "a b%c#d"
    odd.mkdir()
    url, _ = resolve_wakeup(AUTO, "qmlkit.wakeup", SQLStorage(f"sqlite:///{odd / 'x.db'}"))
    assert url is not None and "%25" in url and "%23" in url
    assert (odd / "x.db-wakeup" / "data").is_dir()


def test_memory_storage_offers_nothing_and_servers_poll() -> None:
    assert default_wakeup(MemoryStorage()) is None
    assert resolve_wakeup(AUTO, "qmlkit.wakeup", MemoryStorage()) == (None, "qmlkit.wakeup")
    app = App("m", storage="memory://", autoload=False)
    assert app.wakeup_url is None
    server = app.server()
    assert server.config.wakeup_url is None


def test_redis_offers_its_own_server_on_an_exchange_of_its_prefix() -> None:
    require_plugin("qmlkit_redis", "qmlkit-redis")
    from qmlkit_redis.storage import RedisStorage

    store = RedisStorage("rediss://:secret@cache.example:6380/2?prefix=shop:&ssl_cert_reqs=none"
                         "&health_check_interval=5")
    assert default_wakeup(store) == DefaultWakeup(
        "rediss://:secret@cache.example:6380/2?ssl_cert_reqs=none", scope="shop:")
    assert resolve_wakeup(AUTO, "qmlkit.wakeup", store) == (
        "rediss://:secret@cache.example:6380/2?ssl_cert_reqs=none", "qmlkit.wakeup.shop:")
    unix = RedisStorage("unix:///run/redis.sock?db=3")
    assert default_wakeup(unix) == DefaultWakeup("redis+socket:///run/redis.sock",
                                                 scope="qmlkit:")


def test_postgres_offers_listen_notify_on_an_exchange_of_its_schema() -> None:
    require_plugin("qmlkit_postgres", "qmlkit-postgres")
    from qmlkit_postgres.storage import PostgresStorage

    store = PostgresStorage("postgresql://u:p%40ss@db.example:5433/shop?schema=billing"
                            "&sslmode=require")
    offer = default_wakeup(store)
    assert offer == DefaultWakeup(
        "pgnotify+postgresql://u:p%40ss@db.example:5433/shop?sslmode=require", scope="billing")
    url, exchange = resolve_wakeup(AUTO, "qmlkit.wakeup", store)
    assert (url, exchange) == (offer.url, "qmlkit.wakeup.billing")


def test_an_explicit_url_wins_and_none_turns_them_off(tmp_path: Path) -> None:
    store = SQLStorage(f"sqlite:///{tmp_path / 'shop.db'}")
    assert resolve_wakeup("memory://", "mine", store) == ("memory://", "mine")
    assert resolve_wakeup(None, "mine", store) == (None, "mine")
    assert not (tmp_path / "shop.db-wakeup").exists()
    with pytest.raises(ConfigurationError, match="nosuch"):
        resolve_wakeup("nosuch://x", "mine", store)


def test_servers_resolve_auto_against_their_own_storage(tmp_path: Path) -> None:
    app = App("shop", storage=f"sqlite:///{tmp_path / 'a.db'}", autoload=False)
    assert ServerConfig().wakeup_url == AUTO
    here = app.server()
    there = app.server(storage_url=f"sqlite:///{tmp_path / 'b.db'}")
    off = app.server(wakeup_url=None)
    try:
        assert here.config.wakeup_url == f"filesystem://{tmp_path}/a.db-wakeup"
        assert there.config.wakeup_url == f"filesystem://{tmp_path}/b.db-wakeup"
        assert off.config.wakeup_url is None
    finally:
        app.close()


def test_an_app_with_wakeups_off_writes_no_folder_and_opens_no_publisher(
        tmp_path: Path) -> None:
    app = App("shop", storage=f"sqlite:///{tmp_path / 'a.db'}", autoload=False, wakeup_url=None)
    try:
        app.enqueue("x.job")
        assert app.wakeup_url is None and app._publisher is None
        assert not (tmp_path / "a.db-wakeup").exists()
        assert app.server().config.wakeup_url is None  # the app's setting reaches its servers
    finally:
        app.close()


def test_an_unusable_default_channel_is_logged_and_left_to_polling(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.db-wakeup").write_text("a file where the folder would go")
    app = App("shop", storage=f"sqlite:///{tmp_path / 'a.db'}", autoload=False)
    try:
        with caplog.at_level(logging.WARNING, logger="qmlkit.wakeup"):
            job_id = app.enqueue("x.job")  # never fails for a hint channel
            server = app.server()
        assert app.storage.get(job_id) is not None
        assert app.wakeup_url is None and server.config.wakeup_url is None
        assert "workers poll instead" in caplog.text and "a.db-wakeup" in caplog.text
    finally:
        app.close()


@pytest.mark.parametrize(("text", "setting"), [
    ("none", None), ("Off", None), ("auto", AUTO), ("AUTO", AUTO),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_command_line_spellings(text: str, setting: str | None) -> None:
    assert wakeup_setting(text) == setting



def test_a_server_whose_folder_went_unusable_before_start_still_starts_and_polls(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil
    from datetime import timedelta

    from qmlkit.testing import wait_until

    app = App("shop", storage=f"sqlite:///{tmp_path / 'a.db'}", autoload=False)
    done: list[int] = []

    @app.job(name="shop.note")
    def note(n: int) -> None:
        done.append(n)

    server = app.server(polling_interval=timedelta(seconds=0.1), log_attempts=False)
    folder = tmp_path / "a.db-wakeup"
    shutil.rmtree(folder)  # made when the server was configured; gone, and unmakeable
    folder.write_text("a file now")
    with caplog.at_level(logging.WARNING, logger="qmlkit.wakeup"):
        server.start()
    try:
        assert server._listener is None and "wake-ups off for this server" in caplog.text
        note.enqueue(1)
        wait_until(lambda: done == [1], timeout=10)
    finally:
        server.stop()
        app.close()
