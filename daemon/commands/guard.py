"""``submit``'s part in the spool protocol: the duplicate marker of its content, and the
lease (heartbeat) that says, while it runs, that the marker is held by someone alive.

The rules themselves live in :mod:`daemon.spool.markers` and :mod:`daemon.job.duplicates`,
shared with the daemon; this is what ``submit`` tells people about them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from daemon.commands.common import EXIT_DUPLICATE, EXIT_FAILED, EXIT_USAGE, CommandError, Console
from daemon.config import Config
from daemon.job.conversation import Conversation
from daemon.job.duplicates import take_marker
from daemon.shown import shown
from daemon.spool import Job, Spool
from daemon.spool.markers import SUBMIT, MarkerContendedError


class DuplicateGuard:
    """The daemon's duplicate markers (``<spool.root>/markers/<sha256>``), or nothing; and
    the lease that tells everyone on the spool that this submit is alive."""

    def __init__(self, spool: Spool | None, window_seconds: float) -> None:
        self.spool = spool
        self.window = window_seconds
        self.claimed = False

    @classmethod
    def open(cls, config: Config, console: Console, *, enabled: bool) -> DuplicateGuard:
        window = config.upload.duplicate_window_hours * 3600
        if not enabled:
            console.note("duplicate check off (--no-duplicate-check): nothing is recorded")
            return cls(None, 0)
        spool = Spool(config.spool.root, config.spool.types, file_mode=config.spool.file_mode,
                      lease_seconds=config.upload.lease_seconds)
        try:
            spool.markers.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unusable(spool, exc) from None
        return cls(spool, window)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        """Heartbeat while the submit runs (before the marker is taken, so that no one
        ever sees our marker without our lease); the heartbeat goes when it ends."""
        spool = self.spool
        if spool is None:
            yield
            return
        try:
            await asyncio.to_thread(spool.heartbeat)
        except OSError as exc:
            raise _unusable(spool, exc) from None
        beating = asyncio.create_task(self._beat(spool))
        try:
            yield
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            with contextlib.suppress(OSError):
                spool.release()

    @staticmethod
    async def _beat(spool: Spool) -> None:
        every = min(spool.lease_seconds / 3, 60.0)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(OSError):  # a missed beat is made up by the next
                await asyncio.to_thread(spool.heartbeat)

    async def claim(self, job: Job, talk: Conversation) -> None:
        if self.spool is None:
            return
        try:
            earlier = await take_marker(self.spool, talk, job, self.window, holder=SUBMIT)
        except MarkerContendedError:
            raise CommandError(EXIT_FAILED, f"{shown(job.source)} not sent: its duplicate "
                               "marker kept changing while it was taken (other daemons or "
                               "submits at work on the same content); try again") from None
        except OSError as exc:
            raise _unusable(self.spool, exc) from None
        if earlier is not None:
            raise CommandError(EXIT_DUPLICATE, _taken(earlier))
        self.claimed = True

    def sending(self, job: Job) -> None:
        """Before each POST: the marker says the upload may reach IPQS (raises OSError)."""
        if self.spool is not None and self.claimed:
            self.spool.marks.sending(job)

    def accepted(self, job: Job) -> None:
        if self.spool is not None and self.claimed:
            self.spool.update_mark(job)

    def release(self, job: Job) -> None:
        """Nothing was created at IPQS: a later attempt may send the content."""
        if self.spool is not None and self.claimed:
            self.spool.unmark(job)
            self.claimed = False


def _taken(earlier: dict[str, Any]) -> str:
    """Why the content is not sent, and what to do instead."""
    job, ipqs_id = shown(earlier.get("job")), earlier.get("id")
    what = f"{shown(earlier.get('type'))}/{shown(earlier.get('source'))}"
    if ipqs_id is not None:
        return (f"not sent: the same content was already taken as job {job} ({what}, IPQS id "
                f"{shown(ipqs_id)}) within upload.duplicate_window_hours; `ipqs-bulkd fetch "
                f"{shown(ipqs_id)}` downloads its results")
    if earlier.get("holder") == SUBMIT:
        return (f"not sent: another submit is sending the same content right now as job {job} "
                f"({what}, file_name {shown(earlier.get('file_name'))}); it prints the IPQS id "
                "when IPQS answers")
    return (f"not sent: the daemon is working on the same content as job {job} ({what}, in "
            "processing/); `ipqs-bulkd status` shows it")


def _unusable(spool: Spool, exc: OSError) -> CommandError:
    return CommandError(EXIT_USAGE, (
        f"cannot record duplicates under {shown(spool.markers)} ({exc.strerror}): make "
        "spool.root writable, or pass --no-duplicate-check to send without the guard"))
