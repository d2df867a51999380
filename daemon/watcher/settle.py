"""The settle table: which noticed files are due for a look, settled, or gone.

Pure bookkeeping: no I/O, no asyncio, no clock of its own. The watcher feeds it what it
saw (an :class:`Observation`: each path's lstat and the files some process has open for
writing) and the time ``now`` from its injected monotonic clock; the table answers which
files to look at next (:meth:`SettleTable.plan`), which settled (:meth:`SettleTable.apply`)
and when the next one falls due (:meth:`SettleTable.next_due`). Tests drive it with a
fake clock and made-up observations, without sleeping.

A file *settles* once its size, mtime and inode stayed the same for a window and no
process was seen writing it. The window is ``settle_seconds`` while writers are visible
(a lease probe, or a ``/proc`` that shows every process: see
:mod:`~daemon.watcher.checks`), else ``quiet_seconds`` less the time the file had
already been still by its mtime.
"""

from __future__ import annotations

import enum
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import WatchConfig
from daemon.watcher.checks import Check, Choice, Probe, WriterChecks

Key = tuple[int, int]  # (st_dev, st_ino): what identifies a file across renames

_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISREG, "regular"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char_device"),
    (stat.S_ISBLK, "block_device"),
)


def kind_of(mode: int) -> str:
    """The kind of file an ``st_mode`` describes ("regular", "symlink", "fifo"...)."""
    return next((name for test, name in _KINDS if test(mode)), "other")


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
class Seen:
    """One ``lstat`` of a path, reduced to what settling compares."""

    kind: str
    dev: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Seen:
        return cls(kind_of(st.st_mode), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def key(self) -> Key:
        return (self.dev, self.inode)


@dataclass(slots=True, eq=False)  # identity: "is this still the entry we looked at?"
class Pending:
    """A regular file being watched until it settles."""

    type: str
    path: Path
    seen: Seen
    first_seen: float
    last_change: float
    # Seconds the file had already been still when this version of it was first seen
    # (from its mtime): a file renamed in long after it was written needs no quiet wait.
    credit: float = 0.0
    blind: bool = False  # could not be opened for a lease probe: judged without one
    held: bool = False  # a lease probe found a writer (counted once per file)

    def candidate(self) -> Candidate:
        seen = self.seen
        return Candidate(self.type, self.path, seen.size, seen.mtime_ns, seen.inode)


@dataclass
class Observation:
    """What one look saw: every path's lstat and the files open for writing.

    ``wall`` is the wall-clock time of the look (compared with mtimes); ``visible`` is
    None when /proc was not looked at; ``lease`` holds the lease probes' answers.
    """

    seen: dict[Path, Seen | None]
    writers: frozenset[Key] = frozenset()
    visible: bool | None = None
    wall: float = 0.0
    lease: dict[Path, Probe] = field(default_factory=dict)


@dataclass
class Plan:
    """What the next look must cover: files due, pending files an event named, new paths."""

    due: list[Pending]
    checked: list[Pending]
    dirty: dict[Path, str]
    recheck: set[Path]
    targets: frozenset[Key] | None  # files to look for in /proc; None: no /proc pass
    probes: dict[Path, Key] = field(default_factory=dict)  # files to probe with a lease

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.checked] + list(self.dirty)


class Notice(enum.Enum):
    """What became of a path offered to :meth:`SettleTable.notice`."""

    NEW = "new"  # now pending
    KNOWN = "known"  # gone, or already pending or in flight
    NOT_REGULAR = "not_regular"  # a symlink, fifo, folder...: never a submission
    NO_ROOM = "no_room"  # left in the inbox for a later scan


@dataclass
class Verdict:
    """What one :meth:`SettleTable.apply` decided."""

    ready: list[Pending] = field(default_factory=list)  # settled, oldest first
    dropped: list[tuple[Path, Seen | None]] = field(default_factory=list)
    noticed: list[tuple[Path, Notice, Seen | None]] = field(default_factory=list)
    visibility_changed: bool = False
    held_back: list[Path] = field(default_factory=list)  # a lease probe found a writer
    choices: list[Choice] = field(default_factory=list)  # file systems whose check changed
    refused: str | None = None  # leases just became unusable everywhere, and why


class SettleTable:
    """Pending, dirty and in-flight paths, and the rules that move them on.

    * *pending*: regular files noticed and not yet settled, in first-seen order;
    * *dirty*: paths an event named that nobody has looked at yet;
    * *in flight*: candidates handed on whose consumer has not released them.

    Together they never exceed ``max_pending``; what does not fit is left in the inbox
    and :attr:`backlog` says a later scan must look again.
    """

    def __init__(self, settings: WatchConfig, max_pending: int) -> None:
        self.settings = settings
        self.max_pending = max_pending
        self.low_water = max_pending // 2
        #: Which writer check judges which file system.
        self.checks = WriterChecks(settings.writer_check)
        #: Files were left in the inbox for lack of room: a later scan must find them.
        self.backlog = False
        self._missed = False  # something was turned away since the current scan began
        self._pending: dict[Path, Pending] = {}  # insertion order is first-seen order
        self._dirty: dict[Path, str] = {}
        self._in_flight: dict[Path, tuple[str, float]] = {}  # -> (type, first noticed)
        self._recheck: set[Path] = set()  # pending, and an event named it since
        self._touched: set[Path] = set()  # in flight, and an event named it meanwhile

    # -- counts -------------------------------------------------------------------------

    def load(self) -> int:
        """Paths pending, dirty or in flight."""
        return len(self._pending) + len(self._dirty) + len(self._in_flight)

    def room(self) -> int:
        return self.max_pending - self.load()

    def pending_count(self) -> int:
        return len(self._pending)

    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def known(self) -> frozenset[Path]:
        """Every path the table holds (a scan offers only the others)."""
        return frozenset(self._pending.keys() | self._dirty.keys() | self._in_flight.keys())

    def oldest_noticed(self) -> float | None:
        """When the longest-waiting file not yet released (settling, or settled and not
        yet released by its consumer) was noticed, or None."""
        noticed = [e.first_seen for e in itertools.islice(self._pending.values(), 1)]
        noticed += [first for _, first in itertools.islice(self._in_flight.values(), 1)]
        return min(noticed) if noticed else None

    def unsettled(self) -> bool:
        """Whether some file is pending or awaits its first look."""
        return bool(self._pending or self._dirty)

    def needs_refill(self) -> bool:
        """Files were left behind and the load has dropped enough to scan for them."""
        return self.backlog and self.load() <= self.low_water

    def has_work(self, now: float, room: int) -> bool:
        """Whether a look is needed now."""
        return bool(self._dirty or self._recheck or self.due(now, room))

    # -- windows ------------------------------------------------------------------------

    @property
    def visible(self) -> bool:
        """Whether /proc shows every writer (decides the window where no lease works)."""
        return self.checks.visible

    def check(self, entry: Pending | None = None) -> Check:
        """How writers of ``entry`` are looked for (None: a file where leases work)."""
        return self.checks.check(None) if entry is None else self.checks.check(
            entry.seen.dev, entry.blind)

    def window(self, entry: Pending | None = None) -> float:
        """How long ``entry`` must stay unchanged before it is handed on.

        With writers visible (lease, or /proc), the settle window. Otherwise the quiet
        window, less the time the file had already been still (by its mtime) when first
        seen, and never less than the settle window.
        """
        settings = self.settings
        if self.check(entry) is not Check.QUIET:
            return settings.settle_seconds
        credit = entry.credit if entry is not None else 0.0
        return max(settings.settle_seconds, settings.quiet_seconds - credit)

    def credit(self, seen: Seen, wall: float) -> float:
        """How long the file has been still by its mtime at wall time ``wall``; none on
        network file systems (``force_polling``), whose clocks may differ from ours."""
        if self.settings.force_polling:
            return 0.0
        still = wall - seen.mtime_ns / 1e9
        return min(max(still, 0.0), self.settings.quiet_seconds)

    def probed(self, visible: bool) -> None:
        """The first /proc pass found every other process's fds readable, or not."""
        self.checks.visible = visible or self.settings.writer_check == "proc"

    def set_visible(self, visible: bool) -> bool:
        """Record what a /proc pass found; True when that changed the window ("auto")."""
        if self.settings.writer_check != "auto" or visible == self.visible:
            return False
        self.checks.visible = visible
        return True

    def due(self, now: float, room: int) -> list[Pending]:
        """Oldest first, as many pending files whose window has run out as ``room``
        allows (the rest are looked at in a later round)."""
        if room <= 0:
            return []
        due = (e for e in self._pending.values() if now >= e.last_change + self.window(e))
        return list(itertools.islice(due, room))

    def next_due(self, now: float, room: int) -> float | None:
        """Seconds until the next pending file falls due; None when nothing is pending or
        nothing could be handed on (then only an event or a release needs a look)."""
        if not self._pending or room <= 0:
            return None
        earliest = min(e.last_change + self.window(e) for e in self._pending.values())
        return max(earliest - now, 0.0)

    # -- noticing and events ------------------------------------------------------------

    def scan_started(self) -> None:
        self._missed = False

    def scan_finished(self, truncated: bool) -> None:
        # An event turned away while the scan ran may name a file the scan passed by.
        self.backlog = truncated or self._missed

    def notice(self, type_: str, path: Path, seen: Seen | None, now: float,
               wall: float) -> Notice:
        """Start watching ``path`` (as ``seen`` at wall time ``wall``) if it is new."""
        if seen is None or path in self._pending or path in self._in_flight:
            return Notice.KNOWN
        if seen.kind != "regular":
            return Notice.NOT_REGULAR
        if self.load() >= self.max_pending:
            self._turned_away()
            return Notice.NO_ROOM
        self._pending[path] = Pending(type_, path, seen, now, now, self.credit(seen, wall))
        return Notice.NEW

    def mark_dirty(self, type_: str, path: Path) -> None:
        """An event named ``path``: look at it (again) soon."""
        if path in self._dirty:
            return
        if path in self._pending:
            self._recheck.add(path)
        elif path in self._in_flight:
            self._touched.add(path)  # looked at again once the consumer releases it
        elif self.load() < self.max_pending:
            self._dirty[path] = type_
        else:
            self._turned_away()

    def forget(self, path: Path) -> bool:
        """An event said ``path`` was deleted; True if a pending file vanished. A file in
        flight is left alone: its consumer releases it."""
        if path in self._in_flight:
            return False
        vanished = self._pending.pop(path, None) is not None
        self._dirty.pop(path, None)
        self._recheck.discard(path)
        return vanished

    def _turned_away(self) -> None:
        self.backlog = self._missed = True

    # -- looking and judging ------------------------------------------------------------

    def plan(self, now: float, room: int) -> Plan:
        """What the next look covers. Nothing changes until :meth:`apply`: a look that
        fails leaves every path to be looked at again."""
        due = self.due(now, room)
        recheck = set(self._recheck)
        checked = due + [e for p in recheck if (e := self._pending.get(p)) and e not in due]
        probes = {e.path: e.seen.key for e in due if self.check(e) is Check.LEASE}
        in_proc = [e for e in due if e.path not in probes]
        targets = None
        if in_proc and self.settings.writer_check in ("auto", "proc"):
            targets = frozenset(e.seen.key for e in in_proc)
        return Plan(due, checked, dict(self._dirty), recheck, targets, probes)

    def apply(self, plan: Plan, observed: Observation, now: float) -> Verdict:
        """Update the table from the look ``plan`` asked for; say what settled."""
        verdict = Verdict()
        self._recheck -= plan.recheck
        if observed.visible is not None:
            verdict.visibility_changed = self.set_visible(observed.visible)
        self._judge(plan, observed, now, verdict)
        for path, type_ in plan.dirty.items():
            if self._dirty.pop(path, None) is not None:  # else forgotten while we looked
                seen = observed.seen[path]
                outcome = self.notice(type_, path, seen, now, observed.wall)
                verdict.noticed.append((path, outcome, seen))
        return verdict

    def _judge(self, plan: Plan, observed: Observation, now: float, verdict: Verdict) -> None:
        """Looking only when a file falls due is enough: an unchanged (size, mtime, inode)
        means nothing wrote in between. Events make us look sooner, so that a write
        restarts the window from when it happened, not from when the window ran out."""
        for entry in plan.checked:
            if self._pending.get(entry.path) is not entry:
                continue  # forgotten while we looked
            seen = observed.seen[entry.path]
            # A probe asked for and not answered proves nothing: the file waits.
            unanswered = Probe.CHANGED if entry.path in plan.probes else None
            probe = self._learn(entry, observed.lease.get(entry.path, unanswered), verdict)
            if seen is None or seen.kind != "regular":
                del self._pending[entry.path]
                verdict.dropped.append((entry.path, seen))
            elif seen != entry.seen:  # written to or replaced
                entry.seen, entry.last_change = seen, now
                entry.credit = self.credit(seen, observed.wall)
            elif seen.key in observed.writers or probe in (Probe.WRITER, Probe.CHANGED):
                entry.last_change = now  # its window starts when the writer lets go
            # The window is taken afresh: the /proc pass may just have lengthened it.
            elif entry in plan.due and now - entry.last_change >= self.window(entry):
                verdict.ready.append(entry)
        verdict.choices = self.checks.changes({e.seen.dev for e in plan.due})

    def _learn(self, entry: Pending, probe: Probe | None, verdict: Verdict) -> Probe | None:
        """Take in what a lease probe of ``entry`` said (before its window is judged)."""
        if probe is Probe.BLIND:
            entry.blind = True
        elif probe is Probe.WRITER and not entry.held:
            entry.held = True
            verdict.held_back.append(entry.path)
        elif probe is not None and self.checks.learn(entry.seen.dev, probe):
            verdict.refused = self.checks.refused
        return probe

    # -- hand-off -----------------------------------------------------------------------

    def hand_off(self, entry: Pending) -> Candidate:
        """``entry`` settled and goes to a consumer: in flight until released."""
        del self._pending[entry.path]
        self._in_flight[entry.path] = (entry.type, entry.first_seen)
        return entry.candidate()

    def release(self, path: Path) -> bool:
        """The consumer is done with ``path``; a file appearing again under that name is
        offered again. True if the path was in flight."""
        held = self._in_flight.pop(path, None)
        if held is not None and path in self._touched:
            self.mark_dirty(held[0], path)
        self._touched.discard(path)
        return held is not None

    def clear(self) -> None:
        self._pending.clear()
        self._dirty.clear()
        self._in_flight.clear()
        self._recheck.clear()
        self._touched.clear()
