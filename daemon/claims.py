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


#: What to tell the operator about a file the daemon's user may not read.
UNREADABLE_FIX = ("let the daemon's group read it (chmod g+r FILE); have the producer write "
                  "with a umask that keeps group read (027 or 007), or give the inbox a "
                  "default ACL (setfacl -d -m g::r INBOX); it waits in its inbox and is "
                  "taken as soon as it is readable")


class Unreadable:
    """Files left in their inbox because the daemon's user may not read them (mode 0600 of
    another user, say): not bad input, so never failed. Each is said once; they are
    looked at again with a backoff (events for a chmod and the rescans also find them),
    and taken as soon as they are readable."""

    def __init__(self, check: Callable[[Path], bool | None], *,
                 initial_seconds: float = 1.0, max_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``check(path)`` blocks: True if readable now, False if not, None if gone."""
        self._check = check
        self._initial = initial_seconds
        self._max = max(max_seconds, initial_seconds)
        self._clock = clock
        self._files: dict[Path, float] = {}  # path -> when it was first found unreadable
        self._added = asyncio.Event()

    def held(self, path: Path, mode: int | None, owner: int | None) -> None:
        """``path`` could not be opened for reading: one line per file, then it waits."""
        if path in self._files:
            return
        if len(self._files) >= _SAID_MAX:
            return  # still counted by the rescans that find it; memory stays bounded
        self._files[path] = self._clock()
        self._added.set()
        log.warning("file_unreadable", path=str(path),
                    mode=None if mode is None else f"{mode:04o}", owner_uid=owner,
                    fix=UNREADABLE_FIX)

    def claimed(self, path: Path) -> None:
        """``path`` was claimed (or went): it no longer waits."""
        if self._files.pop(path, None) is not None:
            log.info("file_readable", path=str(path))

    def count(self) -> int:
        """Files waiting in their inbox because they cannot be read."""
        return len(self._files)

    async def run(self, stop: asyncio.Event, readable: Callable[[], None]) -> None:
        """Look at the unreadable files again and again (backoff, reset by a new one);
        call ``readable()`` (a rescan) when one can be read now, forget those gone."""
        delay = self._initial
        while not stop.is_set():
            self._added.clear()
            await wait_any(stop, self._added, within=delay if self._files else None)
            if self._added.is_set():
                delay = self._initial
                continue
            delay = min(delay * 2, self._max)
            if await asyncio.to_thread(self._recheck):
                readable()

    def _recheck(self) -> bool:
        now_readable = False
        for path in list(self._files):
            state = self._check(path)
            if state is None:
                self._files.pop(path, None)
            now_readable = now_readable or bool(state)
        return now_readable
