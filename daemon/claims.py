"""Files the daemon cannot claim now, and why.

A claim writes the job's record into processing/ before it renames the file out of its
inbox. On a full disk (or a quota, or a read-only remount) every claim fails alike, so the
condition is the spool's, not the file's: it is said once when it starts and once when it
ends, the files wait in their inbox (counted as pending, and named in readiness), and the
claims are retried with a short backoff, so they go as soon as space returns rather than
at the next rescan. Trouble of one file (a permission, say) is said once for that file.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.aio import wait_any

log = structlog.get_logger(__name__)

#: Errors that every claim would meet alike: the spool's file system, not the file.
SPOOL_WIDE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

#: How many per-file complaints are remembered (so each is said once), at most.
_SAID_MAX = 10_000


class ClaimTrouble:
    """The files held back by a spool-wide claim error, and the retry of their claims."""

    def __init__(self, *, initial_seconds: float = 0.5, max_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._initial = initial_seconds
        self._max = max(max_seconds, initial_seconds)
        self._clock = clock
        self._held: dict[Path, float] = {}  # path -> when its claim first failed
        self._error: str | None = None
        self._delay = initial_seconds
        self._cleared = asyncio.Event()  # a claim got through: the others try again now
        self._said: set[tuple[Path, int | None]] = set()

    @staticmethod
    def spool_wide(exc: OSError) -> bool:
        """Would every claim fail like this one?"""
        return exc.errno in SPOOL_WIDE

    def held(self, path: Path, exc: OSError) -> None:
        """The claim of ``path`` failed for a spool-wide reason; it waits in its inbox."""
        self._held.setdefault(path, self._clock())
        if self._error is None:
            self._error = exc.strerror or str(exc)
            self._cleared.clear()
            log.warning("claim_blocked", error=self._error, errno=exc.errno,
                        fix="free space on the spool's file system (or lift the quota, or "
                            "remount it read-write); the files wait in their inboxes and are "
                            "taken as soon as a claim works again")

    def released(self, path: Path) -> None:
        """``path`` was claimed (or is gone, or the daemon stops): it no longer waits."""
        self._held.pop(path, None)

    def claimed(self) -> None:
        """A claim worked: a spool-wide condition is over; held files try again at once."""
        if self._error is None:
            return
        log.info("claim_unblocked", waiting=len(self._held))
        self._error = None
        self._delay = self._initial
        self._cleared.set()

    async def wait_retry(self, stop: asyncio.Event) -> bool:
        """Wait before the next try of a held claim: the backoff, or until another claim
        works. False if the daemon stops meanwhile."""
        delay = self._delay
        self._delay = min(self._delay * 2, self._max)
        await wait_any(self._cleared, stop, within=delay)
        return not stop.is_set()

    def say_once(self, path: Path, exc: OSError) -> None:
        """A claim failed for a reason of this file's own: one line per file and error."""
        key = (path, exc.errno)
        if key in self._said:
            return
        if len(self._said) >= _SAID_MAX:
            self._said.clear()
        self._said.add(key)
        log.warning("claim_failed", path=str(path), error=exc.strerror or str(exc),
                    errno=exc.errno)

    def count(self) -> int:
        """Files waiting in their inbox because their claim failed."""
        return len(self._held)

    def reason(self) -> str | None:
        """For readiness: why files cannot be claimed; None when they can."""
        if self._error is None:
            return None
        return (f"files cannot be claimed: {self._error} "
                f"({len(self._held)} waiting in the inboxes)")
