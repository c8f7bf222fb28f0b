"""``App.with_storage``: a copy of an app, the same jobs, on another storage."""

from __future__ import annotations

from pathlib import Path

from qmlkit import App


def test_the_copy_has_the_same_jobs_on_another_storage(tmp_path: Path) -> None:
    app = App("shop", storage=f"sqlite:///{tmp_path / 'a.db'}", autoload=False,
              wakeup_exchange="shop.wakeup")

    @app.job(name="shop.bill")
    def bill(n: int) -> int:
        return n

    copy = app.with_storage(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        assert copy is not app and copy.name == "shop" and copy.registry is app.registry
        # "auto" (the default) follows the copy to its storage: the folder beside b.db
        assert copy.wakeup_exchange == "shop.wakeup"
        assert copy.wakeup_url == f"filesystem://{tmp_path / 'b.db'}-wakeup"
        job_id = copy.enqueue("shop.bill", args=[3])
        assert copy.storage.get(job_id) is not None
        assert app.storage.get(job_id) is None  # the original's storage is untouched
        copy.close()
        assert app.storage.count_jobs() == {}  # closing the copy left the original open
    finally:
        copy.close()
        app.close()


def test_none_keeps_the_storage_and_its_options_and_overrides_the_wakeups(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    app = App("shop", storage=url, autoload=False, max_payload_bytes=1234)
    same = app.with_storage(None, wakeup_url="memory://", wakeup_exchange="other")
    elsewhere = app.with_storage(f"sqlite:///{tmp_path / 'b.db'}")
    given = app.with_storage(f"sqlite:///{tmp_path / 'c.db'}", options={"max_payload_bytes": 99})
    try:
        assert same.storage_options == {"max_payload_bytes": 1234}
        assert (same.wakeup_url, same.wakeup_exchange) == ("memory://", "other")
        assert app.wakeup_url == f"filesystem://{tmp_path / 'a.db'}-wakeup"
        assert app.wakeup_exchange == "qmlkit.wakeup"
        assert elsewhere.storage_options == {}  # options belong to a URL
        assert given.storage_options == {"max_payload_bytes": 99}
        job_id = app.enqueue("x.job", args=[1])
        assert same.storage.get(job_id) is not None  # the same database
    finally:
        for each in (same, elsewhere, given, app):
            each.close()
