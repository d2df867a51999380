"""How writers are looked for, said to the operator: the mode at start, each file
system's check when it is chosen or changes, leases refused (once), and each file a lease
probe held back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

from daemon.watcher.lease import refusal
from daemon.watcher.proc import proc_writers
from daemon.watcher.settle import SettleTable, Verdict

log = structlog.get_logger("daemon.watcher")


async def announce_mode(table: SettleTable) -> None:
    """Look once at /proc and at what leases need (SIGIO handled, CAP_LEASE), before any
    probe; log how settling will be judged."""
    mode = table.settings.writer_check
    visible = None
    if mode in ("auto", "proc"):
        _, visible = await asyncio.to_thread(proc_writers, frozenset())
        table.probed(visible)
    if mode in ("auto", "lease"):
        why = await asyncio.to_thread(refusal)
        if why is not None and table.checks.refuse(why):
            lease_refused(table, why)
    log.info("writer_check_mode", mode=mode, writers_visible=visible,
             check=table.check().value, window=table.window())
    if mode == "proc" and not visible:
        log.warning("writer_check_proc_partial", detail="some processes' fds are unreadable")


def lease_refused(table: SettleTable, reason: str) -> None:
    log.warning("lease_probe_unavailable", reason=reason,
                fallback=table.checks.fallback().value)


def report_checks(table: SettleTable, verdict: Verdict,
                  on_held_back: Callable[[int], None] | None) -> None:
    """What one settle round learnt about writer checks and writers."""
    if verdict.refused is not None:
        lease_refused(table, verdict.refused)
    for choice in verdict.choices:
        log.info("writer_check_chosen", device=f"{os.major(choice.dev)}:{os.minor(choice.dev)}",
                 check=choice.check.value, reason=choice.reason)
    for path in verdict.held_back:
        log.info("file_held_by_writer", path=str(path), check="lease")
    if verdict.held_back and on_held_back is not None:
        on_held_back(len(verdict.held_back))
