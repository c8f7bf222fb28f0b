"""The ``qmlkit`` command: run workers, enqueue jobs, inspect and manage them.

Every option can also come from an environment variable, named on ``--help``
(``QMLKIT_STORAGE``, ``QMLKIT_QUEUES``, ``QMLKIT_THREADS``, …).

The verbs live in rooms of their own: `qmlkit.cli.apploading` (loading ``APP``, the
shared options), `qmlkit.cli.worker`, `qmlkit.cli.enqueue`, `qmlkit.cli.inspect`
(``jobs``, ``stats``, ``servers``, ``recurring``), `qmlkit.cli.dashboard` and
`qmlkit.cli.admin` (``migrate``, ``plugins``). A new verb is a click command in one of
them (or a new module), named in `COMMANDS` here.

A verb's module is imported only when that verb runs (or ``--help`` lists the verbs):
``qmlkit worker`` never loads rich, the dashboard or the inspection verbs.
"""

from __future__ import annotations

import importlib
import logging

import click

from qmlkit.cli.apploading import load_app
from qmlkit.config import LOG_FORMAT, log_stream

__all__ = ["COMMANDS", "LazyGroup", "load_app", "main"]

#: Every verb: its name -> ``"module:attribute"`` of its click command (``--help`` lists
#: them sorted, as click does).
COMMANDS = {
    "worker": "qmlkit.cli.worker:worker",
    "enqueue": "qmlkit.cli.enqueue:enqueue",
    "jobs": "qmlkit.cli.inspect:jobs",
    "stats": "qmlkit.cli.inspect:stats",
    "migrate": "qmlkit.cli.admin:migrate",
    "recurring": "qmlkit.cli.inspect:recurring",
    "servers": "qmlkit.cli.inspect:servers",
    "dashboard": "qmlkit.cli.dashboard:dashboard",
    "plugins": "qmlkit.cli.admin:plugins",
}


class LazyGroup(click.Group):
    """A click group whose commands, named in `COMMANDS`, are imported on first use.

    Follows the lazy-loading group of click's documentation ("Lazily Loading
    Subcommands"): ``list_commands`` answers from the table without importing, and
    ``get_command`` imports one verb's module. Commands added with ``add_command`` are
    looked up first, as in a plain group.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every verb of `COMMANDS` and every added command, sorted (as click's group)."""
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module; ``None`` for an unknown name.

        Raises:
            ImportError: The verb's module failed to import (a broken install).
        """
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in COMMANDS:
            return command
        module_name, _, attribute = COMMANDS[cmd_name].partition(":")
        found = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(found, click.Command):  # pragma: no cover - the table is ours
            raise TypeError(f"{COMMANDS[cmd_name]} is not a click command")
        self.add_command(found, cmd_name)
        return found


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", envvar="QMLKIT_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="[env: QMLKIT_LOG_LEVEL]")
@click.version_option(package_name="qmlkit-core")
def main(log_level: str) -> None:
    """qmlkit: background jobs with pluggable storage."""
    if not logging.getLogger().handlers:  # (else basicConfig does nothing)
        logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT.format(where=""),
                            stream=log_stream())
