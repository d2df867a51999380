"""What the stages share: the spool, the client, metrics, the circuit breaker, and the one
way a job ends (in done/ or failed/, with its summary log line)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from tenacity import AsyncRetrying

from daemon import retry
from daemon.aio import wait_any
from daemon.api import IpqsClient
from daemon.config import Config
from daemon.metrics import Metrics
from daemon.spool import Job, Spool, utcnow

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Permit:
    """Leave to send uploads, from :meth:`Breaker.acquire`.

    ``generation`` tells which breaker state the permit was issued in, so that the failures
    of uploads that were already under way when the breaker opened count once, not once
    each.
    """

    probe: bool
    generation: int


class Breaker:
    """Pauses uploads after an account error (bad key, no credits).

    While open, uploads wait. After a delay (doubling up to ``cap``) one upload is let
    through as a probe: success closes the breaker, another account error reopens it. So the
    queue drains by itself once the account works again, and a broken account costs one
    request per probe, not one per file. State changes are logged once, not per file.
    """

    def __init__(self, initial: float = 5.0, cap: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial = initial
        self.cap = cap
        self.clock = clock
        self.reason: str | None = None
        self._delay = initial
        self._probe_at = 0.0
        self._probing = False
        self._generation = 0
        self._changed = asyncio.Event()

    @property
    def paused(self) -> bool:
        return self.reason is not None

    async def acquire(self, stop: asyncio.Event) -> Permit | None:
        """Wait until an upload may go out; None if ``stop`` was set first."""
        while not stop.is_set():
            if self.reason is None:
                return Permit(probe=False, generation=self._generation)
            wait = self._probe_at - self.clock()
            if wait <= 0 and not self._probing:
                self._probing = True
                return Permit(probe=True, generation=self._generation)
            self._changed.clear()
            await wait_any(self._changed, stop, within=None if self._probing else max(wait, 0.05))
        return None

    def allows(self, permit: Permit) -> bool:
        """May this permit still send? Not once the breaker opened after it was issued
        (unless it is the probe): checked right before each POST."""
        return self.reason is None or permit.probe

    def success(self) -> None:
        if self.reason is not None:
            log.info("uploads_resumed", after=self.reason)
        self.reason = None
        self._delay = self.initial
        self._probing = False
        self._generation += 1
        self._changed.set()

    def failure(self, reason: str, permit: Permit | None = None) -> None:
        """An account error. From an upload that started before the breaker last changed
        state (a concurrent one), it changes nothing: only the first verdict counts."""
        if permit is not None and permit.generation != self._generation:
            return
        if self.reason is None:
            log.error("uploads_paused", reason=reason, retry_in=self._delay)
        self.reason = reason
        self._probe_at = self.clock() + self._delay
        self._delay = min(self._delay * 2, self.cap)
        self._probing = False
        self._generation += 1
        self._changed.set()

    def release(self, permit: Permit | None) -> None:
        """The permit's upload ended without a verdict (nothing sent, or transient trouble):
        if it was the probe, let another try."""
        if permit is not None and permit.probe and self._probing \
                and permit.generation == self._generation:
            self._probing = False
            self._changed.set()


@dataclass
class Pipeline:
    """The shared parts of one running daemon."""

    config: Config
    spool: Spool
    client: IpqsClient
    stop: asyncio.Event
    metrics: Metrics = field(default_factory=Metrics)
    breaker: Breaker = field(default_factory=Breaker)
    outcomes: dict[str, int] = field(default_factory=lambda: {"done": 0, "failed": 0})
    active: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self, job: Job) -> None:
        self.active.add(job.job)
        self.idle.clear()

    async def save(self, job: Job) -> None:
        await asyncio.to_thread(self.spool.save, job)

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

    async def finish(self, job: Job, outcome: str, reason: str | None = None,
                     error: str | None = None) -> None:
        """Move the job to done/ or failed/ and log its one summary line.

        Disk trouble (ENOSPC, EACCES) never loses the input: the job stays in processing/
        and the move is retried with backoff until it works or the daemon stops.
        """
        job.outcome, job.reason, job.error = outcome, reason, error
        job.finished_at = job.finished_at or utcnow()
        delay = 1.0
        while True:
            try:
                record = await asyncio.to_thread(self.spool.finish, job)
                break
            except OSError as exc:
                log.error("finish_failed", job=job.job, error=str(exc), retry_in=delay)
                if self.stop.is_set():
                    return
                await retry.stoppable_sleep(self.stop)(delay)
                delay = min(delay * 2, 60.0)
        self._count(job, outcome, reason)
        log.info("file_finished", type=job.type, source=job.source, id=job.id, rows=job.rows,
                 bytes=job.bytes, seconds=_seconds_since(job.claimed_at), outcome=outcome,
                 reason=reason, error=error, record=str(record))

    def _count(self, job: Job, outcome: str, reason: str | None) -> None:
        self.metrics.files.labels(job.type, outcome, reason or "").inc()
        self.outcomes[outcome] += 1
        self.forget(job)

    def forget(self, job: Job) -> None:
        """The job is no longer this daemon's business (finished, or left for later)."""
        if job.outcome is None and self.spool.job_dir(job).exists():
            self.left.add(job.job)  # still in processing/: a batch did not complete
        else:
            self.left.discard(job.job)
        self.forget_id(job.job)

    def forget_id(self, job_id: str) -> None:
        self.active.discard(job_id)
        if not self.active:
            self.idle.set()


def _seconds_since(iso: str | None) -> float | None:
    if iso is None:
        return None
    started = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return round(time.time() - started.timestamp(), 3)
