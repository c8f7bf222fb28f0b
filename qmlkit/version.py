"""The installed qmlkit-core version (a ground-floor module: it imports nothing)."""

from __future__ import annotations

__version__ = "0.1.0"
