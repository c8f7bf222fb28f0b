"""The Lua scripts ship as package files and agree with the Python side."""

from __future__ import annotations

import re
from importlib.resources import files

from qmlkit_redis import lua


def test_every_script_is_a_packaged_lua_file():
    shipped = {p.name for p in files("qmlkit_redis").joinpath("lua").iterdir()}
    expected = {f"{name.lower()}.lua" for name in lua.SCRIPTS} | {
        "core.lua", "index.lua", "newjob.lua", "new.lua"}
    assert shipped == expected
    for name in lua.SCRIPTS:
        assert getattr(lua, name).endswith(lua.source(name.lower()))


def test_job_fields_in_lua_match_python():
    found = re.search(r"local JOBF = \{([^}]*)\}", lua.INDEX)
    assert found is not None
    assert tuple(f.strip().strip("'") for f in found.group(1).split(",")) == lua.JOB_FIELDS
