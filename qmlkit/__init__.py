"""qmlkit: a Hangfire-style background job server for Python, the counterpart of qml-rs.

Storage backends, middleware and state-change observers are pluggy plugins; SQLite is
the embedded default storage. Start with `App`.
"""

from __future__ import annotations

from qmlkit.client import App
from qmlkit.errors import (
    ConfigurationError,
    DuplicateJob,
    InvalidTransition,
    JobDeleted,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadError,
    PluginError,
    PluginLoadError,
    QmlError,
    Retry,
    StaleClaim,
    StorageError,
    StorageUnavailable,
    UnknownJobName,
    UnknownStorageScheme,
)
from qmlkit.handle import JobHandle
from qmlkit.hookspecs import hookimpl
from qmlkit.job import (
    AwaitingRetry,
    Deleted,
    Enqueued,
    Failed,
    Job,
    JobState,
    Processing,
    Scheduled,
    Succeeded,
)
from qmlkit.processing.config import ServerConfig
from qmlkit.processing.context import JobContext, current_context
from qmlkit.processing.retry import RetryPolicy
from qmlkit.processing.server import Server
from qmlkit.registry import AsyncJobFunction, JobFunction
from qmlkit.storage.base import Storage
from qmlkit.version import __version__

__all__ = [
    "App",
    "AsyncJobFunction",
    "AwaitingRetry",
    "ConfigurationError",
    "Deleted",
    "DuplicateJob",
    "Enqueued",
    "Failed",
    "InvalidTransition",
    "Job",
    "JobContext",
    "JobDeleted",
    "JobError",
    "JobFailed",
    "JobFunction",
    "JobHandle",
    "JobNotFound",
    "JobState",
    "JobTimeout",
    "PayloadError",
    "PluginError",
    "PluginLoadError",
    "Processing",
    "QmlError",
    "Retry",
    "RetryPolicy",
    "Scheduled",
    "Server",
    "ServerConfig",
    "StaleClaim",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "Succeeded",
    "UnknownJobName",
    "UnknownStorageScheme",
    "__version__",
    "current_context",
    "hookimpl",
]
