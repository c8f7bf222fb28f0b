"""The qmlkit exception hierarchy, rooted at `QmlError`.

Every error carries its data as attributes and a message that says how to fix the
problem. Storage drivers' own exceptions are chained with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Iterable


class QmlError(Exception):
    """Base class of every error qmlkit raises on purpose."""


# --- configuration -----------------------------------------------------------------


class ConfigurationError(QmlError):
    """A setting is wrong; raised before anything starts, naming the bad field or URL part."""


#: Plugin distribution names for schemes whose name differs from the scheme.
#: URL schemes of the storage plugins that ship in qmlkit's source tree, and their folder
#: under ``plugins/`` (they are installed from there, not from a package index).
_BUNDLED = {"postgres": "qmlkit-postgres", "postgresql": "qmlkit-postgres",
            "redis": "qmlkit-redis", "rediss": "qmlkit-redis", "unix": "qmlkit-redis"}


class UnknownStorageScheme(ConfigurationError):
    """No installed storage plugin understands a URL's scheme.

    Attributes:
        scheme: The scheme that was asked for, e.g. ``"mongodb"``.
        known: Every scheme some registered plugin does understand, sorted.
    """

    def __init__(self, scheme: str, known: Iterable[str]) -> None:
        self.scheme = scheme
        self.known = sorted(set(known))
        bundled = _BUNDLED.get(scheme.split("+")[0])
        hint = (f"Its plugin ships with qmlkit's source: `pip install -e plugins/{bundled}` "
                f"from a checkout of qmlkit." if bundled else
                "Install the plugin that provides it: a package with a `qmlkit.storage` "
                "entry point.")
        super().__init__(
            f"no storage plugin understands the URL scheme {scheme!r} (check "
            f"QMLKIT_DISABLE_PLUGINS if it should be built in); known schemes: "
            f"{', '.join(self.known) or '(none)'}. {hint}"
        )


class InvalidCron(ConfigurationError):
    """A cron expression qmlkit refuses, with the field to blame.

    Attributes:
        expression: The expression as given.
        reason: What is wrong, naming the field (e.g. ``"the hour field '25' ..."``).
    """

    def __init__(self, expression: str, reason: str) -> None:
        self.expression = expression
        self.reason = reason
        super().__init__(f"cron expression {expression!r}: {reason}. Five fields are read "
                         "minute-first; six fields are read seconds-first")


class InvalidTransition(QmlError):
    """A job state change that the state machine does not allow.

    Attributes:
        job_id: The job's id.
        source: The current state's name (``None`` for a job not yet stored).
        target: The requested state's name.
    """

    def __init__(self, job_id: str, source: str | None, target: str) -> None:
        self.job_id = job_id
        self.source = source
        self.target = target
        super().__init__(f"job {job_id}: a {source or 'new'} job cannot become {target}")


# --- plugins -----------------------------------------------------------------------


class PluginError(QmlError):
    """A plugin could not be loaded or behaved against its hook's contract."""


class PluginLoadError(PluginError):
    """An entry-point plugin failed to import.

    Attributes:
        entry_point: ``"group:name = value"`` of the failing entry point.
        distribution: The distribution that declared it, or ``None`` if unknown.
    """

    def __init__(self, entry_point: str, distribution: str | None, cause: BaseException) -> None:
        self.entry_point = entry_point
        self.distribution = distribution
        super().__init__(
            f"plugin entry point {entry_point!r} from distribution "
            f"{distribution or '(unknown)'} failed to load: {type(cause).__name__}: {cause}. "
            "Reinstall or uninstall that distribution, or disable it with "
            f"QMLKIT_DISABLE_PLUGINS={distribution or entry_point.split(' = ')[0]}."
        )


class MiddlewareError(PluginError):
    """A middleware broke its contract.

    Raised when an execution middleware returns ``None`` without calling ``call_next``,
    and when the enqueue middleware chain stores nothing for a single ``enqueue``.

    Attributes:
        middleware: The offending middleware, as ``module.QualName`` (several, comma
            separated, when the chain as a whole is to blame).
    """

    def __init__(
        self,
        middleware: str,
        problem: str = "returned None without calling call_next(); return call_next() "
        "to go on, or return a result of your own",
    ) -> None:
        self.middleware = middleware
        super().__init__(f"middleware {middleware} {problem}")


class DuplicateStorageScheme(PluginError):
    """Two installed plugins claim the same storage URL scheme.

    Attributes:
        scheme: The contested scheme.
        plugins: The plugins claiming it (distribution and entry-point names).
    """

    def __init__(self, scheme: str, plugins: Iterable[str]) -> None:
        self.scheme = scheme
        self.plugins = sorted(plugins)
        super().__init__(
            f"storage scheme {scheme!r} is claimed by several plugins: "
            f"{', '.join(self.plugins)}; uninstall one, or disable one with "
            "QMLKIT_DISABLE_PLUGINS=<name>"
        )


# --- storage -----------------------------------------------------------------------


class StorageError(QmlError):
    """A storage backend failed; the driver's exception is chained as ``__cause__``."""


class StorageUnavailable(StorageError):
    """The backend is unreachable or busy right now; the operation did nothing.

    Transient: callers in the server retry it with capped backoff.
    """


class JobNotFound(StorageError):
    """No job with this id is stored.

    Attributes:
        job_id: The id that was looked up.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r} in storage")


class DuplicateJob(StorageError):
    """A job with the same id is already stored.

    Attributes:
        job_id: The id that already exists.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"a job with id {job_id!r} is already stored")


class StaleClaim(StorageError):
    """A fenced transition was rejected: the caller's claim is no longer the current one.

    Raised when the job has been re-claimed since (its fencing token moved on), or is no
    longer Processing (it was reclaimed, released or deleted). The caller's outcome is
    discarded; whoever released, reclaimed or deleted the job decides what happens next.

    Attributes:
        job_id: The job's id.
        token: The fencing token the caller presented.
    """

    def __init__(self, job_id: str, token: int) -> None:
        self.job_id = job_id
        self.token = token
        super().__init__(
            f"job {job_id}: fencing token {token} is stale: since that claim the job was "
            f"released to its queue, claimed again or deleted"
        )


# --- jobs --------------------------------------------------------------------------


class JobError(QmlError):
    """Something wrong with one job; it fails that job with a reason, never the worker."""


class PayloadError(JobError, ValueError):
    """Job arguments or a result cannot be stored: not JSON, or over the size limit.

    Attributes:
        where: What was being encoded, e.g. ``"args[1]"``, ``"kwargs['f']"``, ``"result"``.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(message)


class UnknownJobName(JobError):
    """A stored job names a method no registered job function or worker provides.

    Attributes:
        method: The unknown method name.
        registered: The names that are registered, sorted.
    """

    def __init__(self, method: str, registered: Iterable[str]) -> None:
        self.method = method
        self.registered = sorted(registered)
        shown = ", ".join(self.registered[:20]) + (" …" if len(self.registered) > 20 else "")
        super().__init__(
            f"no job function is registered as {method!r}; registered: {shown or '(none)'}. "
            "Deploy code that registers it, then retry the job."
        )


class JobTimeout(JobError):
    """An attempt ran past its timeout.

    Args:
        timeout_s: The limit that was exceeded, in seconds.
        killed_exitcode: Set by the process pool's hard timeout: the exit status of the
            child process it killed to end the attempt (``-15`` for SIGTERM, ``-9`` for
            SIGKILL), so the stored failure says the work was killed, not cancelled
            (Celery's hard ``time_limit``). ``None`` for a cooperative timeout.

    Attributes:
        timeout_s: As given.
        killed_exitcode: As given.
    """

    def __init__(self, timeout_s: float, *, killed_exitcode: int | None = None) -> None:
        self.timeout_s = timeout_s
        self.killed_exitcode = killed_exitcode
        message = f"the attempt ran longer than its timeout of {timeout_s:g} s"
        if killed_exitcode is not None:
            message += (f"; hard timeout: its child process was killed"
                        f" (exit code {killed_exitcode}) and replaced")
        super().__init__(message)


class WorkerLost(JobError):
    """The worker process running an attempt died before the attempt ended.

    Stored by the process pool's supervisor for each attempt a child process was running
    when it died (a segfault, ``os._exit``, an OOM kill); the attempt follows the retry
    policy like any other failure (Celery's ``WorkerLostError``).

    Attributes:
        exitcode: The child's exit status as `multiprocessing` reports it: ``-N`` when
            signal ``N`` ended it, else the code it passed to ``exit``.
        signal_name: ``"SIGSEGV"``, ``"SIGKILL"``...; ``None`` for a plain exit.
    """

    def __init__(self, exitcode: int | None) -> None:
        import signal

        self.exitcode = exitcode
        self.signal_name: str | None = None
        if exitcode is not None and exitcode < 0:
            try:
                self.signal_name = signal.Signals(-exitcode).name
            except ValueError:
                self.signal_name = f"signal {-exitcode}"
        how = (f"killed by {self.signal_name}, exit code {exitcode}" if self.signal_name
               else f"exit code {exitcode}")
        super().__init__(f"the worker process running this attempt died ({how}); see the "
                         "worker's log and the system log (OOM killer)")


# --- results -----------------------------------------------------------------------


class ResultError(QmlError):
    """A job handle's ``result()`` cannot give a return value (`qmlkit.handle`)."""


class JobFailed(ResultError):
    """The job ended Failed; raised by ``JobHandle.result()`` in the caller.

    Like Celery's ``AsyncResult.get()`` re-raising the task's error, but as one qmlkit
    type carrying the stored details, since the original exception class may not be
    importable in the caller (and qmlkit never unpickles). A result that was not JSON
    fails its job too: ``exception_type`` is then ``qmlkit.errors.PayloadError`` and
    ``message`` names the unstorable part of the result.

    Attributes:
        job_id: The job's id.
        exception_type: Qualified name of what the last attempt raised, e.g.
            ``"ValueError"``.
        message: Its message (capped at ``qmlkit.job.MAX_ERROR_TEXT`` characters).
        stack_trace: The stored formatted traceback, or ``None``.
        retry_count: Retries made before the final failure.
        note: What could not be rendered about the exception, or ``None``.
    """

    def __init__(self, job_id: str, exception_type: str, message: str, *,
                 stack_trace: str | None = None, retry_count: int = 0,
                 note: str | None = None) -> None:
        self.job_id = job_id
        self.exception_type = exception_type
        self.message = message
        self.stack_trace = stack_trace
        self.retry_count = retry_count
        self.note = note
        tries = ""
        if retry_count:
            tries = f" after {retry_count} retr{'y' if retry_count == 1 else 'ies'}"
        super().__init__(f"job {job_id} failed{tries}: {exception_type}: {message}")


class JobDeleted(ResultError):
    """The job was deleted before it finished, so it has no result.

    Attributes:
        job_id: The job's id.
        reason: The stored reason of the deletion, or ``None``.
    """

    def __init__(self, job_id: str, reason: str | None = None) -> None:
        self.job_id = job_id
        self.reason = reason
        why = f" ({reason})" if reason else ""
        super().__init__(f"job {job_id} was deleted{why}; it has no result. "
                         "Requeue it (`qmlkit jobs retry`) to run it again.")


class Retry(QmlError):
    """Raised by job code to ask for another attempt.

    The attempt counts against the job's ``max_retries`` (and only that: the retry
    policy's ``retry_on``/``never_retry`` lists do not apply); once they are used up the
    job fails with this exception's message.

    Attributes:
        delay: Seconds to wait before the next attempt, or ``None`` for the retry
            policy's backoff.
    """

    def __init__(self, delay: float | None = None, message: str = "retry requested") -> None:
        self.delay = delay
        super().__init__(message)
