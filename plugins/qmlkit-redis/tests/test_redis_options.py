"""Redis storage options and URL checks that need no server."""

from __future__ import annotations

import pytest
from qmlkit_redis.storage import RedisOptions, RedisStorage

from qmlkit.errors import ConfigurationError


@pytest.mark.parametrize("url", ["redis://127.0.0.1/abc", "rediss://:pw@127.0.0.1:6380/1x"])
def test_a_database_path_that_is_not_a_number_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="not a number") as info:
        RedisStorage(url)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1", "redis://127.0.0.1/", "redis://127.0.0.1/3",
                                 "unix:///run/redis.sock?db=2"])
def test_a_numeric_or_missing_database_is_accepted(url: str) -> None:
    assert RedisStorage(url).url == url


def test_an_option_of_the_wrong_type_is_named() -> None:
    with pytest.raises(ConfigurationError, match="max_connections='8'"):
        RedisStorage.from_url("redis://127.0.0.1/0", {"max_connections": "8"})


def test_options_model_forbids_unknown_keys() -> None:
    assert RedisOptions.model_config["extra"] == "forbid"
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['colour'\]"):
        RedisOptions.parse({"colour": "red"})


def test_a_mistyped_query_option_is_named_at_configuration_time() -> None:
    # redis-py would hand ``prefx`` to its connection class, which fails with a bare
    # TypeError at the first connection; it is refused here, with the option named.
    with pytest.raises(ConfigurationError, match=r"unknown option 'prefx'.*did you mean "
                                                 r"'prefix'") as info:
        RedisStorage("redis://:secret@127.0.0.1:6379/0?prefx=shop:")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("query", ["prefix=a:&socket_keepalive=true&client_name=x",
                                   "max_connections=4&timeout=2", "health_check_interval=5"])
def test_redis_pys_own_query_options_are_accepted(query: str) -> None:
    assert RedisStorage(f"redis://127.0.0.1:6379/0?{query}").url.endswith(query)
