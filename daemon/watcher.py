"""Find files dropped into ``inbox/<type>/`` and hand them on once they are complete.

The watcher notices files three ways: a full scan at start, ``watchfiles`` events while
running, and a periodic rescan (events get lost on overflow, on network file systems and
across restarts). A noticed file is *pending* until it has *settled*: its size, mtime and
inode stayed the same for a window, and no process has it open for writing where that can
be seen. Only then is a :class:`Candidate` put on the bounded :attr:`Watcher.queue`.
Handing on a half-written file costs the user money for every row sent, so every doubt
makes the watcher wait longer, never shorter.

Memory and work stay bounded however many files wait: at most :attr:`Watcher.max_pending`
paths are pending, dirty or in flight at once; the rest are left in the folder for a later
scan, which runs when the load drops to half of that bound. Symlinks are never followed and
nothing in the inbox is ever opened (opening a fifo would hang).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import watchfiles

from daemon.aio import wait_any
from daemon.config import WatchConfig
from daemon.spool.layout import is_ignored

log = structlog.get_logger(__name__)

_WATCH_STEP_MS = 50  # a renamed-in file is reported this long after the rename
_WATCH_DEBOUNCE_MS = 500  # a stream of changes still gets reported at least this often
_WATCH_TIMEOUT_MS = 1000  # bounds how long cancelling the watch thread can take
_WATCH_RETRY_SECONDS = 0.5
_MIN_MAX_PENDING = 1000
_DUE_SLACK = 0.005  # sleep a hair past the due time, so the wake-up finds the file due
_MAX_REPORTED = 10_000  # non-regular paths remembered so that each is logged only once
_PROC = "/proc"

_Key = tuple[int, int]  # (st_dev, st_ino): what identifies a file across renames


#: The watcher is configured by the ``[watch]`` config section as it is.
WatchSettings = WatchConfig


@dataclass(frozen=True)
class Candidate:
    """A settled file, as it was when it settled.

    A consumer should check after claiming that the file still has this size, mtime and
    inode: a writer may reopen a file at any moment after the watcher's last look.
    """

    type: str
    path: Path
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True, slots=True)
class _Seen:
    """One ``lstat`` of a path, reduced to what settling compares."""

    kind: str
    dev: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Seen:
        return cls(_kind(st.st_mode), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def key(self) -> _Key:
        return (self.dev, self.inode)


@dataclass(slots=True, eq=False)  # identity: "is this still the entry we looked at?"
class _Pending:
    """A regular file being watched until it settles."""

    type: str
    path: Path
    seen: _Seen
    first_seen: float
    last_change: float
    # Seconds the file had already been still when this version of it was first seen
    # (from its mtime): a file renamed in long after it was written needs no quiet wait.
    credit: float = 0.0

    def candidate(self) -> Candidate:
        seen = self.seen
        return Candidate(self.type, self.path, seen.size, seen.mtime_ns, seen.inode)


@dataclass
class _Observation:
    """What one settle round saw: every path's lstat and the files open for writing."""

    seen: dict[Path, _Seen | None]
    writers: frozenset[_Key]
    visible: bool | None  # None when /proc was not looked at this round


@dataclass
class _ScanResult:
    found: list[tuple[str, Path, _Seen]] = field(default_factory=list)
    odd: list[tuple[Path, str]] = field(default_factory=list)
    unreported: list[Path] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)
    truncated: bool = False


class _HandOffQueue(asyncio.Queue[Candidate]):
    """The bounded hand-off queue; tells the watcher whenever a consumer makes room.

    ``_get`` is the hook the standard library's own queue subclasses override; both
    ``get`` and ``get_nowait`` go through it.
    """

    def __init__(self, maxsize: int, on_get: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self._on_get = on_get

    def _get(self) -> Candidate:
        item = super()._get()
        self._on_get()
        return item


class _WatchStop:
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


class Watcher:
    """Startup scan, ``watchfiles`` events, periodic rescan and the settle check.

    ``settings.writer_check`` decides how "nobody is writing" is established:

    * ``"proc"``: trust ``/proc/<pid>/fd`` to show every writer; wait ``settle_seconds``.
    * ``"quiet"``: look at no processes; wait ``quiet_seconds`` of no change. Use this when
      the writers run elsewhere: a sidecar container sees none of the other container's
      processes, and neither does a host writing to a shared or network volume.
    * ``"auto"``: ``settle_seconds`` while the last ``/proc`` pass could read the fds of
      every other process, ``quiet_seconds`` as soon as one could not (not root, no
      ``CAP_SYS_PTRACE``). A ``hidepid`` mount or a separate PID namespace hides processes
      without any error, which "auto" cannot notice: configure "quiet" there.
    """

    queue: asyncio.Queue[Candidate]

    def __init__(
        self,
        inboxes: Mapping[str, Path],
        settings: WatchSettings,
        stop: asyncio.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._stop = stop
        self._clock = clock
        self._inboxes = [(type_, Path(path).absolute()) for type_, path in inboxes.items()]
        self._types = {path: type_ for type_, path in self._inboxes}
        self.queue = _HandOffQueue(settings.queue_size, self._wake_up)
        #: Most paths pending, awaiting a look (dirty) or in flight at once.
        self.max_pending = max(4 * settings.queue_size, _MIN_MAX_PENDING)
        self._low_water = self.max_pending // 2
        self._tick = max(settings.settle_seconds / 2, 0.01)
        self._pending: dict[Path, _Pending] = {}  # insertion order is first-seen order
        self._dirty: dict[Path, str] = {}  # named by an event, not looked at yet
        self._in_flight: dict[Path, float] = {}  # handed on -> when first noticed
        self._recheck: set[Path] = set()  # pending, and an event named it since
        self._touched: set[Path] = set()  # in flight, and an event named it meanwhile
        self._reported: set[Path] = set()
        self._unusable: set[str] = set()
        self._visible = settings.writer_check == "proc"
        self._mode_known = False
        self._scanned = False  # a missing inbox is "created" at first, "recreated" later
        self._backlog = False  # a scan or event left files in the inbox for later
        self._missed = False  # something was turned away for lack of room since a scan began
        self._rr = 0
        self._wake = asyncio.Event()
        self._rescan_now = asyncio.Event()
        self._scan_lock = asyncio.Lock()
        self._watch_stop: _WatchStop | None = None
        self._watch_failing = False
        self._settle_failing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- public API -------------------------------------------------------------------

    async def run(self) -> None:
        """Watch the inboxes and feed :attr:`queue` until the stop event is set."""
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
            known = frozenset(self._pending.keys() | self._dirty.keys() | self._in_flight.keys())
            room = self.max_pending - self._load()
            report_room = _MAX_REPORTED - len(self._reported)
            self._missed = False
            result = await asyncio.to_thread(
                _scan, self._rotated(), known, frozenset(self._reported), room, report_room
            )
            return self._apply_scan(result)

    async def drain_settled(self) -> None:
        """Settle everything noticed so far, including files a bounded scan left for
        later, and put it all on :attr:`queue`; return when nothing is pending (for
        ``--once``, with consumers running, and without :meth:`run`)."""
        await self._announce_mode()
        while not self._stop.is_set():
            if self._pending or self._dirty:
                await self._settle_step()
            elif not self._backlog:
                return
            elif not await self.scan_once():
                await self._pause(self._tick)  # no room: wait for consumers to report

    def done_with(self, path: Path) -> None:
        """A consumer handled a candidate (claimed, skipped or gone): forget it, so that
        a file appearing again under that name is offered again."""
        self._in_flight.pop(path, None)
        type_ = self._types.get(path.parent)
        if path in self._touched and type_ is not None:
            self._mark_dirty(type_, path)
        self._touched.discard(path)
        self._maybe_refill()
        self._wake_up()

    def pending_count(self) -> int:
        """Files noticed but not yet handed on."""
        return len(self._pending)

    def in_flight_count(self) -> int:
        """Files handed on whose consumer has not yet called :meth:`done_with`."""
        return len(self._in_flight)

    def oldest_pending_age(self) -> float | None:
        """Seconds since the longest-waiting file not yet claimed (settling, or settled and
        waiting in the queue) was noticed, or None."""
        noticed = [e.first_seen for e in itertools.islice(self._pending.values(), 1)]
        noticed += itertools.islice(self._in_flight.values(), 1)
        return self._clock() - min(noticed) if noticed else None

    def close(self) -> None:
        """Forget all state; idempotent. Stop :meth:`run` through the stop event first."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._recheck.clear()
        self._dirty.clear()
        self._in_flight.clear()
        self._touched.clear()
        self._reported.clear()

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
            await wait_any(self._stop, within=min(retry, self._settings.rescan_seconds))
            await self._scan_logged()  # recreates missing inboxes before watching again

    async def _watch_session(self) -> bool:
        """Watch until stopped or asked to restart (True) or until the watch fails (False)."""
        self._watch_stop = stopper = _WatchStop(self._stop)
        # The catch-up scan cannot start before this task first suspends, which happens
        # inside awatch after its watches exist: nothing dropped in between is missed.
        self._rescan_now.set()
        try:
            async for changes in watchfiles.awatch(
                *(path for _, path in self._inboxes),
                watch_filter=_accept_change,
                stop_event=stopper,
                debounce=_WATCH_DEBOUNCE_MS,
                step=_WATCH_STEP_MS,
                rust_timeout=_WATCH_TIMEOUT_MS,
                force_polling=self._settings.force_polling,
                poll_delay_ms=self._settings.poll_delay_ms,
                recursive=False,
            ):
                self._watch_failing = False
                self._on_changes(changes)
        except (OSError, RuntimeError) as exc:
            # FileNotFoundError when an inbox vanished before the watch began; the Rust
            # side reports its own failures as RuntimeError.
            if not self._watch_failing:
                log.warning("watch_failed", error=str(exc), error_type=type(exc).__name__)
            self._watch_failing = True
            return False
        return True

    async def _rescan_loop(self) -> None:
        while True:
            await wait_any(self._stop, self._rescan_now, within=self._settings.rescan_seconds)
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
        if self._dirty or self._recheck or self._due(self._clock()):
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
        now = self._clock()
        due = self._due(now)
        dirty = dict(self._dirty)  # taken off only once looked at: a failed round keeps them
        recheck = set(self._recheck)
        checked = due + [e for p in recheck if (e := self._pending.get(p)) and e not in due]
        targets = None
        if due and self._settings.writer_check != "quiet":
            targets = frozenset(e.seen.key for e in due)
        paths = [e.path for e in checked] + list(dirty)
        observed = await asyncio.to_thread(_observe, paths, targets)
        self._recheck -= recheck
        if observed.visible is not None:
            self._set_visible(observed.visible)
        now = self._clock()
        ready = self._judge(checked, observed, due, now)
        for path, type_ in dirty.items():
            if self._dirty.pop(path, None) is not None:  # else forgotten while we looked
                self._notice(type_, path, observed.seen[path], now)
        self._hand_off(ready)

    def _judge(
        self, checked: list[_Pending], observed: _Observation, due: list[_Pending], now: float
    ) -> list[_Pending]:
        """Update pending entries from one observation; return those that settled.

        Looking only when a file falls due is enough: an unchanged (size, mtime, inode)
        means nothing wrote in between. Events make us look sooner, so that a write
        restarts the window from when it happened, not from when the window ran out.
        """
        ready = []
        for entry in checked:
            if self._pending.get(entry.path) is not entry:
                continue  # forgotten while we looked
            seen = observed.seen[entry.path]
            if seen is None or seen.kind != "regular":
                self._drop(entry.path, seen)
            elif seen != entry.seen:  # written to or replaced
                entry.seen, entry.last_change, entry.credit = seen, now, self._credit(seen)
            elif seen.key in observed.writers:
                entry.last_change = now  # its window starts when the writer lets go
            # The window is taken afresh: the /proc pass may just have lengthened it.
            elif entry in due and now - entry.last_change >= self._window(entry):
                ready.append(entry)
        return ready

    def _hand_off_room(self) -> int:
        """How many files to hand on now. None until consumers have taken half the
        queue: one /proc pass then serves a batch instead of a single file."""
        free = self.queue.maxsize - self.queue.qsize()
        return free if 2 * free >= self.queue.maxsize else 0

    def _due(self, now: float) -> list[_Pending]:
        """Oldest first, as many pending files whose window has run out as can be handed
        on now (the rest are looked at in a later round)."""
        room = self._hand_off_room()
        if not room:
            return []
        due = (e for e in self._pending.values() if now >= e.last_change + self._window(e))
        return list(itertools.islice(due, room))

    def _next_due(self) -> float | None:
        if not self._pending or not self._hand_off_room():
            return None  # a consumer taking from the queue wakes us
        earliest = min(e.last_change + self._window(e) for e in self._pending.values())
        return max(earliest - self._clock(), 0.0) + _DUE_SLACK

    def _hand_off(self, ready: list[_Pending]) -> None:
        # Never wait for room with a verdict in hand: what is not taken now is looked at
        # again, freshly, once a consumer has made room.
        for entry in ready:
            if self.queue.full():
                return
            del self._pending[entry.path]
            self._in_flight[entry.path] = entry.first_seen
            self.queue.put_nowait(entry.candidate())
            log.info(
                "file_settled",
                type=entry.type,
                path=str(entry.path),
                size=entry.seen.size,
                waited=round(self._clock() - entry.first_seen, 3),
            )

    def _window(self, entry: _Pending | None = None) -> float:
        """How long ``entry`` must stay unchanged before it is handed on.

        With writers visible, the settle window. Otherwise the quiet window, less the time
        the file had already been still (by its mtime) when first seen, and never less
        than the settle window.
        """
        settings = self._settings
        if self._visible and settings.writer_check != "quiet":
            return settings.settle_seconds
        credit = entry.credit if entry is not None else 0.0
        return max(settings.settle_seconds, settings.quiet_seconds - credit)

    def _credit(self, seen: _Seen) -> float:
        """How long the file has been still by its mtime; none on network file systems
        (``force_polling``), whose clocks may differ from ours."""
        if self._settings.force_polling:
            return 0.0
        still = time.time() - seen.mtime_ns / 1e9
        return min(max(still, 0.0), self._settings.quiet_seconds)

    def _set_visible(self, visible: bool) -> None:
        if self._settings.writer_check != "auto" or visible == self._visible:
            return
        self._visible = visible
        log.info("writer_visibility_changed", writers_visible=visible, window=self._window())

    async def _announce_mode(self) -> None:
        """Probe /proc once and log how settling will be judged (once per watcher)."""
        if self._mode_known:
            return
        self._mode_known = True
        mode = self._settings.writer_check
        visible = None
        if mode != "quiet":
            _, visible = await asyncio.to_thread(_proc_writers, frozenset())
            self._visible = visible or mode == "proc"
        log.info("writer_check_mode", mode=mode, writers_visible=visible, window=self._window())
        if mode == "proc" and not visible:
            log.warning("writer_check_proc_partial", detail="some processes' fds are unreadable")

    # -- bookkeeping ----------------------------------------------------------------------

    def _load(self) -> int:
        return len(self._pending) + len(self._dirty) + len(self._in_flight)

    def _notice(self, type_: str, path: Path, seen: _Seen | None, now: float) -> bool:
        if seen is None or path in self._pending or path in self._in_flight:
            return False
        if seen.kind != "regular":
            self._report(path, seen.kind)
            return False
        if self._load() >= self.max_pending:
            self._turned_away()
            return False
        self._reported.discard(path)
        self._pending[path] = _Pending(type_, path, seen, now, now, self._credit(seen))
        log.debug("file_noticed", type=type_, path=str(path), size=seen.size)
        return True

    def _drop(self, path: Path, seen: _Seen | None) -> None:
        del self._pending[path]
        if seen is None:
            log.debug("file_vanished", path=str(path))
        else:
            self._report(path, seen.kind)
        self._maybe_refill()

    def _report(self, path: Path, kind: str) -> None:
        if path in self._reported:
            return
        if len(self._reported) >= _MAX_REPORTED:
            log.debug("file_skipped_not_regular", path=str(path), kind=kind)
            return
        self._reported.add(path)
        log.warning("file_skipped_not_regular", path=str(path), kind=kind)

    def _mark_dirty(self, type_: str, path: Path) -> None:
        if path in self._dirty:
            return
        if path in self._pending:
            self._recheck.add(path)
        elif path in self._in_flight:
            self._touched.add(path)  # looked at again once the consumer is done with it
        elif self._load() < self.max_pending:
            self._dirty[path] = type_
        else:
            self._turned_away()

    def _turned_away(self) -> None:
        """A file was left in the inbox for lack of room: a later scan must find it."""
        self._backlog = self._missed = True

    def _forget(self, path: Path) -> None:
        if self._pending.pop(path, None) is not None:
            log.debug("file_vanished", path=str(path))
        self._dirty.pop(path, None)
        self._recheck.discard(path)
        self._reported.discard(path)
        self._maybe_refill()

    def _maybe_refill(self) -> None:
        if self._backlog and self._load() <= self._low_water:
            self._rescan_now.set()

    def _wake_up(self) -> None:
        self._wake.set()

    def _on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        only_deleted: dict[Path, bool] = {}
        for change, raw in changes:
            path = Path(raw)
            deleted = change == watchfiles.Change.deleted
            only_deleted[path] = only_deleted.get(path, True) and deleted
        for path, gone in only_deleted.items():
            self._on_path_event(path, gone)
        self._wake_up()

    def _on_path_event(self, path: Path, gone: bool) -> None:
        if path in self._types:  # the inbox folder itself
            if gone and self._watch_stop is not None:
                self._watch_stop.set()  # watch again once the folder is back
            return
        type_ = self._types.get(path.parent)
        if type_ is None:
            return
        if gone and path not in self._in_flight:
            self._forget(path)
        elif not gone:
            self._mark_dirty(type_, path)

    def _apply_scan(self, result: _ScanResult) -> int:
        for type_ in result.recreated:
            folder = str(self._inbox_path(type_))
            if self._scanned:
                log.warning("inbox_recreated", type=type_, path=folder)
            else:
                log.info("inbox_created", type=type_, path=folder)
        self._scanned = True
        if result.recreated and self._watch_stop is not None:
            self._watch_stop.set()  # an inotify watch does not follow a new folder
        self._note_unusable(result.unusable)
        self._reported.difference_update(result.unreported)
        for path, kind in result.odd:
            self._report(path, kind)
        # An event turned away while the scan ran may name a file the scan passed by.
        self._backlog = result.truncated or self._missed
        now = self._clock()
        noticed = sum(self._notice(type_, path, seen, now) for type_, path, seen in result.found)
        if noticed:
            self._wake_up()
        return noticed

    def _note_unusable(self, unusable: dict[str, str]) -> None:
        for type_, error in unusable.items():
            if type_ not in self._unusable:
                log.error("inbox_unusable", type=type_, error=error)
        self._unusable = set(unusable)

    def _inbox_path(self, type_: str) -> Path:
        return next(path for name, path in self._inboxes if name == type_)

    def _rotated(self) -> list[tuple[str, Path]]:
        # Each scan starts at the next inbox, so a flood in one cannot always come first.
        if not self._inboxes:
            return []
        self._rr = (self._rr + 1) % len(self._inboxes)
        return self._inboxes[self._rr :] + self._inboxes[: self._rr]

    async def _pause(self, seconds: float) -> None:
        await wait_any(self._stop, self._wake, within=seconds)

    async def _end_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Collects the helpers' CancelledErrors (we asked for those); ours still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)


def _accept_change(change: watchfiles.Change, path: str) -> bool:
    return not is_ignored(Path(path).name)


# -- blocking helpers, run in a thread ---------------------------------------------------

_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISREG, "regular"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char_device"),
    (stat.S_ISBLK, "block_device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "other")


def _look(path: Path) -> _Seen | None:
    try:
        return _Seen.of(path.lstat())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _observe(paths: list[Path], targets: frozenset[_Key] | None) -> _Observation:
    writers: frozenset[_Key] = frozenset()
    visible = None
    if targets:
        writers, visible = _proc_writers(targets)
    # lstat after the /proc pass: a writer that writes and closes in between shows up
    # as a change, instead of slipping between the two looks.
    seen = {path: _look(path) for path in paths}
    return _Observation(seen, writers, visible)


def _proc_writers(targets: frozenset[_Key]) -> tuple[frozenset[_Key], bool]:
    """Which of ``targets`` some other process has open for writing, in one pass over
    ``/proc``; and whether every other process's fds could be read."""
    found: set[_Key] = set()
    complete = True
    own = str(os.getpid())
    try:
        entries = os.scandir(_PROC)
    except OSError:
        return frozenset(), False
    with entries:
        for entry in entries:
            if entry.name.isdigit() and entry.name != own:
                complete = _scan_process(entry.path, targets, found) and complete
    return frozenset(found), complete


def _scan_process(pid_dir: str, targets: frozenset[_Key], found: set[_Key]) -> bool:
    """Add to ``found`` the targets this process holds open for writing; False if its fds
    could not all be read (which makes the caller assume an unseen writer)."""
    try:
        with os.scandir(f"{pid_dir}/fd") as fds:
            for fd in fds:
                key = _fd_key(fd)
                if key in targets and _fd_writable(f"{pid_dir}/fdinfo/{fd.name}"):
                    found.add(key)
    except (FileNotFoundError, ProcessLookupError):
        return True  # exited meanwhile: it holds nothing any more
    except OSError:
        return False  # EACCES and the like: this process is invisible to us
    return True


def _fd_key(fd: os.DirEntry[str]) -> _Key | None:
    try:
        st = fd.stat()  # follows the fd link to the open file; opens nothing
    except FileNotFoundError:
        return None  # closed meanwhile
    except PermissionError:
        # The fd list was readable but this one link is not (seen for some container
        # init processes): its target is nothing we can read, so not one of our files.
        return None
    return (st.st_dev, st.st_ino)


def _fd_writable(fdinfo: str) -> bool:
    try:
        with open(fdinfo, encoding="ascii") as info:
            for line in info:
                if line.startswith("flags:"):
                    access = int(line.split()[1], 8) & 0o3  # O_ACCMODE
                    return access in (os.O_WRONLY, os.O_RDWR)
    except FileNotFoundError:
        return False  # closed meanwhile
    return True  # no flags line: assume the worst


def _scan(
    inboxes: list[tuple[str, Path]],
    known: frozenset[Path],
    reported: frozenset[Path],
    room: int,
    report_room: int,
) -> _ScanResult:
    """Walk the inboxes in turn, one new regular file from each, until ``room`` new files
    were found or every inbox is exhausted."""
    result = _ScanResult()
    with ExitStack() as stack:
        turn: deque[tuple[str, Iterator[os.DirEntry[str]]]] = deque()
        for type_, path in inboxes:
            opened = _open_inbox(type_, path, result)
            if opened is not None:
                turn.append((type_, stack.enter_context(opened)))
        while turn and len(result.found) < room:
            type_, entries = turn.popleft()
            if _take_one(type_, entries, known, reported, report_room, result):
                turn.append((type_, entries))
        result.truncated = bool(turn)
    result.unreported = [p for p in reported if (s := _look(p)) is None or s.kind == "regular"]
    return result


def _open_inbox(type_: str, path: Path, result: _ScanResult) -> os._ScandirIterator[str] | None:
    try:
        return os.scandir(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        result.recreated.append(type_)
    except (NotADirectoryError, PermissionError) as exc:
        result.unusable[type_] = str(exc)
        return None
    try:
        return os.scandir(path)
    except OSError as exc:  # gone again already; the next scan tries once more
        result.unusable[type_] = str(exc)
        return None


def _take_one(
    type_: str,
    entries: Iterator[os.DirEntry[str]],
    known: frozenset[Path],
    reported: frozenset[Path],
    report_room: int,
    result: _ScanResult,
) -> bool:
    """Move ``entries`` on to the next new regular file and record it; False when the
    folder has no more entries."""
    for entry in entries:
        if is_ignored(entry.name):
            continue
        path = Path(entry.path)
        if path in known:
            continue
        try:
            seen = _Seen.of(entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
        if seen.kind == "regular":
            result.found.append((type_, path, seen))
            return True
        if path not in reported and len(result.odd) < report_room:
            result.odd.append((path, seen.kind))
    return False
