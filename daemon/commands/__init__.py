"""Commands for people (``submit``, ``fetch``, ``status``, ``jobs``, ``retry``): one module
each.

They read the same config and spool as the daemon and are safe to run beside it. Each
returns an exit status; an expected failure is one line on stderr and a distinct status
(:data:`~daemon.commands.common.EXIT_HELP`), never a traceback, and never shows the key.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from daemon.commands import fetch, jobs, requeue, status, submit
from daemon.commands.common import (
    EXIT_FAILED,
    EXIT_HELP,
    EXIT_INTERRUPTED,
    CommandError,
    Console,
)
from daemon.config import Config
from daemon.shown import shown

_RUN: dict[str, Callable[[argparse.Namespace, Config, Console], int]] = {
    "submit": submit.run,
    "fetch": fetch.run,
    "status": status.run,
    "jobs": jobs.run,
    "retry": requeue.run,
}

#: The subcommands this package adds to ``ipqs-bulkd``.
NAMES = frozenset(_RUN)

__all__ = ["EXIT_HELP", "NAMES", "add_parsers", "run"]


def add_parsers(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the subcommands to ``ipqs-bulkd``'s subparsers (``add_config`` adds --config)."""
    for module in (submit, fetch, status, jobs, requeue):
        module.add_parser(commands, add_config)


def run(ns: argparse.Namespace, config: Config) -> int:
    """Run the subcommand ``ns.command``; returns its exit status."""
    console = Console.current(config)
    try:
        return _RUN[ns.command](ns, config, console)
    except CommandError as exc:
        console.error(exc.message)
        return exc.code
    except OSError as exc:
        # Local disk trouble (permissions, a full disk): one line, not a traceback.
        detail = exc.strerror or str(exc)
        console.error(f"{detail}: {shown(exc.filename)}" if exc.filename else detail)
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
