"""``watchfiles`` events for the inbox folders, one watch session at a time."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import watchfiles

from daemon.config import WatchConfig
from daemon.spool.layout import is_ignored

_WATCH_STEP_MS = 50  # a renamed-in file is reported this long after the rename
_WATCH_DEBOUNCE_MS = 500  # a stream of changes still gets reported at least this often
# How long the watch thread waits in Rust before handing back "nothing" (and being
# started again): each round trip wakes the event loop and two threads, so idle it must
# be rare. Stopping does not wait for it: the stop event is checked every step, and
# Watcher sets it before cancelling the watch; it only bounds a cancel without a stop.
_WATCH_TIMEOUT_MS = 5_000


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
