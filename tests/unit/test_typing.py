"""``mypy --strict`` on user modules: typed job functions check ``enqueue``'s arguments
against the function's signature and type ``result()`` with its return type.

``tests/typing/user_app.py`` must pass; ``tests/typing/bad_app.py`` must fail on exactly
the lines marked ``# E: <code>``, with those error codes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qmlkit.testing import skip_or_fail

TYPING = Path(__file__).resolve().parents[1] / "typing"
GOOD = TYPING / "user_app.py"
BAD = TYPING / "bad_app.py"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<text>.*)\s+\[(?P<code>[a-z-]+)\]$")


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[int, str]]]:
    """One ``mypy --strict`` run over both modules: file name -> {(line, code)}."""
    if importlib.util.find_spec("mypy") is None:
        skip_or_fail("mypy is not installed: pip install -e '.[dev]'")
    cache = tmp_path_factory.mktemp("mypy-cache")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--show-error-codes", "--no-error-summary", "--no-color-output",
         "--config-file", "", "--cache-dir", str(cache), str(GOOD), str(BAD)],
        capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode in (0, 1), done.stderr  # 2: mypy itself failed
    report: dict[str, set[tuple[int, str]]] = {GOOD.name: set(), BAD.name: set()}
    for line in done.stdout.splitlines():
        found = ERROR.match(line)
        if found:
            report[Path(found["path"]).name].add((int(found["line"]), found["code"]))
    return report


def expected_errors(path: Path) -> set[tuple[int, str]]:
    marks = (re.search(r"# E: ([a-z-]+)$", text) for text in path.read_text().splitlines())
    return {(number, mark[1]) for number, mark in enumerate(marks, start=1) if mark}


def test_a_typed_user_module_passes_mypy_strict(
        mypy_report: dict[str, set[tuple[int, str]]]) -> None:
    assert mypy_report[GOOD.name] == set()


def test_wrong_arguments_and_wrong_result_use_fail_mypy_strict_where_marked(
        mypy_report: dict[str, set[tuple[int, str]]]) -> None:
    expected = expected_errors(BAD)
    assert {code for _, code in expected} == {"arg-type", "call-arg", "assignment",
                                              "attr-defined"}
    assert mypy_report[BAD.name] == expected
