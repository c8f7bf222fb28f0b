"""The quickstart's in-process block, pasted as the text says, prints the job's result
(it used to end in ``AttributeError: 'Enqueued' object has no attribute 'result'``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"


def python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text(), flags=re.S)
    [block] = [b for b in blocks if containing in b]
    return block


def test_the_quickstart_in_process_server_block_prints_the_result(tmp_path: Path) -> None:
    # Given shop.py and run_here.py, pasted from the quickstart
    (tmp_path / "shop.py").write_text(python_block('app = App("shop"'))
    script = python_block("server = app.server(worker_count=8)")
    assert "# prints: sent 45" in script
    (tmp_path / "run_here.py").write_text(script)
    # When it is run as the text says
    done = subprocess.run([sys.executable, "run_here.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    # Then it prints what the text says
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "sent 45"
