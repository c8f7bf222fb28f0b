"""Property tests (issue 17 item 4): ``qmlkit enqueue``'s ``--args`` and ``--kwargs``.

For every generated pair of option strings (valid JSON, invalid JSON, deep nesting, huge
integers, non-string keys, lone surrogates, the wrong JSON type...) the command either
stores the job with exactly the arguments the JSON text holds and exits 0, or exits 2
with a usage error naming the option and stores nothing; no other exit, no traceback.
The command runs in-process (click's ``CliRunner``) on an app registered as a module,
on every backend (the ``app`` fixture of ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from qmlkit import App
from qmlkit.cli import main
from tests.property.test_enqueue_properties import SETTINGS, keys, same, text, total

MODULE = "qmlkit_cli_property_app"


@pytest.fixture
def cli_app(app: App, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    """An app named ``qmlkit_cli_property_app:app`` for ``qmlkit enqueue``, on each
    backend; the command closes it after each call and it reopens the same storage."""
    shared = App("cliprop", storage=app.storage, autoload=False)
    shared.job(name="prop.f")(lambda *args, **kwargs: None)
    module = types.ModuleType(MODULE)
    module.app = shared  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, MODULE, module)
    yield shared


def enqueue(args_text: str, kwargs_text: str) -> Any:
    return CliRunner().invoke(main, ["enqueue", f"{MODULE}:app", "prop.f",
                                     "--args", args_text, "--kwargs", kwargs_text])


def check(app: App, args_text: str, kwargs_text: str) -> bool:
    """Run one enqueue and check the property; return whether it was stored."""
    before = total(app)
    result = enqueue(args_text, kwargs_text)
    if result.exit_code == 2:
        assert isinstance(result.exception, SystemExit), result.exception
        out = result.output
        assert "Invalid value for" in out and ("--args" in out or "--kwargs" in out), out
        assert "Traceback" not in result.output
        assert total(app) == before
        event(f"usage error: {result.output.splitlines()[-1][:50]}")
        return False
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    job = app.storage.get(result.stdout.strip())
    assert job is not None and job.state_name == "Enqueued"
    assert same(job.args, json.loads(args_text)) and same(job.kwargs, json.loads(kwargs_text))
    assert total(app) == before + 1
    event("stored")
    return True


def dumps(value: Any, ascii_only: bool) -> str:
    """``value`` as JSON text, or its ``repr`` where JSON cannot say it (a non-string
    key, NaN): that is then invalid JSON, which is what the test wants too."""
    try:
        return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)


def nested(depth: int, opener: str, closer: str, balanced: bool) -> str:
    return opener * depth + (closer * depth if balanced else "")


#: Values to encode: odd texts and keys (lone surrogates, NUL, non-string keys), floats
#: of every kind; integers whose text Python can write (huge ones are drawn as text).
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**300), 10**300) | text
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12)

#: Option strings of any shape: encoded values, texts that may be JSON, deep brackets,
#: huge integers, escapes, and small hand-picked edge cases.
any_option = st.one_of(
    st.builds(dumps, values, st.booleans()),
    st.text(max_size=30),
    st.builds(nested, st.integers(1, 60_000), st.sampled_from("[{"), st.sampled_from("]}"),
              st.booleans()),
    st.integers(1, 6000).map(lambda n: f"[{'9' * n}]"),
    st.integers(1, 6000).map(lambda n: f'{{"n": -{"1" * n}}}'),
    st.sampled_from([
        "[]", "{}", " [ ] ", "[1e400]", "[-1e400]", "[NaN]", "[Infinity]", '{"a": -Infinity}',
        '["\\ud800"]', '{"k": "\\udfff"}', '["\\ud83d\\ude00"]', '{"\\ud800": 1}',
        "{1: 2}", "{'a': 1}", '{"a": 1, "a": 2}', '{"a": 1,}', "[1,]", "[01]", "null",
        "1", '"x"', "true", "[1] [2]", "", " ", "\x00", '["\\u0000"]', "[1.0, -0.0, 1e-320]",
        '{"": null}', "[[[[[]]]]]", '{"a": {"b": {"c": []}}}', "\ufeff[]",
    ]),
)
#: ``--args``: mostly encoded lists, so that half the examples get past the parser.
args_option = st.builds(dumps, st.lists(values, max_size=4), st.booleans()) | any_option
#: ``--kwargs``: mostly encoded objects (keys of any type: a non-string one is not JSON).
kwargs_option = (st.builds(dumps, st.dictionaries(text, values, max_size=3), st.booleans())
                 | st.builds(dumps, st.dictionaries(keys, values, max_size=3), st.booleans())
                 | any_option)


@settings(SETTINGS, max_examples=150)
@given(args_text=args_option, kwargs_text=kwargs_option)
@example(args_text='["\\ud800"]', kwargs_text="{}")  # JSON the parser takes, qmlkit refuses
@example(args_text="[]", kwargs_text='{"a": "\\udc00"}')
@example(args_text="[" * 50_000, kwargs_text="{}")  # RecursionError in the parser
@example(args_text="[" + "9" * 5000 + "]", kwargs_text="{}")  # over the digit limit
@example(args_text='["\\ud83d\\ude00", -0.0, 1e308]', kwargs_text='{"\\u00e9": [{}]}')
@example(args_text="[" * 665 + "]" * 665, kwargs_text='{"":0}')  # deep but accepted: the check must not overflow
def test_enqueue_options_store_an_exact_round_trip_or_exit_2_storing_nothing(
        cli_app, args_text, kwargs_text):
    check(cli_app, args_text, kwargs_text)


#: Values every backend stores: plain text, integers within Python's digit limit, finite
#: floats, shallow nesting.
plain_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
storable = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**300), 10**300) | plain_text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(plain_text, inner, max_size=4),
    max_leaves=12)


@settings(SETTINGS, max_examples=40)
@given(args=st.lists(storable, max_size=4),
       kwargs=st.dictionaries(plain_text, storable, max_size=3),
       ascii_only=st.booleans())
def test_storable_json_arguments_are_always_stored(cli_app, args, kwargs, ascii_only):
    # The other half of the property: the command does not refuse what it can store.
    assert check(cli_app, json.dumps(args, ensure_ascii=ascii_only),
                 json.dumps(kwargs, ensure_ascii=ascii_only))
