"""Read the code blocks of a docs page with the markers that say what to do with them.

A marker is an HTML comment (invisible on the rendered page) on the line before a fence:

- ``<!-- file: NAME -->``: write the block to ``NAME``;
- ``<!-- run -->``: run each line of the block as a shell command, in order (a line
  with a ``<placeholder>`` such as ``<job-id>`` is shown, not run);
- ``<!-- output -->``: the exact standard output of the ``run`` block before it;
- ``<!-- background -->``: start the block's one command and keep it running;
- ``<!-- skip -->``: documented, not run here (installs, long examples).

An unmarked block fails `blocks`, so a new block is a choice, never forgotten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^<!--\s*(file|run|output|background|skip)(?::\s*(\S+))?\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    kind: str  # file, run, output, background, skip
    arg: str | None  # the file name for "file"
    lang: str
    text: str
    line: int  # 1-based line of the opening fence


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with its marker, in order.

    Raises:
        AssertionError: A block whose line before is not a marker (the message gives
            its line).
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        assert marker, f"{page.name}:{start + 1}: a code block with no marker before it"
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append(Block(marker.group(1), marker.group(2), fence.group(1),
                           "".join(f"{line}\n" for line in lines[start + 1:end]), start + 1))
        i = end + 1
    return found
