"""URL helpers: masking secrets for logs and reprs."""

from __future__ import annotations

import pytest

from qmlkit.config import mask_url


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
    ("redis://host/0?password=s3cret&prefix=a", "redis://host/0?password=***&prefix=a"),
    ("postgresql://h/db?sslmode=require&PASSWORD=s3cret", "postgresql://h/db?sslmode=require&PASSWORD=***"),
    ("redis://:s3cret@[::1:6379/0", "redis://***@[::1:6379/0"),  # unparsable: masked anyway
    ("unix:///tmp/redis.sock?password=s3cret", "unix:///tmp/redis.sock?password=***"),
    ("sqlite:///var/lib/app/q.db", "sqlite:///var/lib/app/q.db"),
    ("memory://", "memory://"),
])
def test_mask_url_hides_every_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert "s3cret" not in mask_url(url)
