"""``watchfiles`` events for the inbox folders, one watch session at a time."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

from daemon.config import WatchConfig
from daemon.spool.layout import is_ignored

log = structlog.get_logger("daemon.watcher")

_WATCH_STEP_MS = 50  # a renamed-in file is reported this long after the rename
_WATCH_DEBOUNCE_MS = 500  # a stream of changes still gets reported at least this often
# How long the watch thread waits in Rust before handing back "nothing" (and being
# started again): each round trip wakes the event loop and two threads, so idle it must
# be rare. Stopping does not wait for it: the stop event is checked every step, and
# Watcher sets it before cancelling the watch; it only bounds a cancel without a stop.
_WATCH_TIMEOUT_MS = 5_000

#: While events are unavailable the inboxes are rescanned at least this often.
FALLBACK_RESCAN_SECONDS = 2.0
#: The longest wait between two tries of a failing watch.
WATCH_RETRY_MAX_SECONDS = 30.0

_LIMITS_FIX = ("raise fs.inotify.max_user_instances / fs.inotify.max_user_watches (sysctl), "
               "or stop other watchers of this user; the inboxes are rescanned meanwhile")


class WatchHealth:
    """Whether file events are coming: said once when they stop and once when they are
    back, and read by status, metrics and readiness meanwhile."""

    def __init__(self, rescan_seconds: float) -> None:
        self._rescan = rescan_seconds
        self.error: str | None = None

    def failed(self, exc: BaseException) -> None:
        """A watch session could not start or broke (inotify limits, say)."""
        if isinstance(exc, FileNotFoundError):
            # An inbox vanished under the watch: the next scan makes it again, then the
            # watch restarts; events are not "unavailable" for that.
            log.info("watch_restarting", error=str(exc))
            return
        if self.error is None:
            log.warning("watch_failed", error=str(exc), error_type=type(exc).__name__,
                        rescan_seconds=self.rescan_seconds(), fix=_LIMITS_FIX)
        self.error = str(exc)

    def started(self) -> None:
        """A watch session is up: events flow again."""
        if self.error is not None:
            log.info("watch_restored", error_was=self.error)
            self.error = None

    def reason(self) -> str | None:
        """For readiness and status: why events are missing; None while they flow."""
        if self.error is None:
            return None
        return (f"inbox events unavailable ({self.error}); rescanning every "
                f"{self.rescan_seconds():g} s")

    def rescan_seconds(self) -> float:
        """How often to rescan: faster while events are missing."""
        if self.error is None:
            return self._rescan
        return min(self._rescan, FALLBACK_RESCAN_SECONDS)


class WatchStop:
    """The stop event of one ``awatch`` session.

    It reads as set when the daemon stops or when the watch must restart. ``awatch`` calls
    ``set()`` on its stop event when it is cancelled; passing the daemon's own event would
    let that stop the whole daemon, so ``set()`` here only ends this session.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._ended = False

    def is_set(self) -> bool:
        return self._ended or self._stop.is_set()

    def set(self) -> None:
        self._ended = True


async def watch_session(folders: list[Path], settings: WatchConfig, stopper: WatchStop,
                        on_changes: Callable[[dict[Path, bool]], None]) -> None:
    """Report changed paths (path -> whether it was only deleted) until ``stopper`` is set.

    Raises FileNotFoundError when a folder vanished before the watch began (or there is
    none to watch), RuntimeError for the Rust side's own failures (inotify limits).
    """
    if not folders:
        raise FileNotFoundError(errno.ENOENT, "no usable inbox folder to watch")
    async for changes in watchfiles.awatch(
        *folders,
        watch_filter=_accept_change,
        stop_event=stopper,
        debounce=_WATCH_DEBOUNCE_MS,
        step=_WATCH_STEP_MS,
        rust_timeout=_WATCH_TIMEOUT_MS,
        force_polling=settings.force_polling,
        poll_delay_ms=settings.poll_delay_ms,
        recursive=False,
    ):
        on_changes(_only_deleted(changes))


def _only_deleted(changes: set[tuple[watchfiles.Change, str]]) -> dict[Path, bool]:
    only_deleted: dict[Path, bool] = {}
    for change, raw in changes:
        path = Path(raw)
        deleted = change == watchfiles.Change.deleted
        only_deleted[path] = only_deleted.get(path, True) and deleted
    return only_deleted


def _accept_change(change: watchfiles.Change, path: str) -> bool:
    return not is_ignored(Path(path).name)
