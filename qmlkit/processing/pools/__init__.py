"""Execution pools: how a server runs its attempts (Celery's ``concurrency``, Dramatiq's
processes and threads).

A server composes one pool, chosen by ``ServerConfig.pool``:

- ``threads`` (`qmlkit.processing.pools.threads`): ``worker_count`` worker threads, each
  claiming a small fenced batch and running it in order. Best for ``def``-heavy apps.
- ``asyncio`` (`qmlkit.processing.pools.asyncio`): one event loop running up to
  ``worker_count`` attempts at once; ``async def`` jobs as tasks, ``def`` jobs in a
  bounded thread executor beside it. Best for I/O fan-out.
- ``processes`` (`qmlkit.processing.pools.processes`): a supervising parent and child
  processes, each a server of its own running one of the above (``qmlkit worker --pool
  processes``, or ``App.server(pool="processes")``); see docs/pools.md.

Every pool gives the layer above the same guarantees through the same parts: claims
recorded in the server's `qmlkit.processing.claims.ClaimLedger`, outcomes turned into
states by `qmlkit.processing.outcome` and stored in batches, cooperative stop, release
of unstarted claims on stop and of running ones on abort. `qmlkit.processing.pools.base`
holds the `Pool` protocol a server composes.
"""
