"""Money for ``submit``: the daemon's guards before a file is sent (:func:`admit`), and
``submit --dry-run`` (:func:`dry_run`), which says what sending would cost and sends
nothing."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from daemon.api import make_client
from daemon.commands.common import (
    EXIT_ACCOUNT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Console,
)
from daemon.config import Config
from daemon.errors import IpqsError
from daemon.inputs import URL_SUFFIX, json_rows, url_of
from daemon.job.money import Purse
from daemon.shown import shown
from daemon.spool import Job, inspect_file
from daemon.spool.ledger import Ledger, Limits, utc_day


async def admit(purse: Purse, job: Job, *, refused: Callable[[], None]) -> None:
    """Raise :class:`CommandError` (after calling ``refused``) unless the daemon's guards
    let ``job`` go now; if they do, its rows are held (the caller tells the purse how the
    upload ended)."""
    try:
        await _admit(purse, job)
    except CommandError:
        refused()
        raise


async def _admit(purse: Purse, job: Job) -> None:
    too_large = purse.too_large(job.rows)
    if too_large is not None:
        raise CommandError(EXIT_FAILED, f"{shown(job.source)}: not sent: {too_large}")
    try:
        admission = await purse.admit(job)
    except OSError as exc:
        where = purse.ledger.root if purse.ledger is not None else "the spool"
        raise CommandError(EXIT_USAGE, f"cannot count rows against the daily budget in "
                                       f"{shown(where)} ({exc.strerror}): make spool.root "
                                       "writable") from None
    if not admission.allowed:
        reason = str(admission.reason).removeprefix("waiting until the next UTC day: ")
        raise CommandError(EXIT_ACCOUNT if reason.startswith("paused: credits") else
                           EXIT_FAILED, f"{shown(job.source)}: not sent: {reason}")


# -- submit --dry-run ---------------------------------------------------------------------


def dry_run(ns: argparse.Namespace, config: Config, console: Console) -> int:
    """Check each FILE, count its rows, and show the credits and budget left."""
    if ns.url is not None:
        raise CommandError(EXIT_USAGE, "--dry-run checks FILEs; it takes no --url")
    if not ns.files:
        raise CommandError(EXIT_USAGE, "name the FILEs to check with --dry-run")
    method = "json" if ns.json else "multipart"
    cap, code, total = config.budget.max_rows_per_file, EXIT_OK, 0
    for path in ns.files:
        rows, problem, status = _look(path, method)
        if problem is not None:
            console.line(f"{shown(path)}: would not be sent: {problem}")
            code = max(code, status)
            continue
        total += rows or 0
        counted = "rows unknown (IPQS fetches the URL)" if rows is None else f"{rows} rows"
        over = (f"; over budget.max_rows_per_file = {cap}: would fail as too-large"
                if cap and rows is not None and rows > cap else "")
        console.line(f"{shown(path)}: {counted} ({ns.type}, "
                     f"{'url' if rows is None else method}){over}")
    console.line(f"total: {total} rows")
    console.line(asyncio.run(_credits(config, total)))
    console.line(_budget(config, ns.type))
    console.line("nothing was sent (--dry-run)")
    return code


def _look(path: Path, method: str) -> tuple[int | None, str | None, int]:
    """Rows billed for ``path``, what keeps it from being sent, and the exit status."""
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists()
                else "does not exist")
        return None, what, EXIT_NOT_FOUND
    if path.name.lower().endswith(URL_SUFFIX):
        return None, url_of(path.read_bytes()[:1 << 16])[1], EXIT_FAILED
    facts = inspect_file(path)
    if facts.problem is None and method == "json":
        return (*json_rows(path), EXIT_FAILED)
    return facts.rows, facts.problem, EXIT_FAILED


async def _credits(config: Config, rows: int) -> str:
    budget = config.budget
    if not budget.check_credits:
        return "credits: not checked (budget.check_credits = false)"
    if not config.api.key:
        return "credits: unknown (no API key configured)"
    try:
        async with make_client(config) as client:
            credits = (await client.account()).credits
    except IpqsError as exc:
        return f"credits: unknown (the account API cannot be read: {exc.message})"
    if credits is None:
        return "credits: unknown (the account API's answer has no credits)"
    enough = "enough" if credits - rows >= budget.reserve_credits else "NOT enough"
    return (f"credits: {credits} (reserve {budget.reserve_credits}): {enough} for "
            f"{rows} rows")


def _budget(config: Config, file_type: str) -> str:
    cfg = config.budget
    per_type = cfg.max_rows_per_day_by_type.get(file_type, 0)
    if not cfg.max_rows_per_day and not per_type:
        return "daily budget: none (budget.max_rows_per_day = 0)"
    day = utc_day(time.time())
    used = Ledger(config.spool.root, Limits(cfg.max_rows_per_day, {file_type: per_type})) \
        .used(day)
    parts = []
    if cfg.max_rows_per_day:
        left = max(cfg.max_rows_per_day - sum(used.values()), 0)
        parts.append(f"{left} of {cfg.max_rows_per_day} rows left today (all types)")
    if per_type:
        left = max(per_type - used.get(file_type, 0), 0)
        parts.append(f"{left} of {per_type} rows left today ({file_type})")
    return f"daily budget ({day.isoformat()} UTC): {'; '.join(parts)}"
