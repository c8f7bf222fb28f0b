"""Storage options are pydantic models that name the bad key."""

from __future__ import annotations

import pytest

from qmlkit.errors import ConfigurationError
from qmlkit.storage.memory import MemoryOptions, MemoryStorage
from qmlkit.storage.sql import SQLStorage
from qmlkit.storage.sql.storage import SQLOptions


def test_unknown_memory_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"memory storage: unknown option.*colour"):
        MemoryStorage.from_url("memory://", {"colour": 1})


def test_unknown_sql_option_is_named_with_the_known_ones(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=r"SQL storage: unknown option\(s\) \['colour'\]; "
                                                 r"known: .*busy_timeout_s"):
        SQLStorage.from_url(f"sqlite:///{tmp_path}/q.db", {"colour": 1})


def test_a_sql_option_of_the_wrong_type_is_named(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="pool_size='many'"):
        SQLStorage.from_url(f"sqlite:///{tmp_path}/q.db", {"pool_size": "many"})


def test_given_options_reach_the_constructor_and_defaults_stay_its_own(tmp_path) -> None:
    store = SQLStorage.from_url(f"sqlite:///{tmp_path}/q.db", {"busy_timeout_s": 2.5})
    assert store.busy_timeout_s == 2.5 and store.pool_size == 16
    assert MemoryStorage.from_url("memory://", {"max_payload_bytes": 10}).max_payload_bytes == 10


@pytest.mark.parametrize("model", [MemoryOptions, SQLOptions])
def test_options_models_forbid_extra_keys(model) -> None:
    assert model.model_config["extra"] == "forbid"
