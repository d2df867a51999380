"""The ``on_finish`` hook: a program run for every finished file, at least once.

The spool keeps a notice per finished file until its hook exits 0 (:mod:`daemon.spool.notices`;
the notice is written before the file is moved). This runner works through those notices:
the ones the pipeline hands it as files finish, and every notice on disk at start and at each
rescan (left by a crash, a ``kill -9``, or a daemon on the same spool that died). A hook that
fails, cannot start or outlives ``hooks.timeout_seconds`` is retried with capped exponential
backoff. Hooks run as subprocesses beside everything else: they never hold an upload, the
poller or the finishing queue, and a failing hook never moves a file back.

A hook is run without a shell: ``hooks.on_finish`` plus the record's path as the last
argument, with ``IPQS_BULKD_OUTCOME``, ``IPQS_BULKD_TYPE`` and ``IPQS_BULKD_RECORD`` added to
the daemon's environment, and the API key taken out of it (:func:`hook_environment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from asyncio.subprocess import DEVNULL, PIPE
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from daemon.aio import wait_any
from daemon.config import ENV_KEY, HOOK_ENV, HooksConfig
from daemon.metrics import Metrics
from daemon.spool import Spool
from daemon.spool.notices import Notice

log = structlog.get_logger(__name__)

#: Never passed to a hook: the key, where it would be read from, and the daemon's own
#: line to systemd (a hook must not report readiness or pet the watchdog in its name).
_WITHHELD = (ENV_KEY, "IPQS_BULKD_API_KEY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET",
             "WATCHDOG_USEC", "WATCHDOG_PID", *HOOK_ENV)
#: How much of a failing hook's stderr is kept for its log line.
_TAIL_BYTES = 1000


def hook_environment(environ: Mapping[str, str], secret: str) -> dict[str, str]:
    """The daemon's environment without the API key: neither its variables nor any
    variable whose value holds the key."""
    return {name: value for name, value in environ.items()
            if name not in _WITHHELD and not (secret and secret in value)}


@dataclass(frozen=True)
class Attempt:
    """How one run of the hook went: ``error`` is None when it exited 0."""

    error: str | None
    result: str  # ok | failed | timeout


class HookRunner:
    """Runs ``hooks.on_finish`` for finished files until each has exited 0 once.

    ``queue(job)`` is told of every file that finished (from the event loop; it never
    blocks). Retries back off from ``initial_seconds``, doubling up to ``max_seconds``.
    """

    #: Notices on disk are looked for this often (a crash's leftovers, a dead peer's).
    rescan_seconds = 60.0
    #: Hooks running at once; more finished files wait their turn.
    concurrency = 4

    def __init__(self, config: HooksConfig, spool: Spool, metrics: Metrics,
                 stop: asyncio.Event, *, secret: str, initial_seconds: float = 5.0,
                 max_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._argv = config.on_finish
        self._timeout = config.timeout_seconds
        self._spool = spool
        self._metrics = metrics
        self._stop = stop
        self._initial = initial_seconds
        self._max = max(max_seconds, initial_seconds)
        self._clock = clock
        self._env = hook_environment(os.environ, secret)
        self._due: dict[str, float] = {}  # job -> when its next attempt may start
        self._attempts: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._wake = asyncio.Event()
        self._scanned = False

    @property
    def enabled(self) -> bool:
        return bool(self._argv)

    def queue(self, job: str) -> None:
        """``job``'s file has been moved to done/ or failed/: run its hook soon."""
        if self.enabled:
            if job in self._tasks:  # a rescan's attempt may have found it not yet moved
                self._again.add(job)
            self._due.setdefault(job, self._clock())
            self._wake.set()

    def pending(self) -> int:
        """Finished files whose hook has not yet exited 0."""
        return len(self._due)

    def failing(self) -> int:
        """...of which the hook failed at least once."""
        return sum(1 for job in self._due if self._attempts.get(job, 0) > 0)

    def settled(self) -> bool:
        """Has every hook owed been tried at least once, with none running now?"""
        now = self._clock()
        return self._scanned and not self._tasks and all(
            due > now for due in self._due.values())

    async def run(self) -> None:
        """Run hooks as they fall due until the stop event is set."""
        if not self.enabled:
            await asyncio.to_thread(self._say_unowed)
            return
        next_scan = self._clock()
        try:
            while not self._stop.is_set():
                if self._clock() >= next_scan:
                    await self._rescan()
                    next_scan = self._clock() + self.rescan_seconds
                self._start_due()
                self._wake.clear()
                due = [d for j, d in self._due.items() if j not in self._tasks]
                wake_at = min([next_scan, *due]) if len(self._tasks) < self.concurrency \
                    else next_scan
                await wait_any(self._wake, self._stop, within=wake_at - self._clock())
        finally:
            await self._drain()

    async def _drain(self) -> None:
        """Hooks under way get the shutdown grace; cancelled after it, they are killed and
        their notices stay for the next start."""
        tasks = list(self._tasks.values())
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start_due(self) -> None:
        now = self._clock()
        for job, due in sorted(self._due.items(), key=lambda item: item[1]):
            if len(self._tasks) >= self.concurrency:
                return
            if due <= now and job not in self._tasks:
                task = asyncio.create_task(self._attempt(job), name=f"hook-{job}")
                self._tasks[job] = task
                task.add_done_callback(functools.partial(self._done, job))

    def _done(self, job: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job, None)
        self._wake.set()

    async def _rescan(self) -> None:
        """Take up the notices on disk that are ours to run."""
        jobs = await asyncio.to_thread(self._owed)
        for job in jobs:
            self._due.setdefault(job, self._clock())
        self._scanned = True

    def _owed(self) -> list[str]:
        """Notices on disk (blocking): ours, or left by a daemon that is surely gone."""
        notices, leases, me = self._spool.notices, self._spool.leases, self._spool.owner.name
        owed = []
        for job in notices.jobs():
            if job in self._due:
                continue
            notice = notices.load(job)
            if notice is not None and (notice.owner in ("", me) or leases.gone(
                    notice.owner, self._spool.notice(job))):
                owed.append(job)
        return owed

    async def _attempt(self, job: str) -> None:
        try:
            await self._run_one(job)
        except OSError as exc:  # the spool cannot be read or written now: later
            self._back_off(job)
            log.warning("hook_notice_error", job=job, error=str(exc))

    async def _run_one(self, job: str) -> None:
        notice = await asyncio.to_thread(self._ready, job)
        if notice is None:
            if job in self._again:  # moved meanwhile: run it now
                self._due[job] = self._clock()
            else:
                self._forget(job)
            self._again.discard(job)
            return
        attempt = await self._exec(notice)
        self._metrics.hook_runs.labels(attempt.result).inc()
        if attempt.error is None:
            await asyncio.to_thread(self._spool.notices.remove, job)
            log.info("hook_ran", job=job, record=notice.record,
                     attempts=self._attempts.get(job, 0) + 1)
            self._forget(job)
            return
        tries, delay = self._back_off(job)
        log.warning("hook_failed", job=job, record=notice.record, error=attempt.error,
                    attempts=tries, retry_in=round(delay, 2))
        await asyncio.to_thread(self._spool.notices.note, job, self._spool.owner.name,
                                attempts=tries, error=attempt.error)

    def _back_off(self, job: str) -> tuple[int, float]:
        """Count a failed attempt; the next waits longer. Returns (attempts, delay)."""
        tries = self._attempts[job] = self._attempts.get(job, 0) + 1
        delay = min(self._initial * 2 ** (tries - 1), self._max)
        self._due[job] = self._clock() + delay
        return tries, delay

    def _forget(self, job: str) -> None:
        self._again.discard(job)
        self._due.pop(job, None)
        self._attempts.pop(job, None)

    def _ready(self, job: str) -> Notice | None:
        """The notice, if its file is in place now (blocking); None if there is nothing
        to run: no notice, or a file still being moved (whose finish will queue it)."""
        spool = self._spool
        notice = spool.notices.load(job)
        if notice is None:
            return None
        try:
            spool.notices.record_path(notice).stat()
            return notice
        except FileNotFoundError:
            pass
        if spool.processing.joinpath(job).exists():
            return None
        # Moved on by someone (``retry``, an operator): there is no record to hand over.
        log.warning("hook_record_missing", job=job, record=notice.record)
        spool.notices.remove(job)
        return None

    async def _exec(self, notice: Notice) -> Attempt:
        record = str(self._spool.notices.record_path(notice).absolute())
        env = {**self._env, "IPQS_BULKD_OUTCOME": notice.outcome,
               "IPQS_BULKD_TYPE": notice.type, "IPQS_BULKD_RECORD": record}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv, record, env=env, stdin=DEVNULL, stdout=DEVNULL, stderr=PIPE,
                start_new_session=True)  # its own group: a timeout kills its children too
        except OSError as exc:
            return Attempt(f"cannot run {self._argv[0]}: {exc.strerror or exc}", "failed")
        try:
            async with asyncio.timeout(self._timeout):
                assert proc.stderr is not None
                tail = await _tail(proc.stderr)
                code = await proc.wait()
        except TimeoutError:
            await _kill(proc)
            return Attempt(f"timed out after {self._timeout:g} s (hooks.timeout_seconds)",
                           "timeout")
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        if code == 0:
            return Attempt(None, "ok")
        said = tail.decode("utf-8", "replace").strip()
        return Attempt(f"exit status {code}" + (f": {said}" if said else ""), "failed")

    def _say_unowed(self) -> None:
        """Notices left while no hook is configured: say so once (they wait, unrun)."""
        count = sum(1 for _ in self._spool.notices.jobs())
        if count:
            log.warning("hooks_not_run", pending=count,
                        fix="set hooks.on_finish again to run them, or delete "
                            f"{self._spool.hooks}/ to drop them")


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """Read ``stream`` to its end, keeping only its last bytes (a chatty hook costs no
    memory)."""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-_TAIL_BYTES:]
    return tail


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the hook and everything it started, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await asyncio.shield(proc.wait())
