"""`qmlkit.storage.codec.load_json`: stored JSON that no encoder takes back is refused."""

from __future__ import annotations

import pytest

from qmlkit.storage.codec import DECODE_ERRORS, load_json


@pytest.mark.parametrize("raw", [
    '{"args": ["\\ud800"], "kwargs": {}}',
    '{"args": [{"k": "x\\uDFFF"}], "kwargs": {}}',
    b'{"args": ["\\udc00\\ud800"], "kwargs": {}}',  # a pair in the wrong order
])
def test_an_escaped_lone_surrogate_is_refused_naming_the_field(raw: str | bytes) -> None:
    with pytest.raises(ValueError, match="'payload' holds an escaped lone surrogate") as info:
        load_json(raw, "payload")
    assert isinstance(info.value, DECODE_ERRORS)  # so the caller quarantines the record


def test_an_escaped_pair_and_plain_text_decode() -> None:
    assert load_json('{"a": "\\ud83d\\ude00"}', "metadata") == {"a": "\U0001f600"}
    assert load_json(b'{"args": ["\\u00e9t\\u00e9"]}', "payload") == {"args": ["été"]}


def test_bad_json_still_raises_a_decode_error() -> None:
    with pytest.raises(ValueError):
        load_json('{"args": [1', "payload")
