"""The project keeps its promises about itself: every hook tested, every setting documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from qmlkit import hookspecs
from qmlkit.processing.server import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
               if name.startswith("qmlkit_"))


def test_every_hookspec_has_a_test_named_after_it() -> None:
    tests = (ROOT / "tests" / "integration" / "test_plugins.py").read_text()
    missing = [h for h in HOOKS if not re.search(rf"def test_hook_{h}\(", tests)]
    assert HOOKS and not missing, f"hooks without a test_hook_<name>: {missing}"


def test_every_hookspec_is_documented_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    assert [h for h in HOOKS if f"`{h}(" not in guide] == []


def test_every_server_config_field_is_documented() -> None:
    page = (ROOT / "docs" / "concepts" / "server.md").read_text()
    assert [f for f in ServerConfig.model_fields if f"`{f}`" not in page] == []
