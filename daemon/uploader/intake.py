"""The upload workers: take settled files from the watcher, claim them into the spool,
and hand each to the :class:`~daemon.uploader.sending.Sender`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol

import structlog

from daemon.claims import ClaimTrouble, Unreadable
from daemon.inputs import URL_SUFFIX
from daemon.job.breaker import Permit
from daemon.pipeline import Pipeline
from daemon.spool import Job, new_job_id
from daemon.spool.fs import UnreadableFileError, readable
from daemon.uploader.sending import Sender, Tracker, Waiting
from daemon.watcher import Candidate

log = structlog.get_logger(__name__)


class Source(Protocol):
    """Where settled files come from (the watcher): each one taken is released once."""

    async def take(self) -> Candidate | None: ...

    def release(self, path: Path) -> None: ...

    def rescan_soon(self) -> None: ...


class Uploader:
    """``upload.concurrency`` workers taking settled files from the watcher."""

    def __init__(self, pipe: Pipeline, source: Source, tracker: Tracker) -> None:
        self.pipe = pipe
        self.source = source
        self.claim_failures = 0  # files left in their inbox because the claim failed
        self.trouble = ClaimTrouble()
        self.waiting: Waiting = {}  # files back in their inbox, waiting for money
        self.unreadable = Unreadable(readable)
        self.sender = Sender(pipe, tracker, self.waiting)

    async def run(self) -> None:
        """Run the workers until the stop event is set."""
        async with asyncio.TaskGroup() as group:
            for n in range(2 * self.pipe.config.upload.concurrency):
                group.create_task(self._worker(), name=f"upload-worker-{n}")
            group.create_task(self.unreadable.run(self.pipe.stop, self.source.rescan_soon),
                              name="unreadable-recheck")

    async def _worker(self) -> None:
        pipe = self.pipe
        while not pipe.stop.is_set():
            candidate = await self.source.take()
            if candidate is None or not await self._handle(candidate):
                return

    async def _handle(self, candidate: Candidate) -> bool:
        """Claim and process one candidate; False when the daemon is stopping."""
        pipe = self.pipe
        permit: Permit | None = None
        try:
            try:
                # The file stays in its inbox until the breaker allows an upload.
                permit = await pipe.breaker.acquire(pipe.stop)
                job = await self._claim(candidate) if permit is not None else None
            finally:
                # The one release, whatever happened: claimed, gone, failed or stopping.
                # From here on the watcher may look at a new file of that name.
                self.source.release(candidate.path)
            if job is not None and permit is not None:
                self.unreadable.claimed(candidate.path)
                await self.sender.process(job, permit, candidate)
        except UnreadableFileError as exc:
            # Not bad input: a permission the producer (or the operator) can fix.
            self.unreadable.held(candidate.path, exc.mode, exc.owner)
            self.claim_failures += 1
        except OSError as exc:
            # A file that cannot be claimed (EACCES, EPERM...) stays in its inbox for a
            # later look; it must never take the workers down with it.
            self.trouble.say_once(candidate.path, exc)
            self.claim_failures += 1
        except Exception:
            log.exception("claim_error", path=str(candidate.path))
            self.claim_failures += 1
        finally:
            if permit is not None:
                pipe.breaker.release(permit)  # no-op once a verdict was recorded
        return permit is not None

    async def _claim(self, candidate: Candidate) -> Job | None:
        if not await self._may_claim(candidate):
            return None  # it waits in its inbox, untouched
        # Registered before its folder exists, so the recovery sweep never mistakes a
        # claim under way for a job left behind.
        job_id = new_job_id()
        self.pipe.jobs.started(job_id)
        try:
            job = await self._claim_retrying(candidate, job_id)
        except BaseException:
            self.pipe.jobs.forget(job_id)
            raise
        if job is None:
            self.pipe.jobs.forget(job_id)
        return job

    async def _claim_retrying(self, candidate: Candidate, job_id: str) -> Job | None:
        """spool.claim, retried while the spool itself refuses claims (a full disk): the
        file waits in its inbox meanwhile. None if the file is gone or the daemon stops."""
        trouble = self.trouble
        try:
            while True:
                try:
                    job = await asyncio.to_thread(
                        self.pipe.spool.claim, candidate.type, candidate.path,
                        self._method(candidate.path), job_id)
                except OSError as exc:
                    if not trouble.spool_wide(exc):
                        raise
                    trouble.held(candidate.path, exc)
                    if not await trouble.wait_retry(self.pipe.stop) or \
                            not await asyncio.to_thread(os.path.lexists, candidate.path):
                        return None  # stopping, or the file went meanwhile
                    continue
                trouble.claimed()
                return job
        finally:
            trouble.released(candidate.path)

    async def _may_claim(self, candidate: Candidate) -> bool:
        """A file that waited for money is claimed again only once it would be admitted,
        so a waiting file is not taken out of its inbox and hashed again and again."""
        key = (candidate.type, candidate.path.name)
        if key not in self.waiting:
            return True
        size, mtime_ns, rows = self.waiting[key]
        if (size, mtime_ns) == (candidate.size, candidate.mtime_ns) and not (
                await self.pipe.purse.would_admit(candidate.type, rows)).allowed:
            return False
        del self.waiting[key]
        return True

    async def forget_gone(self) -> None:
        """Forget waiting files that are no longer in their inbox (someone took them)."""
        keys = list(self.waiting)
        inbox = self.pipe.spool.inbox
        gone = await asyncio.to_thread(
            lambda: [k for k in keys if not os.path.lexists(inbox(k[0]) / k[1])])
        for key in gone:
            self.waiting.pop(key, None)

    def _method(self, path: Path) -> str:
        if path.name.lower().endswith(URL_SUFFIX):
            return "url"
        return self.pipe.config.upload.method

    async def process(self, job: Job) -> None:
        """Take a claimed or half-uploaded job (resumed after a restart) to ``submitted``;
        never raises (see :meth:`Sender.process`)."""
        await self.sender.process(job)
