"""Wires the stages together: recovery at start, the running daemon, and its shutdown.

Shutdown has two stages. The first SIGTERM or SIGINT stops claiming new files, lets uploads
under way finish within ``service.shutdown_seconds``, and cancels what is left (every job's
state is on disk, so the next start resumes it without a second upload). A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from daemon import clocks
from daemon.aio import Wakeup, wait_any
from daemon.api import IpqsClient, make_client
from daemon.config import Config, spool_root_error
from daemon.errors import AccountError, IpqsError
from daemon.health import HealthServer, HealthState, create_app, reach_url
from daemon.housekeeping import Housekeeper
from daemon.job.breaker import Breaker
from daemon.job.money import Purse
from daemon.notify import Notifier
from daemon.pipeline import Pipeline
from daemon.poller import Poller
from daemon.recovery import Recovery
from daemon.shown import shown
from daemon.spool import Job, Spool, daemons
from daemon.spool.mounts import MisplacedFiles, advise_on_network, refuse_foreign_inboxes
from daemon.uploader import Uploader
from daemon.watcher import Watcher

log = structlog.get_logger(__name__)


class Service:
    """One running daemon over one spool."""

    #: How often the gauges are refreshed and a changed ``STATUS=`` is sent to systemd.
    status_seconds = 2.0
    #: ...and when there is nothing to do (an idle daemon should not keep waking up).
    idle_status_seconds = 30.0
    #: After work wakes it, the status loop waits this long, so a burst is one report.
    status_debounce_seconds = 0.25

    def __init__(self, config: Config, *, client: IpqsClient | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.changed = Wakeup()  # set on any change of a job: wakes the status loop
        self.spool = Spool(config.spool.root, config.spool.types,
                           file_mode=config.spool.file_mode,
                           lease_seconds=config.upload.lease_seconds,
                           on_change=self.changed.set,
                           hook_notices=bool(config.hooks.on_finish))
        client = client or make_client(config)
        self.pipe = Pipeline(config, self.spool, client, self.stop,
                             breaker=Breaker(config.upload.pause_initial_seconds,
                                             config.upload.pause_max_seconds),
                             purse=Purse.for_config(config, client))
        self.watcher = Watcher({t: self.spool.inbox(t) for t in config.spool.types},
                               config.watch, self.stop,
                               on_held_back=self.pipe.metrics.held_by_lease.inc)
        # Per upload, a file needs a status check and a download (more while IPQS works
        # on it): four poller slots per upload slot keep the poller from being the limit.
        self.poller = Poller(self.pipe, concurrency=4 * config.upload.concurrency)
        self.uploader = Uploader(self.pipe, self.watcher, self.poller)
        self.housekeeper = Housekeeper(self.spool, config, self.pipe.metrics)
        self.health = HealthState(
            paused_reason=self.paused_reason, credits=lambda: self.pipe.purse.credits,
            troubles=[self.pipe.finishing.reason, self.uploader.trouble.reason,
                      self.watcher.watch_health.reason],
            warnings=[self.housekeeper.low_disk],
            waiting=lambda: {"unreadable": self.uploader.unreadable.count()})
        self.misplaced = MisplacedFiles(self.spool, config.spool.types)
        self.health_server: HealthServer | None = None
        self.published: Path | None = None  # our health address in the spool's .daemon/
        self.notifier = notifier or Notifier()
        self._tasks: set[asyncio.Task[None]] = set()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.recovery = Recovery(self.pipe, self.uploader, self.poller, self._spawn_job)
        self._signals = 0
        self._signal: signal.Signals | None = None
        self._status = ""
        self.crashed = False

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> int:
        """Run until stopped (or, with ``once``, until the files present are finished).

        Returns the exit status: 0, or 1 when a file of a ``--once`` batch failed or a stage
        crashed (so that systemd's ``Restart=on-failure`` restarts the daemon).
        """
        # A spool or health listener that cannot be set up is a config error (exit 2),
        # found before anything else starts, so nothing is left to clean up.
        await asyncio.to_thread(self._prepare_spool)
        # A claim cannot rename out of an inbox on another file system: ConfigError, exit 2.
        await asyncio.to_thread(refuse_foreign_inboxes, self.spool, self.config.spool.types)
        await asyncio.to_thread(advise_on_network, self.config.spool.root, self.config.watch)
        await self._start_health()
        await self._check_clock()
        # Our lease exists before we touch any job, so no other daemon takes ours for
        # abandoned while we recover.
        await asyncio.to_thread(self.spool.heartbeat)
        try:
            await self._learn_newest_id()
            await self.pipe.purse.refresh()  # the balance and today's rows, before any upload
            await self.recover()
            self.health.recovered = True
            if once:
                return await self._run_once()
            await self._run_forever()
            return 1 if self.crashed else 0
        finally:
            await self._shutdown()

    async def _run_forever(self) -> None:
        self._spawn(self.watcher.run(), "watcher")
        self._spawn(self.uploader.run(), "uploader")
        self._spawn(self.poller.run(), "poller")
        self._spawn(self.pipe.finishing.run(), "finishing")
        self._spawn(self.pipe.hooks.run(), "hooks")
        self._spawn(self._housekeeping(sweep=True), "housekeeping")
        self._spawn(self.watchdog(), "watchdog")
        self._spawn(self._status_loop(), "status")
        self.health.watching = True
        self.notifier.send(READY="1", STATUS="watching inboxes")
        log.info("daemon_ready", root=str(self.config.spool.root),
                 types=list(self.config.spool.types))
        await self.stop.wait()

    async def _run_once(self) -> int:
        self._spawn(self.uploader.run(), "uploader")
        self._spawn(self.poller.run(), "poller")
        self._spawn(self.pipe.finishing.run(), "finishing")
        self._spawn(self.pipe.hooks.run(), "hooks")
        self._spawn(self._housekeeping(sweep=False), "housekeeping")
        self._spawn(self.watchdog(), "watchdog")
        self._spawn(self._status_loop(), "status")
        self.health.watching = True
        self.notifier.send(READY="1", STATUS="processing one batch")
        await self.watcher.scan_once()
        # Settling runs beside the check below: with uploads paused it would never end.
        drained = asyncio.Event()
        self._spawn(self._drain(drained), "drain")
        while not self.stop.is_set():
            if self.pipe.breaker.paused:
                log.error("batch_stopped", reason=self.pipe.breaker.reason)
                self.stop.set()
                return 1
            if drained.is_set() and self._batch_finished():
                break
            await wait_any(self.pipe.jobs.idle, self.stop, within=0.2)
        await self._hooks_tried()
        waiting = len(self.uploader.waiting)  # for money: left in their inbox
        log.info("batch_finished", **self.pipe.outcomes,
                 left_in_processing=self.pipe.jobs.left_count(), left_waiting=waiting,
                 waiting_reason=self.pipe.purse.reason if waiting else None)
        self.stop.set()
        if self._signal is not None:
            return 128 + self._signal  # interrupted: not every file got its outcome
        if self.crashed or self.uploader.claim_failures or waiting:
            return 1
        return 1 if self.pipe.outcomes["failed"] or self.pipe.jobs.left_count() else 0

    async def _hooks_tried(self) -> None:
        """A batch ends once every hook owed was tried (one that fails runs again at the
        next start: its notice stays)."""
        while self.pipe.hooks.enabled and not self.pipe.hooks.settled() \
                and not self.stop.is_set():
            await wait_any(self.stop, within=0.05)

    async def _drain(self, drained: asyncio.Event) -> None:
        await self.watcher.drain_settled()
        drained.set()

    def _batch_finished(self) -> bool:
        # In-flight counts a file from its hand-off until the uploader releases it, which
        # is after its job is registered as active, so no moment in between looks idle.
        return (self.watcher.in_flight_count() == 0 and self.watcher.pending_count() == 0
                and self.watcher.queued_count() == 0 and not self.pipe.jobs.count()
                and self.poller.waiting() == 0)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stage_crashed", stage=task.get_name(), error=repr(task.exception()))
            self.crashed = True
            self.stop.set()

    async def _shutdown(self) -> None:
        self.stop.set()
        self.notifier.send(STOPPING="1", STATUS="finishing uploads under way")
        tasks = self._tasks | self._job_tasks
        if tasks:
            grace = self.config.service.shutdown_seconds
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                log.warning("shutdown_cancel", stage=task.get_name())
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.watcher.close()
        await asyncio.to_thread(self.spool.release)
        await self.pipe.client.close()
        self.pipe.close()
        if self.published is not None:
            await asyncio.to_thread(daemons.withdraw, self.published)
        if self.health_server is not None:
            await self.health_server.close()
        log.info("daemon_stopped")

    # -- signals --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # A writer opening a file during a lease probe makes the kernel send us SIGIO,
        # whose default action kills: handle it (a handler, unlike SIG_IGN, is not
        # inherited by the hooks we start). The watcher probes only once this is done.
        loop.add_signal_handler(signal.SIGIO, self._on_sigio)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # SIGIO stays handled until the loop closes, after asyncio.run has waited for
        # the threads: a probe still running in one must not be killed by a late SIGIO.

    @staticmethod
    def _on_sigio() -> None:
        log.debug("lease_broken")  # a writer opened a file while we probed it: harmless

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        self._signal = sig
        if self._signals == 1:
            log.info("shutdown_requested", signal=sig.name,
                     grace=self.config.service.shutdown_seconds)
            self.stop.set()
            return
        log.warning("shutdown_forced", signal=sig.name)
        # Every job's state is already on disk; threads busy hashing or writing would
        # otherwise hold up a normal exit.
        logging.shutdown()
        os._exit(130 if sig == signal.SIGINT else 143)

    # -- recovery -------------------------------------------------------------------------

    async def _learn_newest_id(self) -> None:
        """The newest job id before we send anything: lookups page back to it, no further.

        It is also the key's test at start: if IPQS refuses the account, uploads pause at
        once (not ready, ``status`` says why, one error line) and the call is tried again
        with the breaker's backoff until it works.
        """
        try:
            newest = await self.pipe.client.newest_id()
            self.pipe.talk.newest_id = 0 if newest is None else newest  # 0: no jobs yet
        except AccountError as exc:
            reason = f"IPQS refused the account at start: {exc.message}"
            self.pipe.breaker.failure(reason)
            self._spawn(self._recheck_account(reason), "account-check")
        except IpqsError as exc:  # unknown: learnt again before the first POST
            log.warning("newest_id_unknown", error=str(exc))

    async def _recheck_account(self, reason: str) -> None:
        """Ask again, doubling the wait as the breaker does, while uploads are paused for
        ``reason``; the first answer closes the breaker (an upload's probe may, too)."""
        breaker = self.pipe.breaker
        delay = breaker.initial
        while breaker.reason == reason and not self.stop.is_set():
            await wait_any(self.stop, within=delay)
            delay = min(delay * 2, breaker.cap)
            try:
                newest = await self.pipe.client.newest_id()
            except IpqsError as exc:
                log.debug("account_still_refused", error=str(exc))
                continue
            if breaker.reason == reason:
                self.pipe.talk.newest_id = newest
                self.pipe.purse.account_error()  # the balance could not be read either
                breaker.success()

    async def recover(self) -> None:
        """Resume every job in processing/ that is ours to run (ours, or its owner died)."""
        await self.recovery.recover()

    def _spawn_job(self, coro: Coroutine[Any, Any, None], job: Job) -> None:
        """Run one resumed job. Unlike a stage, its failure never stops the daemon."""
        task = asyncio.create_task(coro, name=f"resume-{job.job}")
        self._job_tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._job_tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("resumed_job_error", job=job.job, error=repr(task.exception()))
                self.pipe.forget(job)

        task.add_done_callback(done)

    async def _housekeeping(self, *, sweep: bool) -> None:
        """Heartbeat our lease, report misplaced files and low disk, apply retention; with
        ``sweep``, also take over jobs left behind (by us or by a daemon that died)."""
        every = min(self.config.upload.lease_seconds / 3, 60.0)
        keeper = self.housekeeper
        while not self.stop.is_set():
            await asyncio.to_thread(self.spool.heartbeat)
            count = await asyncio.to_thread(self.misplaced.sweep)
            self.pipe.metrics.misplaced.set(count)
            await self.pipe.purse.refresh()  # every few minutes, and the day's budget
            await self.uploader.forget_gone()
            await asyncio.to_thread(keeper.check_disk)
            if sweep:
                await self.recover()
                await asyncio.to_thread(self.spool.prune_owners)
            if keeper.due():
                await asyncio.to_thread(keeper.sweep)
            await wait_any(self.stop, within=every)

    async def _status_loop(self) -> None:
        """Keep the gauges and systemd's STATUS= current; cheap (a few len() calls).

        Work wakes it (``changed``), so STATUS= follows a job within the debounce; the
        timer only covers what sets no flag, and idles at ``idle_status_seconds``.
        """
        self.changed.bind(asyncio.get_running_loop())
        while not self.stop.is_set():
            self.changed.event.clear()
            self._report()
            watcher = self.watcher
            busy = self.pipe.jobs.count() or watcher.pending_count() or watcher.in_flight_count()
            await wait_any(self.stop, self.changed.event, within=self.status_seconds if busy
                           else max(self.idle_status_seconds, self.status_seconds))
            if self.changed.event.is_set():  # a burst of changes makes one report
                await wait_any(self.stop, within=self.status_debounce_seconds)

    def paused_reason(self) -> str | None:
        """Why uploads do not go now: an account error, or files waiting for money."""
        if self.pipe.breaker.reason is not None:
            return self.pipe.breaker.reason
        return self.pipe.purse.reason if self.uploader.waiting else None

    def refresh_gauges(self) -> str:
        """Set the queue and in-flight gauges from the stages; return the status line."""
        pending = self.watcher.pending_count()
        at_ipqs = self.poller.waiting()
        finishing = self.pipe.finishing
        held = self.uploader.trouble.count()  # settled, but their claims fail for now
        uploading = max(self.pipe.jobs.count() - at_ipqs - finishing.count() - held, 0)
        m = self.pipe.metrics
        unreadable = self.uploader.unreadable.count()
        m.queue_depth.set(pending + self.watcher.queued_count() + held)
        m.unreadable.set(unreadable)
        no_events = self.watcher.watch_health.reason()
        m.events_unavailable.set(0 if no_events is None else 1)
        m.oldest_pending.set(self.watcher.oldest_pending_age() or 0)
        m.breaker_open.set(1 if self.pipe.breaker.paused else 0)
        m.in_flight.labels("uploading").set(uploading)
        m.in_flight.labels("at_ipqs").set(at_ipqs)
        m.in_flight.labels("finishing").set(finishing.count())
        m.finish_blocked.clear()
        for folder, count in finishing.blocked().items():
            m.finish_blocked.labels(folder).set(count)
        purse = self.pipe.purse
        m.credits.set(float("nan") if purse.credits is None else purse.credits)
        for file_type, left in purse.rows_left(self.config.spool.types).items():
            m.budget_left.labels(file_type).set(left)
        status = (f"inbox {pending + held}, queued {self.watcher.queued_count()}, "
                  f"uploading {uploading}, at IPQS {at_ipqs}, "
                  f"done {self.pipe.outcomes['done']}, failed {self.pipe.outcomes['failed']}")
        if unreadable:
            status += f", unreadable {unreadable} (chmod g+r)"
        if self.pipe.breaker.paused:
            # IPQS's words and file names, shown by `systemctl status`; a newline would also
            # end the STATUS= assignment of the sd_notify message.
            status += f"; PAUSED: {shown(self.pipe.breaker.reason)}"
        elif (waiting := self.paused_reason()) is not None:
            status += f"; {shown(waiting)}"
        if (cannot_claim := self.uploader.trouble.reason()) is not None:
            status += f"; STUCK: {shown(cannot_claim)}"
        if finishing.count():
            status += f"; STUCK: {shown(finishing.reason())}"
        if (low := self.housekeeper.low_disk()) is not None:
            status += f"; {shown(low)}"
        hooks = self.pipe.hooks
        m.hooks_pending.set(hooks.pending())
        m.hooks_failing.set(hooks.failing())
        if hooks.pending():
            status += f"; hooks pending {hooks.pending()} ({hooks.failing()} failing)"
        if no_events is not None:
            status += f"; DEGRADED: {no_events}"
        return status

    def _report(self) -> None:
        status = self.refresh_gauges()
        if status != self._status:  # systemd needs no repeats; the journal stays quiet
            self._status = status
            self.notifier.send(STATUS=status)

    async def _check_clock(self) -> None:
        """Say so when NTP has not synchronised the wall clock: a caveat, not unready.
        (Leases and duplicate windows do not depend on it; record times and deadlines do.)"""
        synced = await asyncio.to_thread(clocks.wall_clock_synced)
        if synced is None:  # e.g. systemd's ProtectClock=yes refuses even a read
            log.info("wall_clock_state_unknown")
        elif not synced:
            log.warning("wall_clock_unsynchronised", detail=clocks.UNSYNCED)
            self.health.caveats.append(clocks.UNSYNCED)

    async def _start_health(self) -> None:
        cfg = self.config.health
        if not cfg.enabled:
            return
        app = create_app(self.health, self.pipe.metrics, refresh=self.refresh_gauges)
        server = HealthServer(app, cfg.host, cfg.port)
        await server.start()  # raises ConfigError naming health.host or health.port
        self.health_server = server
        url = reach_url(cfg.host, server.port if server.port is not None else cfg.port)
        try:
            self.published = await asyncio.to_thread(self._publish, url)
        except OSError as exc:  # status falls back to health.port; the daemon runs on
            log.warning("health_address_unpublished", folder=str(self.spool.daemons),
                        error=exc.strerror or str(exc))

    def _publish(self, url: str) -> Path:
        """Tell ``status`` where our health listener is (health.port = 0 picks any port)."""
        owner = self.spool.owner
        daemons.prune(self.spool, owner)
        return daemons.publish(self.spool, owner, url, self.config.spool.file_mode)

    def _prepare_spool(self) -> None:
        try:
            self.spool.prepare()
        except OSError as exc:
            raise spool_root_error(self.config.spool.root, exc) from None

    async def watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop, at half its timeout."""
        seconds = self.notifier.watchdog_seconds
        if not seconds:
            return
        while not self.stop.is_set():
            self.notifier.send(WATCHDOG="1")
            await wait_any(self.stop, within=seconds / 2)
