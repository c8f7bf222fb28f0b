"""``qmlkit.app``: the import path of ``App`` since the first release, kept as a re-export.

``App`` lives in `qmlkit.client`, the job registry (``JobFunction``, ``JobOptions``) in
`qmlkit.registry`, the after-commit fan-out in `qmlkit.notify` and transactional
enqueue in `qmlkit.transactional`. ``from qmlkit.app import App`` keeps working.
"""

from __future__ import annotations

from qmlkit.client import DEFAULT_STORAGE_URL, App
from qmlkit.registry import ClassWorker, JobFunction, JobOptions, RegisteredWorker

_RegisteredWorker = RegisteredWorker  # its name before it moved to qmlkit.registry

__all__ = ["DEFAULT_STORAGE_URL", "App", "ClassWorker", "JobFunction", "JobOptions"]
