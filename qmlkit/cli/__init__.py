"""The ``qmlkit`` command: run workers, enqueue jobs, inspect and manage them.

Every option can also come from an environment variable, named on ``--help``
(``QMLKIT_STORAGE``, ``QMLKIT_QUEUES``, ``QMLKIT_THREADS``, …).

The verbs live in rooms of their own: `qmlkit.cli.apploading` (loading ``APP``, the
shared options), `qmlkit.cli.worker`, `qmlkit.cli.enqueue`, `qmlkit.cli.inspect`
(``jobs``, ``stats``, ``servers``, ``recurring``), `qmlkit.cli.dashboard` and
`qmlkit.cli.admin` (``migrate``, ``plugins``). A new verb is a click command in one of
them (or a new module), added to `main` here.
"""

from __future__ import annotations

import logging

import click

from qmlkit.cli.admin import migrate, plugins
from qmlkit.cli.apploading import load_app
from qmlkit.cli.dashboard import dashboard
from qmlkit.cli.enqueue import enqueue
from qmlkit.cli.inspect import jobs, recurring, servers, stats
from qmlkit.cli.worker import worker
from qmlkit.config import LOG_FORMAT

__all__ = ["load_app", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", envvar="QMLKIT_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="[env: QMLKIT_LOG_LEVEL]")
@click.version_option(package_name="qmlkit-core")
def main(log_level: str) -> None:
    """qmlkit: background jobs with pluggable storage."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT.format(where=""))


for _command in (worker, enqueue, jobs, stats, migrate, recurring, servers, dashboard, plugins):
    main.add_command(_command)
