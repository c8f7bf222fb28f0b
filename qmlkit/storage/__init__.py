"""Storage: the contract (`qmlkit.storage.base`) and the built-in backends."""

from __future__ import annotations

from qmlkit.storage.base import ServerInfo, StateChange, Storage, Transition

__all__ = ["ServerInfo", "StateChange", "Storage", "Transition"]
