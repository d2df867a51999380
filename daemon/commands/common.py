"""What the commands share: exit statuses, the one-line failure, output helpers, and the
``--timeout`` window in which transient IPQS trouble is ridden out with the one retry policy.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

from daemon import retry
from daemon.config import Config, ConfigError
from daemon.errors import AccountError, IpqsError, TransientError
from daemon.logs import scrub
from daemon.shown import shown, terminal_safe

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ACCOUNT = 3
EXIT_UNREACHABLE = 4
EXIT_DUPLICATE = 5
EXIT_NOT_FOUND = 6
EXIT_INTERRUPTED = 130

_EXIT_MEANINGS = {
    EXIT_OK: "done",
    EXIT_FAILED: "IPQS refused, aborted or did not finish the job; or a local file could not\n"
                 "       be read or written",
    EXIT_USAGE: "usage or configuration error (the message names the option or config key)",
    EXIT_ACCOUNT: "account error: the API key is invalid or the account has no credits",
    EXIT_UNREACHABLE: "IPQS unreachable: still failing after retrying for --timeout seconds",
    EXIT_DUPLICATE: "duplicate: the same content was already taken (by the daemon or submit)",
    EXIT_NOT_FOUND: "not found: a named file is not there",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_help(*codes: int, meanings: dict[int, str] | None = None) -> str:
    """The "exit status:" part of a command's --help: ``codes`` only (default: all)."""
    meaning = {**_EXIT_MEANINGS, **(meanings or {})}
    lines = [f"  {code:<4} {meaning[code]}" for code in codes or _EXIT_MEANINGS]
    return "exit status:\n" + "\n".join(lines) + "\n"


EXIT_HELP = exit_help()

#: Default for ``--timeout``: how long transient trouble is retried before giving up.
DEFAULT_TIMEOUT = 300.0


class CommandError(Exception):
    """An expected failure: one line for stderr and the exit status that goes with it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Console:
    """Where a command writes: results to ``out``, progress and diagnostics to ``err``."""

    out: TextIO
    err: TextIO
    secrets: tuple[str, ...] = ()

    @classmethod
    def current(cls, config: Config | None = None) -> Console:
        """The process's stdout and stderr as they are now (pytest's capture included)."""
        key = config.api.key if config is not None else ""
        return cls(sys.stdout, sys.stderr, (key,) if key else ())

    @property
    def tty(self) -> bool:
        """Is progress going to a terminal (bars) or to a pipe or file (plain lines)?"""
        isatty = getattr(self.err, "isatty", None)
        return bool(isatty and isatty())

    def line(self, text: str = "") -> None:
        """A line of the command's result."""
        self._write(self.out, text)

    def note(self, text: str) -> None:
        """A progress or diagnostic line."""
        self._write(self.err, text)

    def _write(self, stream: TextIO, text: str) -> None:
        # A reader that went away (`status | head`) must not abort a submit half-way: the
        # rest of the output is dropped, the work goes on.
        try:
            print(self.scrub(text), file=stream, flush=True)
        except BrokenPipeError:
            _silence(stream)

    def error(self, text: str) -> None:
        """The one line that says why a command failed."""
        self.note(f"ipqs-bulkd: {text}")

    def scrub(self, text: str) -> str:
        """``text`` as it may be shown: secrets masked, no raw control characters (names
        in it should already have gone through :func:`~daemon.shown.shown`)."""
        return terminal_safe(scrub(text, self.secrets))


def _silence(stream: TextIO) -> None:
    """Point a stream whose reader has gone at /dev/null, so later writes (and the flush at
    exit) neither fail nor print "Exception ignored"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file (a test's capture): nothing will flush it at exit


def require_key(config: Config) -> None:
    if not config.api.key:
        raise ConfigError("config key api.key is empty: set api.key, api.key_file or "
                          "IPQS_API_KEY")


def positive_float(text: str) -> float:
    """argparse type: a number above zero."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return int(text)


def failure(exc: IpqsError, doing: str, timeout: float) -> CommandError:
    """The exit status and line for an IPQS error that ended a command."""
    message = shown(exc.message)
    if isinstance(exc, AccountError):
        return CommandError(EXIT_ACCOUNT, f"{doing}: IPQS refused the account: {message} "
                                          "(check api.key, api.key_file or IPQS_API_KEY, "
                                          "and the account's credits)")
    if isinstance(exc, TransientError):
        return CommandError(EXIT_UNREACHABLE, f"{doing}: IPQS unreachable, gave up after "
                                              f"retrying for {timeout:g} s (--timeout): "
                                              f"{message}")
    return CommandError(EXIT_FAILED, f"{doing}: IPQS refused it: {message}")


def retry_note(what: str, exc: BaseException) -> str:
    """``what: error``, without saying ``what`` twice (the client names most operations)."""
    text = shown(exc)
    return text if text.startswith(f"{what}:") else f"{what}: {text}"


class Patience:
    """Rides out transient trouble of one API call with the daemon's retry policy, for at
    most ``seconds`` from the first failure (``--timeout``); then the last error is raised.

    Only :class:`~daemon.errors.TransientError` is retried (see :mod:`daemon.retry`).
    ``on_retry`` gets the line for people: what failed and when the next try is.
    """

    def __init__(self, config: Config, seconds: float,
                 on_retry: Callable[[str], None]) -> None:
        self.config = config
        self.seconds = seconds
        self.on_retry = on_retry

    async def call(self, what: str, fn: Callable[[], Awaitable[T]], *,
                   retry_lost_answers: bool = True) -> T:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        timer: asyncio.TimerHandle | None = None

        def retrying_after(exc: BaseException, wait: float) -> None:
            nonlocal timer
            if timer is None:
                timer = loop.call_later(self.seconds, stop.set)
            self.on_retry(self._line(what, exc, wait, left=timer.when() - loop.time()))

        cfg = self.config.upload
        try:
            async for attempt in retry.retrying(
                    initial=cfg.retry_initial_seconds, maximum=cfg.retry_max_seconds,
                    stop=stop, on_retry=retrying_after, retry_lost_answers=retry_lost_answers):
                with attempt:
                    return await fn()
        finally:
            if timer is not None:
                timer.cancel()
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _line(self, what: str, exc: BaseException, wait: float, *, left: float) -> str:
        if wait < left:
            return f"{retry_note(what, exc)}; retrying in {wait:.1f} s"
        # The wait is cut short when --timeout ends: one last try then, not a retry later.
        return (f"{retry_note(what, exc)}; one last try in {max(left, 0):.1f} s, then giving "
                f"up (--timeout {self.seconds:g})")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], int) or r[i] is None for r in rows)
               for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric,
                                                                         strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(list(headers)), *(fmt(r) for r in cells)])


def _cell(value: object) -> str:
    # Cells hold names, statuses and messages from producers and IPQS: shown, never raw.
    return "-" if value is None else shown(value)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
