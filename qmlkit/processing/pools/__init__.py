"""Execution pools: how a server runs its attempts (threads, asyncio, processes).

``processes`` (`qmlkit.processing.pools.processes`) is a supervisor over child
processes, each a server of its own; see docs/pools.md.
"""
