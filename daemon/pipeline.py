"""What the stages share: the spool, the client, metrics, the circuit breaker, the in-flight
bookkeeping, and the one way a job ends (in done/ or failed/, with its summary log line)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying

from daemon import retry
from daemon.api import CsvJob, IpqsClient
from daemon.config import Config
from daemon.finishing import Finishing
from daemon.hooks import HookRunner
from daemon.job.breaker import Breaker
from daemon.job.conversation import Conversation, Hooks
from daemon.job.inflight import InFlight
from daemon.job.money import Purse
from daemon.job.state import JobState, advance
from daemon.metrics import Metrics
from daemon.spool import Job, Spool, utcnow

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class Pipeline:
    """The shared parts of one running daemon."""

    config: Config
    spool: Spool
    client: IpqsClient
    stop: asyncio.Event
    metrics: Metrics = field(default_factory=Metrics)
    breaker: Breaker = field(default_factory=Breaker)
    jobs: InFlight = field(default_factory=InFlight)
    #: The money guards; none unless given (the service gives those of ``[budget]``).
    purse: Purse = field(default_factory=Purse)
    talk: Conversation = field(init=False)
    finishing: Finishing = field(init=False)
    hooks: HookRunner = field(init=False)
    #: Jobs put back into their inbox (their folder is gone), until forgotten.
    _returned: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.talk = Conversation(self.client, self.config, self, stop=self.stop,
                                 hooks=Metered(self.metrics), save=self.save)
        # Final moves run in threads of their own: a folder that hangs or refuses them must
        # never hold the default pool, which every other stage's file work goes through.
        self._finish_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="finish")
        max_seconds = self.config.poll.max_seconds
        self.finishing = Finishing(self._move, self._finished, self.stop,
                                   initial_seconds=min(1.0, max_seconds),
                                   max_seconds=max_seconds)
        self.hooks = HookRunner(self.config.hooks, self.spool, self.metrics, self.stop,
                                secret=self.config.api.key)

    @property
    def outcomes(self) -> Mapping[str, int]:
        return self.jobs.outcomes

    def started(self, job: Job) -> None:
        self.jobs.started(job.job)

    async def save(self, job: Job, state: JobState | None = None) -> None:
        """Write the job's record, moved to ``state`` first if given (a checked transition)."""
        if state is not None:
            advance(job, state)
        await asyncio.to_thread(self.spool.save, job)

    async def unclaim(self, job: Job) -> None:
        """Put the input back into its inbox; ``returning`` is saved first."""
        await self.save(job, JobState.RETURNING)
        await asyncio.to_thread(self.spool.unclaim, job)
        self._returned.add(job.job)

    def retrying(self, operation: str, *, retry_lost_answers: bool = True) -> AsyncRetrying:
        cfg = self.config.upload

        def on_retry(exc: BaseException, wait: float) -> None:
            cause = getattr(exc, "cause", "other")
            self.metrics.retries.labels(operation, cause).inc()
            log.warning("api_retry", operation=operation, cause=cause, wait=round(wait, 2),
                        error=str(exc))

        return retry.retrying(initial=cfg.retry_initial_seconds, maximum=cfg.retry_max_seconds,
                              stop=self.stop, on_retry=on_retry,
                              retry_lost_answers=retry_lost_answers)

    async def call(self, what: str, fn: Callable[[], Awaitable[T]], *,
                   retry_lost_answers: bool = True) -> T:
        """One API call, retried on transient trouble until it works or the daemon stops."""
        async for attempt in self.retrying(what, retry_lost_answers=retry_lost_answers):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def finish(self, job: Job, outcome: str, reason: str | None = None,
                     error: str | None = None) -> None:
        """Move the job to done/ or failed/ and log its one summary line.

        Disk trouble (EACCES, ENOSPC) never loses the input and never holds the caller: the
        job stays in processing/ and waits in :attr:`finishing`, retried with backoff.
        """
        job.outcome, job.reason, job.error = outcome, reason, error
        job.finished_at = job.finished_at or utcnow()
        advance(job, JobState.FINISHING)  # spool.finish saves it with final_name
        try:
            record = await self._move(job)
        except OSError as exc:
            folder = self.spool.outcome_dir(outcome, job.type).relative_to(self.spool.root)
            self.finishing.hold(job, str(folder), exc)
            return
        self._finished(job, record)

    def _finished(self, job: Job, record: Path) -> None:
        outcome = job.outcome or "failed"
        self._count(job, outcome, job.reason)
        self.hooks.queue(job.job)
        log.info("file_finished", type=job.type, source=job.source, id=job.id, rows=job.rows,
                 bytes=job.bytes, seconds=_seconds_since(job.claimed_at), outcome=outcome,
                 reason=job.reason, error=job.error, record=str(record))

    async def _move(self, job: Job) -> Path:
        """spool.finish in a thread. A thread cannot be stopped: if we are cancelled
        meanwhile (shutdown), the move still completes, so wait for it and count the job
        before passing the cancellation on; the bookkeeping then matches done/ and failed/."""
        loop = asyncio.get_running_loop()
        moving = asyncio.ensure_future(loop.run_in_executor(self._finish_pool,
                                                            self.spool.finish, job))
        try:
            return await asyncio.shield(moving)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await moving
                self._count(job, job.outcome or "failed", job.reason)
            raise

    def close(self) -> None:
        """Let the finishing threads go (a move under way completes first)."""
        self._finish_pool.shutdown(wait=False)

    def _count(self, job: Job, outcome: str, reason: str | None) -> None:
        self.metrics.files.labels(job.type, outcome, reason or "").inc()
        self.jobs.finished(job.job, outcome)

    def forget(self, job: Job) -> None:
        """The job is no longer this daemon's business (finished, or left for later)."""
        self.purse.forget(job)
        # Still in processing/ without an outcome: a batch did not complete it. (Known
        # without a look at the disk, which may hang, from the event loop.)
        returned = job.job in self._returned
        self._returned.discard(job.job)
        self.jobs.forget(job.job, left_behind=job.outcome is None and not returned)


class Metered(Hooks):
    """The daemon's ear on the conversation: metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def timed(self, what: str) -> AbstractContextManager[object]:
        return self.metrics.api_latency.labels(what).time()

    def sending(self, job: Job, note: str | None) -> None:
        self.metrics.uploads.labels(job.method).inc()

    def sent(self, job: Job) -> None:
        self.metrics.upload_bytes.inc(job.bytes or 0)

    def looked_up(self, job: Job, found: CsvJob | None) -> None:
        if found is not None:
            self.metrics.adopted.inc()


def _seconds_since(iso: str | None) -> float | None:
    if iso is None:
        return None
    started = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return round(time.time() - started.timestamp(), 3)
