"""docs/testing.md: its blocks, written into files as named, pass under pytest with the
qmlkit plugin (from the pytest11 entry point), in a subprocess as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.docblocks import blocks

PAGE = Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def test_testing_page_examples_pass(tmp_path: Path) -> None:
    files = [b for b in blocks(PAGE) if b.kind == "file"]
    assert {b.arg for b in files} >= {"billing.py", "conftest.py", "test_billing_inline.py",
                                      "test_pipeline.py"}
    for block in files:
        (tmp_path / str(block.arg)).write_text(block.text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "QMLKIT"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "error"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 passed" in proc.stdout, proc.stdout
    assert not (tmp_path / "billing.db").exists()  # the conftest's memory:// was used
