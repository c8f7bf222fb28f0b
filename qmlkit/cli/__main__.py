"""``python -m qmlkit.cli``: the ``qmlkit`` command."""

from __future__ import annotations

from qmlkit.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
