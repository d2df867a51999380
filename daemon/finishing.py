"""Jobs whose final move failed wait here, out of the stages' way.

A done/ or failed/ folder that refuses writes (rotated by an operator to a folder the daemon
may not write, a read-only remount, a full disk) must not hold a poller slot or an upload
worker: every other job and type would wait behind it while paid results go undelivered.
So a job whose move fails is held here, per destination folder, and retried with capped
exponential backoff. One job probes the folder; when it gets through, the others of that
folder follow at once. Each blocked folder is said once when it blocks and once when it
clears, and is named with its count in ``status``, ``/readyz`` and a metric meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.aio import wait_any
from daemon.spool import Job

log = structlog.get_logger(__name__)

Move = Callable[[Job], Awaitable[Path]]
Finished = Callable[[Job, Path], None]


@dataclass
class _Blocked:
    """One destination folder that refused a move, and the jobs waiting for it."""

    folder: str  # relative to the spool root, e.g. "done/email"
    error: str
    due: float
    delay: float
    said_at: float  # when the last finish_blocked line was logged
    jobs: dict[str, Job] = field(default_factory=dict)


class Finishing:
    """The "finishing" queue: jobs whose move to done/ or failed/ failed, retried by folder.

    ``move`` performs one move (raising OSError when it cannot); ``finished`` is told about
    every job that got through. Backoff starts at ``initial_seconds`` and doubles up to
    ``max_seconds`` per folder.
    """

    #: A folder still blocked is said again this often (an error nobody fixed is no less
    #: an error an hour later; the journal may have rotated the first line away).
    remind_seconds = 3600.0

    def __init__(self, move: Move, finished: Finished, stop: asyncio.Event, *,
                 initial_seconds: float = 1.0, max_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._move = move
        self._finished = finished
        self._stop = stop
        self._initial = initial_seconds
        self._max = max(max_seconds, initial_seconds)
        self._clock = clock
        self._blocked: dict[str, _Blocked] = {}
        self._wake = asyncio.Event()

    def hold(self, job: Job, folder: str, exc: OSError) -> None:
        """Keep ``job`` until ``folder`` takes it; say so once per folder."""
        blocked = self._blocked.get(folder)
        if blocked is None:
            now = self._clock()
            blocked = _Blocked(folder, _describe(exc), now + self._initial, self._initial,
                               said_at=now)
            self._blocked[folder] = blocked
            _say_blocked(folder, exc, waiting=1)
        blocked.jobs[job.job] = job
        self._wake.set()

    def is_blocked(self, folder: str) -> bool:
        """Is ``folder`` known to refuse moves right now?"""
        return folder in self._blocked

    def count(self) -> int:
        """Jobs waiting for their final move."""
        return sum(len(b.jobs) for b in self._blocked.values())

    def blocked(self) -> dict[str, int]:
        """Jobs waiting, by the folder that refuses them."""
        return {b.folder: len(b.jobs) for b in self._blocked.values()}

    def reason(self) -> str | None:
        """Why jobs cannot be finished, for readiness and status; None when none wait."""
        if not self._blocked:
            return None
        return "; ".join(f"{len(b.jobs)} finished job(s) cannot be moved into {b.folder} "
                         f"({b.error})" for b in self._blocked.values())

    async def run(self) -> None:
        """Retry blocked folders as they fall due, until the stop event is set. Jobs still
        waiting then stay in processing/ as ``finishing``; the next start moves them."""
        while not self._stop.is_set():
            await self._retry_due()
            due = min((b.due for b in self._blocked.values()), default=None)
            self._wake.clear()
            await wait_any(self._wake, self._stop,
                           within=None if due is None else due - self._clock())

    async def _retry_due(self) -> None:
        for blocked in list(self._blocked.values()):
            if self._stop.is_set():
                return
            if blocked.due <= self._clock():
                await self._retry(blocked)

    async def _retry(self, blocked: _Blocked) -> None:
        """Move the folder's jobs one by one; the first failure backs the folder off."""
        moved = 0
        for job_id, job in list(blocked.jobs.items()):
            try:
                record = await self._move(job)
            except OSError as exc:
                self._back_off(blocked, exc)
                return
            except Exception:
                # A bug must not end the retries of every blocked folder: this one waits.
                log.exception("finish_retry_error", folder=blocked.folder)
                self._back_off(blocked, None)
                return
            del blocked.jobs[job_id]
            moved += 1
            self._finished(job, record)
        del self._blocked[blocked.folder]
        log.info("finish_unblocked", folder=blocked.folder, moved=moved)

    def _back_off(self, blocked: _Blocked, exc: OSError | None) -> None:
        now = self._clock()
        if exc is not None:
            blocked.error = _describe(exc)
        blocked.delay = min(blocked.delay * 2, self._max)
        blocked.due = now + blocked.delay
        log.debug("finish_retry_failed", folder=blocked.folder, error=blocked.error,
                  retry_in=round(blocked.delay, 2))
        if exc is not None and now - blocked.said_at >= self.remind_seconds:
            blocked.said_at = now
            _say_blocked(blocked.folder, exc, waiting=len(blocked.jobs))


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _say_blocked(folder: str, exc: OSError, *, waiting: int) -> None:
    """One line per blocked folder, with what would fix it."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = (f"make {folder} writable by the daemon's user again (owner, group and mode "
               "as its sibling folders have); the jobs move as soon as it is")
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on the spool's file system; the jobs move as soon as there is"
    else:
        fix = "the move is retried with backoff until it works"
    log.error("finish_blocked", folder=folder, error=_describe(exc), waiting=waiting, fix=fix)
