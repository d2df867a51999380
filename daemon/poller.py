"""Follows submitted jobs until IPQS finishes them, then fetches their results.

One scheduler loop holds every submitted job in a heap ordered by its next status check, so
ten thousand jobs at IPQS are ten thousand small heap entries, not ten thousand tasks. The
interval per job starts short and grows by ``poll.factor`` up to ``poll.max_seconds``.

Paid results are never abandoned before ``poll.deadline_hours``, counted from the upload to
the filed results, whatever the state: a refused status call, a FINISHED answer without
links, a link that stays refused, all wait with backoff. At the deadline the job fails as
``timeout`` (IPQS never said FINISHED) or ``results-unavailable`` (it did), keeping its
IPQS id, so that ``ipqs-bulkd retry --results-only`` can fetch them without uploading.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.aio import wait_any
from daemon.api import CsvJob
from daemon.errors import AccountError, IpqsError, RejectedError, TransientError
from daemon.job.conversation import FINISHED, Verdict
from daemon.job.state import JobState
from daemon.job.verdicts import ResultsNotReady, UnknownJob
from daemon.pipeline import Pipeline
from daemon.spool import Job, utcnow

log = structlog.get_logger(__name__)

#: A status call that says the id is unknown fails the job only after this many in a row.
UNKNOWN_ID_REPEATS = 3


@dataclass(order=True)
class _Entry:
    due: float
    seq: int
    job: Job = field(compare=False)
    interval: float = field(compare=False)
    refusals: int = field(default=0, compare=False)  # "unknown id" answers in a row


class Poller:
    """Status checks and result downloads for every submitted job."""

    def __init__(self, pipe: Pipeline, *, concurrency: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pipe = pipe
        self.clock = clock
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._visiting: set[str] = set()  # jobs being checked now (out of the heap)

    def track(self, job: Job) -> None:
        """Follow this submitted job from now on."""
        self.pipe.started(job)
        cfg = self.pipe.config.poll
        self._push(job, cfg.initial_seconds, cfg.initial_seconds)

    def waiting(self) -> int:
        """Jobs this poller follows: in the heap, or being checked (each counted once)."""
        return len(self._heap) + len(self._visiting)

    def _push(self, job: Job, delay: float, interval: float, refusals: int = 0) -> None:
        self._visiting.discard(job.job)
        heapq.heappush(self._heap, _Entry(self.clock() + delay, next(self._seq), job, interval,
                                          refusals))
        self._wake.set()

    async def run(self) -> None:
        """Check due jobs until the stop event is set; in-flight checks are then cancelled
        (their state is on disk, so the next start resumes them)."""
        stop = self.pipe.stop
        try:
            while not stop.is_set():
                await self._start_due()
                timeout = self._heap[0].due - self.clock() if self._heap else None
                self._wake.clear()
                await wait_any(self._wake, stop, within=timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start_due(self) -> None:
        while self._heap and self._heap[0].due <= self.clock():
            await self._slots.acquire()
            entry = heapq.heappop(self._heap)
            self._visiting.add(entry.job.job)
            task = asyncio.create_task(self._visit(entry), name=f"poll-{entry.job.job}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _visit(self, entry: _Entry) -> None:
        job = entry.job
        structlog.contextvars.bind_contextvars(job=job.job, source=job.source)
        try:
            await self._check(entry)
        except UnknownJob as exc:
            await self._unknown(entry, exc)
        except (TransientError, AccountError, RejectedError) as exc:
            # Soft failures, outages, a setting to fix: the job was paid for, so it waits
            # with backoff until the deadline.
            await self._later(entry, exc)
        except OSError as exc:
            log.error("results_write_failed", error=str(exc))
            self._push(job, self.pipe.config.poll.max_seconds, entry.interval)
        except Exception:
            # A bug must not strand the job: log it and look again later.
            log.exception("poll_job_error")
            self._push(job, self.pipe.config.poll.max_seconds, entry.interval)
        finally:
            self._visiting.discard(job.job)  # finished, or back in the heap
            self._slots.release()
            structlog.contextvars.unbind_contextvars("job", "source")

    async def _unknown(self, entry: _Entry, exc: UnknownJob) -> None:
        """IPQS says it does not know the id: believed only when it says so repeatedly
        (purged, or another account's key); the record keeps the id for the operator."""
        job = entry.job
        refusals = entry.refusals + 1
        if refusals < UNKNOWN_ID_REPEATS:
            log.warning("status_unknown_id", id=job.id, error=exc.message, times=refusals)
            self._push(job, self._backoff(entry.interval), entry.interval, refusals)
            return
        await self._finish_safely(job, entry, "rejected",
                                  f"IPQS refused the status of job {job.id} {refusals} times: "
                                  f"{exc.message}")

    async def _later(self, entry: _Entry, exc: IpqsError) -> None:
        job, talk = entry.job, self.pipe.talk
        if talk.overdue(job):
            await self._give_up(entry, exc.message)
            return
        retry_after = getattr(exc, "retry_after", None) or 0
        delay = max(self._backoff(entry.interval), retry_after)
        what = "results" if isinstance(exc, ResultsNotReady) else "status"
        log.warning("results_retry" if what == "results" else "status_retry", error=str(exc),
                    wait=round(delay, 2))
        self.pipe.metrics.retries.labels(what, getattr(exc, "cause", "account")).inc()
        self._push(job, delay, min(entry.interval * 2, self.pipe.config.poll.max_seconds))

    def _backoff(self, interval: float) -> float:
        """Twice the interval, capped at ``poll.max_seconds``, with jitter."""
        cap = min(interval * 2, self.pipe.config.poll.max_seconds)
        return random.uniform(cap / 2, cap)

    async def _give_up(self, entry: _Entry, why: str) -> None:
        job, cfg = entry.job, self.pipe.config.poll
        hours = f"{cfg.deadline_hours:g} h (poll.deadline_hours)"
        if job.status != FINISHED and not job.fetch_attempts:
            await self._finish_safely(job, entry, "timeout",
                                      f"IPQS did not finish job {job.id} within {hours}: {why}")
            return
        await self._finish_safely(
            job, entry, "results-unavailable",
            f"IPQS finished job {job.id} (paid for), but its results could not be fetched "
            f"within {hours} after {job.fetch_attempts} attempt(s): {why}; "
            "`ipqs-bulkd retry --results-only` fetches them again without uploading")

    async def _finish_safely(self, job: Job, entry: _Entry, reason: str, error: str) -> None:
        try:
            await self.pipe.finish(job, "failed", reason, error)
        except Exception:
            log.exception("poll_job_error")
            self._push(job, self.pipe.config.poll.max_seconds, entry.interval)

    async def _check(self, entry: _Entry) -> None:
        job, pipe, cfg = entry.job, self.pipe, self.pipe.config.poll
        if job.state == JobState.FETCHED:
            await pipe.finish(job, "done")
            return
        answer, verdict = await pipe.talk.status(job)
        if verdict is Verdict.ABORTED:
            await pipe.finish(job, "failed", "aborted",
                              f"IPQS aborted the job (status {answer.status!r})")
        elif verdict is Verdict.FINISHED:
            await self._fetch(job, answer)
        elif verdict is Verdict.OVERDUE:
            await pipe.finish(job, "failed", "timeout",
                              f"IPQS did not finish the job within {cfg.deadline_hours:g} h "
                              "(poll.deadline_hours)")
        else:
            # NEW, PROCESSING, or a status IPQS has not documented: wait (the deadline is
            # the backstop), rather than abandon results that may be paid for.
            if verdict is Verdict.UNKNOWN:
                log.warning("status_unknown", status=answer.status)
            interval = min(entry.interval * cfg.factor, cfg.max_seconds)
            self._push(job, entry.interval, interval)

    async def _fetch(self, job: Job, answer: CsvJob) -> None:
        """Download every configured set not yet here, then finish the job; results not
        ready yet raise :class:`ResultsNotReady`, counted on the job's record."""
        pipe = self.pipe
        folder = pipe.spool.results_dir(job)
        job.finished_at = job.finished_at or utcnow()
        await asyncio.to_thread(folder.mkdir, exist_ok=True)

        async def placed(name: str, path: Path, size: int) -> None:
            job.results[name] = name

        have = set(job.results)
        try:
            await pipe.talk.fetch_round(job, answer, folder.joinpath, mode=pipe.spool.file_mode,
                                        placed=placed, have=have)
        except ResultsNotReady:
            job.fetch_attempts += 1
            await pipe.save(job)  # the attempts and any sets fetched so far
            raise
        await pipe.save(job, JobState.FETCHED)
        await pipe.finish(job, "done")
