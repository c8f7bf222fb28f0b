"""The console the table-printing verbs write to (rich), apart so ``qmlkit worker`` and
``qmlkit enqueue`` never import rich."""

from __future__ import annotations

from rich.console import Console

#: stdout through rich, without highlighting; 400 columns wide when not a terminal.
console = Console(highlight=False)
if not console.is_terminal:  # piped or captured: never cut ids or names to 80 columns
    console = Console(highlight=False, width=400)
