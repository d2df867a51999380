"""One claimed job, taken to ``submitted`` (or to failed/, or back to its inbox).

The rule that keeps users from paying twice: the job is saved as ``uploading`` before a
whole body can reach IPQS (before the POST, or, for a file read as it goes out, before its
last chunk), and an upload whose answer may have been lost (:class:`LostAnswerError`, or a
restart after ``uploading`` was saved) is looked up through the list API by its unique
``file_name`` before anything is sent again. Only "surely absent" (two lookups, some
seconds apart) allows a new POST. The checks themselves live in the job layer
(:mod:`daemon.job.conversation`, :mod:`daemon.job.gate`, :mod:`daemon.job.money`).
"""

from __future__ import annotations

import asyncio
import functools
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import structlog

from daemon.api import InputChangedError
from daemon.credits import Admission
from daemon.errors import (
    AccountError,
    IpqsError,
    RejectedError,
    TransientError,
)
from daemon.inputs import first_row_is_header, json_rows, url_file_problem
from daemon.job.breaker import Permit
from daemon.job.conversation import NotSendable, Orphaned, reads_as_sent
from daemon.job.duplicates import take_marker
from daemon.job.gate import Changed, Taken, TooLarge, WaitsForMoney, pass_last_chunk
from daemon.job.state import JobState
from daemon.pipeline import Pipeline
from daemon.spool import Job
from daemon.watcher import Candidate

log = structlog.get_logger(__name__)

#: Files sent back to their inbox to wait for money (budget, balance), by type and name:
#: (size, mtime_ns, rows). Asked about again before they are claimed again.
Waiting = dict[tuple[str, str], tuple[int | None, int | None, int | None]]


class Tracker(Protocol):
    """Where submitted jobs go next (the poller)."""

    def track(self, job: Job) -> None: ...


class _Stop(Exception):
    """This job goes no further in this run (paused, taken over, or back in its inbox)."""


class Sender:
    """Takes one claimed (or resumed) job at a time through its checks and its upload."""

    def __init__(self, pipe: Pipeline, tracker: Tracker, waiting: Waiting) -> None:
        self.pipe = pipe
        self.tracker = tracker
        self.waiting = waiting
        # Workers and resumed jobs together never upload more than ``concurrency`` at once.
        # A slot is held for the POST only; with twice as many workers as slots, the next
        # files are claimed, hashed and marked meanwhile, so no slot waits for the disk.
        self._slots = asyncio.Semaphore(pipe.config.upload.concurrency)
        self._window = pipe.config.upload.duplicate_window_hours * 3600

    async def process(self, job: Job, permit: Permit | None = None,
                      candidate: Candidate | None = None) -> None:
        """Take a claimed or half-uploaded job to ``submitted`` (or to failed/).

        Never raises: whatever stops a job here leaves it in processing/ for the recovery
        sweep or the next start, and never stops the daemon.
        """
        pipe = self.pipe
        pipe.started(job)
        structlog.contextvars.bind_contextvars(job=job.job, source=job.source)
        try:
            if candidate is not None and await self._stale(job, candidate):
                return
            if job.state == JobState.CLAIMED and not await self._prepare(job):
                return
            if permit is not None:
                await self._submit(job, permit)
                return
            permit = await pipe.breaker.acquire(pipe.stop)
            if permit is None:
                raise _Stop
            try:
                await self._submit(job, permit)
            finally:
                pipe.breaker.release(permit)
        except _Stop:
            pipe.forget(job)
        except (TransientError, OSError, IpqsError) as exc:
            # Stopping (transient errors are retried until then), disk trouble, or a refusal
            # during a lookup: the job stays in processing/, to be resumed later.
            log.warning("upload_interrupted", error=str(exc), state=job.state)
            pipe.forget(job)
        except Exception:
            # A bug must cost one file its progress, never the daemon its workers.
            log.exception("upload_job_error", state=job.state)
            pipe.forget(job)
        finally:
            structlog.contextvars.unbind_contextvars("job", "source")

    async def _stale(self, job: Job, candidate: Candidate) -> bool:
        """Did the file change between settling and the claim (a writer came back)? Then
        it goes back to its inbox, to settle again."""
        try:
            now = await asyncio.to_thread(self.pipe.spool.input_path(job).lstat)
        except FileNotFoundError:
            return False  # inspect() gives it its outcome
        if (now.st_size, now.st_mtime_ns, now.st_ino) == (
                candidate.size, candidate.mtime_ns, candidate.inode):
            return False
        log.info("file_changed_before_claim")
        await self._return_to_inbox(job)
        return True

    async def _prepare(self, job: Job) -> bool:
        """Inspect (once), check the per-file cap and take the duplicate marker; False if
        the job ended here. A multipart file is only stat'ed here: its upload body is the
        one read of it, and the cap and the marker come just before its last chunk
        (:func:`daemon.job.gate.pass_last_chunk`)."""
        if job.sha256 is None and not await self._inspect(job):
            return False
        if job.sha256 is None:
            return True  # read as it goes out
        too_large = self.pipe.purse.too_large(job.rows)
        if too_large is not None:
            await self._fail_too_large(job, too_large)
            return False
        return await self._check_duplicate(job)

    async def _fail_too_large(self, job: Job, why: str) -> None:
        await self.pipe.finish(job, "failed", "too-large", why + (
            "; to send it, raise the cap and run `ipqs-bulkd retry --force` on it"))

    async def _inspect(self, job: Job, *, read: bool = False) -> bool:
        """Hash and check the claimed input (once: the claim-time facts are kept, so a later
        change is caught); False if the job ended here as invalid input. A multipart file
        is only stat'ed, unless ``read``: its upload body is the one read of it."""
        pipe = self.pipe
        try:
            problem = await asyncio.to_thread(pipe.spool.inspect, job,
                                              read=read or job.method != "multipart")
            if job.method == "url":
                job.rows = None  # what IPQS fetches is not known here
            if problem is None and job.method == "url":
                problem = await asyncio.to_thread(url_file_problem, pipe.spool.input_path(job))
            elif problem is None and job.method == "json":
                problem = await self._json_problem(job)
            if problem is None and job.method != "url":
                job.header_row = await asyncio.to_thread(first_row_is_header,
                                                         pipe.spool.input_path(job))
        except FileNotFoundError:
            problem = "the file vanished after it was claimed"
        except OSError as exc:
            # Unreadable, a symlink or fifo swapped in, ...: never retried, never followed.
            problem = f"the file cannot be read as a regular file: {exc.strerror or exc}"
        if problem is not None:
            await pipe.finish(job, "failed", "invalid-input", problem)
            return False
        await pipe.save(job)
        return True

    async def _json_problem(self, job: Job) -> str | None:
        limit = self.pipe.config.upload.json_max_bytes
        if (job.bytes or 0) > limit:
            # A JSON body is built in memory: large files go as a streamed multipart (read
            # for its facts already: its body is then a second read).
            log.info("json_too_large_using_multipart", bytes=job.bytes, limit=limit)
            job.method = "multipart"
            return None
        rows, problem = await asyncio.to_thread(json_rows, self.pipe.spool.input_path(job))
        job.rows = rows  # the JSON body's rows are what IPQS bills, not the file's lines
        return problem

    async def _check_duplicate(self, job: Job) -> bool:
        """Take the content's duplicate marker; False if the job ended here as a duplicate."""
        pipe = self.pipe
        # A marker that a submit left unresolved is looked up at IPQS first.
        earlier = await take_marker(pipe.spool, pipe.talk, job, self._window)
        if earlier is not None:
            job.id = None
            await pipe.finish(job, "failed", "duplicate",
                              f"the same content was taken as job {earlier.get('job')} "
                              f"(IPQS id {earlier.get('id')}) within "
                              f"{pipe.config.upload.duplicate_window_hours:g} h")
            return False
        return True

    async def _submit(self, job: Job, permit: Permit) -> None:
        pipe = self.pipe

        def slot() -> AbstractAsyncContextManager[object]:
            return self._slots  # "uploading" is saved once a slot is ours

        async def check(job: Job) -> None:
            await self._may_send(job, permit)
            # From here on a POST may reach IPQS: the marker says so, and keeps the content
            # taken for the window, whatever becomes of this job folder.
            await asyncio.to_thread(pipe.spool.update_mark, job, sending=True)

        try:
            await pipe.talk.send(job, path=pipe.spool.input_path(job), check=check, slot=slot,
                                 fence=self._fence, inspected=functools.partial(
                                     pass_last_chunk, pipe.purse, pipe.spool,
                                     window_seconds=self._window))
        except (NotSendable, TooLarge, Taken, WaitsForMoney, Changed) as exc:
            await self._stopped_before_end(job, exc, permit)
            return
        except Orphaned as exc:
            await self._orphaned(job, exc)
            raise _Stop from None
        except (_InputChanged, InputChangedError):
            if job.uploads == 0:  # never sent: a re-drop of the content may go through
                await asyncio.to_thread(pipe.spool.unmark, job)
            await pipe.finish(job, "failed", "invalid-input",
                              "the file changed or vanished after it was claimed")
            return
        except RejectedError as exc:
            pipe.breaker.success()
            await self._rejected(job, exc)
            return
        except AccountError as exc:
            pipe.breaker.failure(exc.message, permit)
            pipe.purse.account_error()
            if job.uploads > 1 or exc.maybe_sent:
                # An earlier POST of this job (or this one: a redirect answered a sent body)
                # may yet show up at IPQS: keep its name and marker, so the next attempt
                # looks it up instead of paying under a new one.
                raise _Stop from None
            await self._return_to_inbox(job, exc.message)
            return
        await asyncio.to_thread(pipe.spool.update_mark, job)
        pipe.breaker.success()
        pipe.purse.accepted(job)
        if job.rows is not None:
            pipe.metrics.rows.labels(job.type).inc(job.rows)
        log.info("file_submitted", id=job.id, file_name=job.file_name, method=job.method,
                 rows=job.rows)
        self.tracker.track(job)

    async def _rejected(self, job: Job, exc: RejectedError) -> None:
        """IPQS refused the file. Its duplicate marker goes only when IPQS surely has no job:
        the refusal answered our POST (an answer with an id is never a refusal), not a
        lookup of an upload whose answer was lost."""
        pipe = self.pipe
        if not exc.maybe_sent and job.uploads <= 1:  # no earlier POST may show up either
            await pipe.purse.released(job)  # nothing was billed
            await asyncio.to_thread(pipe.spool.unmark, job)
            await pipe.finish(job, "failed", "rejected", exc.message)
            return
        pipe.purse.forget(job)  # maybe billed: its rows stay counted in the budget
        await pipe.finish(job, "failed", "rejected",
                          f"{exc.message}; an earlier upload may be at IPQS as file_name "
                          f"{job.file_name}, so the content stays marked as taken")

    async def _may_send(self, job: Job, permit: Permit) -> None:
        """Last checks before a POST: the input is as claimed, the breaker has not opened
        since the permit was issued, and the job is still ours."""
        pipe = self.pipe
        if pipe.stop.is_set():
            if job.state == JobState.CLAIMED:  # never sent: back to its inbox
                await self._return_to_inbox(job)
            raise _Stop  # no new attempt once the daemon is stopping
        if await asyncio.to_thread(pipe.spool.changed, job):
            raise _InputChanged
        if not pipe.breaker.allows(permit):
            if job.state == JobState.CLAIMED:
                await self._return_to_inbox(job)
            raise _Stop
        if not await asyncio.to_thread(pipe.spool.owns, job):
            log.warning("job_taken_over", owner_now="another daemon")
            raise _Stop
        # Last, before every POST (a re-send after "absent" too; a hold is kept until the
        # answer): what it admits is held until the answer.
        await self._money_before_post(job)

    async def _money_before_post(self, job: Job) -> None:
        """Admit ``job``, or make it wait for money (raising _Stop). A file read as it goes
        out is admitted before its last chunk instead; here only whether a row would fit."""
        pipe = self.pipe
        if reads_as_sent(job):  # admitted before its last chunk: here, would a row fit?
            if await pipe.purse.fits(job.type, 1):
                return
            # Not even a row would fit. Read it now, so that what it waits for is told in
            # its own rows (and a file over the cap fails now, not after its body).
            if job.sha256 is None and not await self._inspect(job, read=True):
                raise _Stop
            too_large = pipe.purse.too_large(job.rows)
            if too_large is not None:
                await self._fail_too_large(job, too_large)
                raise _Stop
            admission = await pipe.purse.would_admit(job.type, job.rows)
            if admission.allowed:
                return  # money came meanwhile
            await self._wait_for_money(job, admission)
        admission = await pipe.purse.admit(job)
        if not admission.allowed:
            await self._wait_for_money(job, admission)

    async def _wait_for_money(self, job: Job, admission: Admission) -> None:
        """Not sent for want of money: a file never sent waits in its inbox, asked about
        again before it is claimed again; a re-send stays in processing/."""
        if job.state == JobState.CLAIMED:
            self.waiting[(job.type, job.source)] = (
                job.bytes, job.mtime_ns, 1 if job.rows is None else job.rows)
            await self._return_to_inbox(job, admission.reason)
        log.warning("resend_waits_for_money", reason=admission.reason)
        raise _Stop  # stays in processing/: looked up and admitted again later

    async def _stopped_before_end(self, job: Job, exc: Exception, permit: Permit) -> None:
        """The body of a file read as it went out was stopped before its last chunk: IPQS
        got no whole file, and the job is still ``claimed``, its facts now known."""
        log.info("upload_body_stopped", reason=str(exc))
        if not await asyncio.to_thread(self.pipe.spool.still_ours, job):
            # Taken over while its body went out: the new owner decides its fate.
            log.warning("job_taken_over", owner_now="another daemon")
            raise _Stop
        if isinstance(exc, NotSendable | Changed):
            await self.pipe.finish(job, "failed", "invalid-input", str(exc))
        elif isinstance(exc, TooLarge):
            await self._fail_too_large(job, str(exc))
        elif isinstance(exc, WaitsForMoney):
            await self._wait_for_money(job, exc.admission)
        elif await self._check_duplicate(job):
            # The marker was held, but its holder turned out to have sent nothing (a submit
            # that was looked up): ours now, sent as any file whose facts are known.
            await self._submit(job, permit)

    def _fence(self, job: Job) -> None:
        """Before an upload body's last chunk (blocking, in a worker thread): is the job
        still ours? A daemon frozen past its lease may have been replaced meanwhile."""
        if not self.pipe.spool.still_ours(job):
            log.warning("upload_fenced", reason="the job is no longer ours: lease expired "
                        "or taken over; the body was stopped before its end")
            raise _Stop

    async def _orphaned(self, job: Job, exc: Orphaned) -> None:
        """IPQS accepted an upload of a job we no longer own: a second payment. Record it
        where an operator finds it (never over the new owner's record)."""
        self.pipe.metrics.orphaned.inc()
        try:
            where = str(await asyncio.to_thread(self.pipe.spool.write_orphan, job,
                                                exc.answer.id, str(exc)))
        except OSError as error:
            where = f"not written: {error}"
        log.error("upload_orphaned", id=exc.answer.id, file_name=job.file_name, record=where,
                  error="IPQS accepted an upload of a job another daemon had taken over: "
                  "this content was paid twice; fetch or cancel that IPQS job")

    async def _return_to_inbox(self, job: Job, reason: str | None = None) -> None:
        """Nothing was sent (or IPQS refused the account, which creates nothing): the file
        goes back to its inbox, and the job is no longer ours to run."""
        await self.pipe.purse.released(job)
        await self.pipe.unclaim(job)
        log.info("file_returned_to_inbox", reason=reason)
        raise _Stop


class _InputChanged(Exception):
    """The input's size or mtime moved since it was inspected."""
