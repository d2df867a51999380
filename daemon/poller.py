"""Follows submitted jobs until IPQS finishes them, then fetches their results.

One scheduler loop holds every submitted job in a heap ordered by its next status check, so
ten thousand jobs at IPQS are ten thousand small heap entries, not ten thousand tasks. The
interval per job starts short and grows by ``poll.factor`` up to ``poll.max_seconds``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.aio import wait_any
from daemon.api import CsvJob
from daemon.errors import AccountError, RejectedError, TransientError
from daemon.job.conversation import Verdict
from daemon.job.state import JobState
from daemon.pipeline import Pipeline
from daemon.spool import Job, utcnow

log = structlog.get_logger(__name__)



@dataclass(order=True)
class _Entry:
    due: float
    seq: int
    job: Job = field(compare=False)
    interval: float = field(compare=False)


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

    def _push(self, job: Job, delay: float, interval: float) -> None:
        self._visiting.discard(job.job)
        heapq.heappush(self._heap, _Entry(self.clock() + delay, next(self._seq), job, interval))
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
        except RejectedError as exc:
            # IPQS no longer knows the id (purged, or another account's key): nothing to
            # wait for any more. The record keeps the id for the operator.
            await self._finish_safely(job, entry, "rejected",
                                      f"IPQS refused the status of job {job.id}: {exc.message}")
        except (TransientError, AccountError) as exc:
            delay = min(max(entry.interval, getattr(exc, "retry_after", None) or 0) * 2,
                        self.pipe.config.poll.max_seconds)
            log.warning("status_retry", error=str(exc), wait=round(delay, 2))
            self.pipe.metrics.retries.labels("status", getattr(exc, "cause", "account")).inc()
            self._push(job, delay, entry.interval)
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
        """Download every configured, non-empty result set, then finish the job."""
        pipe = self.pipe
        folder = pipe.spool.results_dir(job)
        job.finished_at = job.finished_at or utcnow()
        await asyncio.to_thread(folder.mkdir, exist_ok=True)

        async def placed(name: str, path: Path, size: int) -> None:
            job.results[name] = name

        try:
            await pipe.talk.fetch(job, answer, folder.joinpath, mode=pipe.spool.file_mode,
                                  placed=placed)
        except RejectedError as exc:
            await pipe.finish(job, "failed", "rejected",
                              f"results could not be downloaded: {exc.message}")
            return
        await pipe.save(job, JobState.FETCHED)
        await pipe.finish(job, "done")
