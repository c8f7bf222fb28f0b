"""``qmlkit dashboard``: its refusals through click's runner, and a real run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from qmlkit import App
from qmlkit.cli import main
from qmlkit.testing import free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_dashboard_without_its_libraries_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given an environment where FastAPI cannot be imported
    monkeypatch.setitem(sys.modules, "fastapi", None)
    result = CliRunner().invoke(main, ["dashboard", "--storage", f"sqlite:///{tmp_path}/q.db"])
    # Then the command says what to install
    assert result.exit_code == 1
    assert "pip install 'qmlkit-core[dashboard]'" in result.output


def test_dashboard_refuses_a_public_bind_without_a_token_c15(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0",
                                       "--storage", f"sqlite:///{tmp_path}/q.db"],
                                env={"QMLKIT_DASHBOARD_TOKEN": ""})
    assert result.exit_code == 1
    assert "not loopback" in result.output and "QMLKIT_DASHBOARD_TOKEN" in result.output


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_dashboard_command_serves_with_the_token_from_the_environment(tmp_path: Path) -> None:
    # Given a store with a job
    url = f"sqlite:///{tmp_path}/q.db"
    app = App("cli", storage=url, autoload=False)
    app.enqueue("cli.job", queue="mail")
    app.close()
    port = free_port()
    env = {**os.environ, "QMLKIT_DASHBOARD_TOKEN": "tok-123", "QMLKIT_STORAGE": url,
           "PYTHONPATH": str(REPO_ROOT)}
    # When `qmlkit dashboard` runs with its settings from the environment
    proc = subprocess.Popen([sys.executable, "-m", "qmlkit.cli", "dashboard", "--port", str(port),
                             "--read-only"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(f"{base}/static/dashboard.js")[0] == 200 or proc.poll() is not None,
                   timeout=30, message="dashboard up")
        assert proc.poll() is None
        # Then it asks for the token, and with it shows the store's counts
        assert get(f"{base}/api/stats")[0] == 401
        status, body = get(f"{base}/api/stats", token="tok-123")
        assert status == 200
        assert json.loads(body)["queues"]["mail"]["Enqueued"] == 1
        assert "read-only" in get(f"{base}/", token="tok-123")[1]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert "qmlkit dashboard on http://127.0.0.1:" in output
    assert "tok-123" not in output
