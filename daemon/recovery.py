"""Recovery at start (and at each sweep): take over the jobs left in processing/ and resume
each by the state it was saved in (the table is ``_RESUME`` at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from daemon.job.state import JobState, advance, state_of
from daemon.pipeline import Pipeline
from daemon.poller import Poller
from daemon.spool import JOB_FILE, Job
from daemon.uploader import Uploader

log = structlog.get_logger(__name__)


class Recovery:
    """Finds jobs that are ours to run and hands each to the stage its state calls for."""

    def __init__(self, pipe: Pipeline, uploader: Uploader, poller: Poller,
                 spawn: Callable[[Coroutine[Any, Any, None], Job], None]) -> None:
        self.pipe = pipe
        self.spool = pipe.spool
        self.config = pipe.config
        self.uploader = uploader
        self.poller = poller
        self.spawn = spawn
        #: Job folders whose record cannot be resumed: left alone, logged once.
        self.broken: set[str] = set()

    async def recover(self) -> None:
        """Resume every job in processing/ that is ours to run (ours, or its owner died)."""
        job_dirs = await asyncio.to_thread(lambda: list(self.spool.jobs()))
        resumed = 0
        for job_dir in job_dirs:
            if job_dir.name in self.pipe.jobs or job_dir.name in self.broken:
                continue
            try:
                resumed += await self._recover_one(job_dir)
            except OSError as exc:  # unreadable now (EIO, ESTALE...): try again next sweep
                log.warning("job_resume_failed", job=job_dir.name, error=str(exc))
            except Exception:
                # A record no state of ours explains: the folder stays as it is (input,
                # results and all) for the operator; the daemon and the other jobs go on.
                log.exception("job_broken", job=job_dir.name, folder=str(job_dir))
                self.broken.add(job_dir.name)
        if resumed:
            log.info("jobs_recovered", count=resumed)

    async def _recover_one(self, job_dir: Path) -> int:
        job = await asyncio.to_thread(self._take_over, job_dir)
        if job is None or job.job in self.pipe.jobs:
            return 0
        await self._resume(job)
        return 1

    def _take_over(self, job_dir: Path) -> Job | None:
        """The job in ``job_dir`` if we may run it and won it (blocking: run in a thread)."""
        job = self.spool.load(job_dir)
        if job is None:
            self._broken_job(job_dir)
            return None
        if not self.spool.orphaned(job, job_dir):
            return None
        if job.owner == self.spool.owner.name:
            return job
        adopted = self.spool.adopt(job_dir)
        if adopted is not None and adopted.state == JobState.UPLOADING \
                and (job.owner or "").partition(":")[0] != self.spool.owner.host:
            # Another host's daemon may only be frozen, with a body still in flight: a
            # lookup before that body could have been answered proves nothing (README:
            # the timing model). On this host its pid was checked: it is gone.
            api = self.config.api
            self.pipe.talk.hold_lookups(adopted, max(api.read_timeout,
                                                     api.total_timeout_seconds))
        return adopted

    async def _resume(self, job: Job) -> None:
        log.info("job_resumed", job=job.job, state=job.state, id=job.id)
        await _RESUME[state_of(job)](self, job)

    # What resuming does, per saved state (the table is _RESUME, below the class).

    async def _resume_claimed(self, job: Job) -> None:
        spool = self.spool
        if not await asyncio.to_thread(spool.input_path(job).exists):
            # Crash between writing the record and the claiming rename: the input is still
            # in its inbox (or was never there); only the folder goes.
            await asyncio.to_thread(spool.discard_dir, spool.job_dir(job))
            return
        await self._resume_upload(job)

    async def _resume_upload(self, job: Job) -> None:
        self.pipe.started(job)
        self.spawn(self.uploader.process(job), job)

    async def _resume_submitted(self, job: Job) -> None:
        if job.id is None:
            # Saved without its id: the upload's answer is as good as lost; look it up.
            advance(job, JobState.UPLOADING)
            await self._resume_upload(job)
            return
        await self._resume_follow(job)

    async def _resume_follow(self, job: Job) -> None:
        # A crash right after the id was saved may have kept it from the marker.
        await asyncio.to_thread(self.spool.update_mark, job)
        self.poller.track(job)

    async def _resume_finish(self, job: Job) -> None:
        self.pipe.started(job)
        self.spawn(self.pipe.finish(job, job.outcome or "failed", job.reason, job.error),
                        job)

    async def _resume_return(self, job: Job) -> None:
        await self.pipe.unclaim(job)

    def _broken_job(self, job_dir: Path) -> None:
        """A job folder without a record: fail its input, never resend it blindly.

        Only once the folder has stayed unchanged for a lease (by our own clock, never the
        folder's mtime against it): a moment after another daemon's mkdir, its record is
        simply not written yet.
        """
        files = [p for p in job_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                 and not p.name.startswith(JOB_FILE)]
        if not files:
            # A claim that died before its record: the input never left the inbox. (Were
            # it another daemon's claim under way, its rename now fails and the file stays.)
            if _remove_if_empty(job_dir):
                log.info("empty_job_removed", job=job_dir.name)
            return
        if not self.spool.leases.quiet(job_dir):
            return
        # The type is unknown without the record: the first configured one holds it.
        job = Job(job=job_dir.name, type=self.config.spool.types[0], source=files[0].name,
                  file_name="", method="multipart", owner=self.spool.owner.name,
                  outcome="failed", reason="invalid-input",
                  error="the job record was missing or unreadable; not re-sent, to avoid "
                        "paying twice")
        with contextlib.suppress(FileNotFoundError):  # paid results go along, never lost
            job.results = {p.name: p.name for p in self.spool.results_dir(job).iterdir()
                           if p.is_file() and not p.name.startswith(".")}
        advance(job, JobState.FINISHING)
        self.spool.finish(job)


#: Recovery at start, driven by the state each job was saved in.
_RESUME: dict[JobState, Callable[[Recovery, Job], Awaitable[None]]] = {
    JobState.CLAIMED: Recovery._resume_claimed,
    JobState.UPLOADING: Recovery._resume_upload,
    JobState.SUBMITTED: Recovery._resume_submitted,
    JobState.FETCHED: Recovery._resume_follow,
    JobState.FINISHING: Recovery._resume_finish,
    JobState.RETURNING: Recovery._resume_return,
}


def _remove_if_empty(job_dir: Path) -> bool:
    """Remove a job folder that holds nothing but temporary files; False if something
    else is in it now. Never a recursive removal: another daemon's claim may be putting
    its record and input into the folder right now, and those must survive (its claim
    then fails at the next step, and the file stays in its inbox)."""
    with contextlib.suppress(FileNotFoundError):
        for path in job_dir.iterdir():
            if path.name.startswith("."):  # a temporary file (never an input or record)
                path.unlink(missing_ok=True)
    try:
        job_dir.rmdir()
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        return False
    return True
