"""docs/quickstart.md, followed as a new user would: every block written into the file
its text names, every command run in order in a fresh directory (the worker in the
background, as in a second terminal), and each output compared with the text's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docblocks import Block, blocks

PAGE = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"
PLACEHOLDER = re.compile(r"<[a-z-]+>")


def shell_env() -> dict[str, str]:
    """This interpreter's ``python`` and ``qmlkit`` first on PATH, no QMLKIT_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QMLKIT", "PYTEST"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_commands(block: Block, cwd: Path, env: dict[str, str]) -> str:
    out = []
    for line in block.text.splitlines():
        if not line.strip() or PLACEHOLDER.search(line):
            continue
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{PAGE.name}:{block.line}: {line}\n{proc.stdout}{proc.stderr}"
        out.append(proc.stdout)
    return "".join(out)


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    page = blocks(PAGE)
    kinds = [b.kind for b in page]
    assert "background" in kinds and kinds.count("output") >= 3
    env = shell_env()
    background: list[tuple[subprocess.Popen[str], Path]] = []
    last_output: str | None = None
    try:
        for block in page:
            if block.kind == "file":
                (tmp_path / str(block.arg)).write_text(block.text, encoding="utf-8")
            elif block.kind == "run":
                last_output = run_commands(block, tmp_path, env)
            elif block.kind == "output":
                assert last_output == block.text, (
                    f"{PAGE.name}:{block.line}: the text says\n{block.text}but it printed\n"
                    f"{last_output}")
                last_output = None
            elif block.kind == "background":
                log = tmp_path / f"background-{len(background)}.log"
                with log.open("w") as err:
                    proc = subprocess.Popen(["bash", "-c", f"exec {block.text.strip()}"],
                                            cwd=tmp_path, env=env, stdout=err, stderr=err,
                                            text=True)
                background.append((proc, log))
        for proc, log in background:
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()  # a clean drain
            assert "will not run" not in log.read_text()
    finally:
        for proc, _ in background:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_quickstart_documents_every_queue() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert "--queues '*'" in text


@pytest.mark.parametrize("page", ["quickstart.md", "testing.md"])
def test_every_block_has_a_marker(page: str) -> None:
    assert blocks(PAGE.parent / page)  # raises on an unmarked block
