"""The watcher's moving parts: startup scan, ``watchfiles`` events, periodic rescan, hand-off.

What is looked at and when a file counts as settled is decided by the pure
:class:`~daemon.watcher.settle.SettleTable`; this module does the looking (in threads),
the waiting and the logging around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from daemon.aio import wait_any
from daemon.config import WatchConfig
from daemon.watcher import scan as scanning
from daemon.watcher.events import WATCH_RETRY_MAX_SECONDS, WatchHealth, WatchStop, watch_session
from daemon.watcher.lease import LeaseProbe
from daemon.watcher.modes import announce_mode, report_checks
from daemon.watcher.report import Reports
from daemon.watcher.scan import ScanResult
from daemon.watcher.settle import Candidate, Notice, Pending, Seen, SettleTable, Verdict

log = structlog.get_logger(__name__)

_WATCH_RETRY_SECONDS = 0.5
_MIN_MAX_PENDING = 1000
_DUE_SLACK = 0.005  # sleep a hair past the due time, so the wake-up finds the file due


class Watcher:
    """Finds files dropped into the inboxes and hands them on, one by one, once settled.

    The public API, in the order a consumer meets it:

    * :meth:`run` (the daemon) or :meth:`scan_once` + :meth:`drain_settled` (``--once``)
      look at the inboxes and settle what they find;
    * :meth:`take` waits for the next settled :class:`Candidate`;
    * :meth:`release` must be called exactly once per candidate taken, when the consumer
      is done with it whatever the outcome (claimed, gone, failed, stopping); until then
      the path is *in flight*: not offered again, and counted in :meth:`in_flight_count`;
    * :meth:`pending_count`, :meth:`queued_count`, :meth:`in_flight_count` and
      :meth:`oldest_pending_age` feed the status line and the metrics;
    * :meth:`close` forgets everything.

    ``settings.writer_check`` decides how "nobody is writing" is established, per file
    system: a kernel lease probe, ``/proc``, or a quiet window (see
    :mod:`~daemon.watcher.checks`; :mod:`~daemon.watcher.lease`, :mod:`~daemon.watcher.proc`).

    ``on_held_back`` is called with the number of files a lease probe newly found open
    for writing (a metric).
    """

    def __init__(
        self,
        inboxes: Mapping[str, Path],
        settings: WatchConfig,
        stop: asyncio.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_held_back: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._stop = stop
        self._clock = clock
        self._inboxes = [(type_, Path(path).absolute()) for type_, path in inboxes.items()]
        self._types = {path: type_ for type_, path in self._inboxes}
        self._folders = dict(self._inboxes)
        # Settled files wait here; the bound counts only those not yet taken.
        self._queue: asyncio.Queue[Candidate] = asyncio.Queue()
        self._queue_size = settings.queue_size
        #: Most paths pending, awaiting a look (dirty) or in flight at once.
        self.max_pending = max(4 * settings.queue_size, _MIN_MAX_PENDING)
        self._table = SettleTable(settings, self.max_pending)
        self._tick = max(settings.settle_seconds / 2, 0.01)
        self._reports = Reports()
        self._prober = LeaseProbe()
        self._on_held_back = on_held_back
        self._mode_known = False
        self._rr = 0
        self._wake = asyncio.Event()
        self._rescan_now = asyncio.Event()
        self._scan_lock = asyncio.Lock()
        self._watch_stop: WatchStop | None = None
        self.watch_health = WatchHealth(settings.rescan_seconds)
        self._unusable: frozenset[str] = frozenset()  # inboxes refused by the last scan
        self._settle_failing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- public API -------------------------------------------------------------------

    async def run(self) -> None:
        """Watch the inboxes and hand on settled files until the stop event is set."""
        if self._closed:
            raise RuntimeError("watcher is closed")
        await self._announce_mode()
        await self.scan_once()
        self._tasks = [
            asyncio.create_task(self._watch_loop(), name="watcher-events"),
            asyncio.create_task(self._rescan_loop(), name="watcher-rescan"),
            asyncio.create_task(self._settle_loop(), name="watcher-settle"),
        ]
        try:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a helper that crashed takes the watcher down with it
            await asyncio.gather(*self._tasks)
        finally:
            await self._end_tasks()

    async def scan_once(self) -> int:
        """Scan every inbox once (creating missing ones); return how many paths were new.

        Takes new files round-robin across the inboxes and stops when the pending bound is
        reached, so one flooded inbox neither starves the others nor fills memory.
        """
        async with self._scan_lock:
            table = self._table
            table.scan_started()
            result = await asyncio.to_thread(
                scanning.scan, self._rotated(), table.known(), frozenset(self._reports.reported),
                table.room(), self._reports.room(),
            )
            return self._apply_scan(result)

    async def drain_settled(self) -> None:
        """Settle everything noticed so far, including files a bounded scan left for
        later, and hand it all on; return when nothing is pending (for ``--once``, with
        consumers running, and without :meth:`run`)."""
        await self._announce_mode()
        while not self._stop.is_set():
            if self._table.unsettled():
                await self._settle_step()
            elif not self._table.backlog:
                return
            elif not await self.scan_once():
                await self._pause(self._tick)  # no room: wait for consumers to release

    async def take(self) -> Candidate | None:
        """The next settled file, waiting for one; None when the stop event is set while
        nothing is queued.

        The caller owns the candidate until it calls :meth:`release` with its path.
        """
        if self._queue.empty():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()  # an item it had not yet taken stays in the queue
            if not getter.done() or getter.cancelled():
                return None
            candidate = getter.result()
        else:
            candidate = self._queue.get_nowait()
        self._wake_up()  # room for the next batch
        return candidate

    def release(self, path: Path) -> None:
        """The consumer is done with the candidate at ``path`` (claimed, skipped, gone or
        failed): forget it, so that a file appearing again under that name is offered
        again. Call it exactly once per candidate taken; an unknown path is ignored."""
        self._table.release(path)
        self._refill_if_low()
        self._wake_up()

    def rescan_soon(self) -> None:
        """Scan the inboxes again now (a file that could not be claimed may be takeable)."""
        self._rescan_now.set()

    def pending_count(self) -> int:
        """Files noticed but not yet handed on."""
        return self._table.pending_count()

    def queued_count(self) -> int:
        """Settled files waiting to be taken."""
        return self._queue.qsize()

    def in_flight_count(self) -> int:
        """Files handed on (queued or taken) that have not been released yet."""
        return self._table.in_flight_count()

    def oldest_pending_age(self) -> float | None:
        """Seconds since the longest-waiting file not yet released (settling, or settled
        and waiting to be claimed) was noticed, or None."""
        noticed = self._table.oldest_noticed()
        return None if noticed is None else self._clock() - noticed

    def close(self) -> None:
        """Forget all state; idempotent. Stop :meth:`run` through the stop event first."""
        if self._closed:
            return
        self._closed = True
        self._table.clear()
        self._reports.clear()

    # -- the three loops ----------------------------------------------------------------

    async def _watch_loop(self) -> None:
        retry = _WATCH_RETRY_SECONDS
        while not self._stop.is_set():
            ended_cleanly = await self._watch_session()
            if self._stop.is_set():
                return
            # Not at once: a folder deleted in a loop, or a watch that cannot start (inotify
            # limits), would spin. The rescans keep files flowing meanwhile.
            retry = _WATCH_RETRY_SECONDS if ended_cleanly else retry * 2
            await wait_any(self._stop, within=min(retry, self._settings.rescan_seconds,
                                                  WATCH_RETRY_MAX_SECONDS))
            await self._scan_logged()  # recreates missing inboxes before watching again

    async def _watch_session(self) -> bool:
        """Watch until stopped or asked to restart (True) or until the watch fails (False)."""
        self._watch_stop = stopper = WatchStop(self._stop)
        # The catch-up scan cannot start before this task first suspends, which happens
        # inside awatch after its watches exist: nothing dropped in between is missed.
        self._rescan_now.set()
        # Runs at the first suspension, after the watches exist; a failing start cancels it.
        up = asyncio.get_running_loop().call_soon(self.watch_health.started)
        try:
            # Not a refused inbox: a watch follows a symlink, and an unreadable one fails all.
            usable = [path for type_, path in self._inboxes if type_ not in self._unusable]
            await watch_session(usable, self._settings, stopper, self._on_changes)
        except (OSError, RuntimeError) as exc:
            up.cancel()
            self.watch_health.failed(exc)
            self._rescan_now.set()  # the rescans take over at their faster pace now
            return False
        return True

    async def _rescan_loop(self) -> None:
        while True:
            await wait_any(self._stop, self._rescan_now,
                           within=self.watch_health.rescan_seconds())
            if self._stop.is_set():
                return
            self._rescan_now.clear()
            await self._scan_logged()

    async def _scan_logged(self) -> None:
        """Scan for a loop that must outlive a failing file system; the next scan retries."""
        try:
            await self.scan_once()
        except OSError as exc:
            log.error("scan_failed", error=str(exc), error_type=type(exc).__name__)

    async def _settle_loop(self) -> None:
        while not self._stop.is_set():
            await self._settle_step()

    # -- settling -----------------------------------------------------------------------

    async def _settle_step(self) -> None:
        """Look at what is due or was named by an event, then sleep until the next file
        falls due, a consumer makes room or an event arrives. With nothing pending (or
        nothing that could be handed on) no timer runs at all."""
        self._wake.clear()
        failed = False
        if self._table.has_work(self._clock(), self._hand_off_room()):
            failed = not await self._settle_round_logged()
        if not self._wake.is_set():
            pause = self._tick if failed else self._next_due()
            await wait_any(self._stop, self._wake, within=pause)

    async def _settle_round_logged(self) -> bool:
        try:
            await self._settle_round()
        except OSError as exc:
            # EIO, ESTALE, EACCES: nothing is handed on from a round that failed; the
            # next try looks at the same paths again.
            if not self._settle_failing:
                log.error("settle_failed", error=str(exc), error_type=type(exc).__name__)
            self._settle_failing = True
            return False
        self._settle_failing = False
        return True

    async def _settle_round(self) -> None:
        """One look, in one thread hop: the /proc pass for the files that are due, then an
        lstat of those, of pending files an event named, and of new paths."""
        plan = self._table.plan(self._clock(), self._hand_off_room())
        observed = await asyncio.to_thread(scanning.observe, plan.paths, plan.targets,
                                           plan.probes, self._prober)
        verdict = self._table.apply(plan, observed, self._clock())
        self._log_verdict(verdict)
        self._hand_off(verdict.ready)

    def _log_verdict(self, verdict: Verdict) -> None:
        if verdict.visibility_changed:
            log.info("writer_visibility_changed", writers_visible=self._table.visible,
                     window=self._table.window())
        report_checks(self._table, verdict, self._on_held_back)
        for path, seen in verdict.dropped:
            if seen is None:
                log.debug("file_vanished", path=str(path))
            else:
                self._reports.not_regular(path, seen.kind)
        for path, outcome, seen in verdict.noticed:
            self._noticed(path, outcome, seen)
        if verdict.dropped:
            self._refill_if_low()

    def _hand_off_room(self) -> int:
        """How many files to hand on now. None until consumers have taken half the
        queue: one /proc pass then serves a batch instead of a single file."""
        free = self._queue_size - self._queue.qsize()
        return free if 2 * free >= self._queue_size else 0

    def _next_due(self) -> float | None:
        due = self._table.next_due(self._clock(), self._hand_off_room())
        return None if due is None else due + _DUE_SLACK  # None: a take or release wakes us

    def _hand_off(self, ready: list[Pending]) -> None:
        # Never wait for room with a verdict in hand: what is not taken now is looked at
        # again, freshly, once a consumer has made room.
        for entry in ready:
            if self._queue.qsize() >= self._queue_size:
                return
            self._queue.put_nowait(self._table.hand_off(entry))
            log.info(
                "file_settled",
                type=entry.type,
                path=str(entry.path),
                size=entry.seen.size,
                waited=round(self._clock() - entry.first_seen, 3),
            )

    async def _announce_mode(self) -> None:
        """Say once per watcher how settling will be judged."""
        if not self._mode_known:
            self._mode_known = True
            await announce_mode(self._table)

    # -- bookkeeping ----------------------------------------------------------------------

    def _noticed(self, path: Path, outcome: Notice, seen: Seen | None) -> None:
        if outcome is Notice.NEW and seen is not None:
            self._reports.forget(path)
            log.debug("file_noticed", type=self._types.get(path.parent), path=str(path),
                      size=seen.size)
        elif outcome is Notice.NOT_REGULAR and seen is not None:
            self._reports.not_regular(path, seen.kind)

    def _refill_if_low(self) -> None:
        if self._table.needs_refill():
            self._rescan_now.set()

    def _wake_up(self) -> None:
        self._wake.set()

    def _on_changes(self, only_deleted: dict[Path, bool]) -> None:
        for path, gone in only_deleted.items():
            self._on_path_event(path, gone)
        self._wake_up()

    def _on_path_event(self, path: Path, gone: bool) -> None:
        if path in self._types:  # the inbox folder itself
            if gone and self._watch_stop is not None:
                self._watch_stop.set()  # watch again once the folder is back
            return
        type_ = self._types.get(path.parent)
        if type_ is None or type_ in self._unusable:
            return
        if not gone:
            self._table.mark_dirty(type_, path)
            return
        if self._table.forget(path):
            log.debug("file_vanished", path=str(path))
        self._reports.forget(path)
        self._refill_if_low()

    def _apply_scan(self, result: ScanResult) -> int:
        self._reports.scanned(result, self._folders)
        unusable = frozenset(result.unusable)
        changed, self._unusable = unusable != self._unusable, unusable
        if (result.recreated or changed) and self._watch_stop is not None:
            # An inotify watch does not follow a new folder, and the set to watch changed.
            self._watch_stop.set()
        self._table.scan_finished(result.truncated)
        now = self._clock()
        noticed = 0
        for type_, path, seen in result.found:
            outcome = self._table.notice(type_, path, seen, now, result.wall)
            self._noticed(path, outcome, seen)
            noticed += outcome is Notice.NEW
        if noticed:
            self._wake_up()
        return noticed

    def _rotated(self) -> list[tuple[str, Path]]:
        # Each scan starts at the next inbox, so a flood in one cannot always come first.
        if not self._inboxes:
            return []
        self._rr = (self._rr + 1) % len(self._inboxes)
        return self._inboxes[self._rr :] + self._inboxes[: self._rr]

    async def _pause(self, seconds: float) -> None:
        await wait_any(self._stop, self._wake, within=seconds)

    async def _end_tasks(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()  # the watch thread sees it within a step, not a timeout
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Collects the helpers' CancelledErrors (we asked for those); ours still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)
