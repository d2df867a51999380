"""The daily row budget, counted in the spool: durable, and shared by every daemon on it.

Layout: ``<spool>/budget/<YYYY-MM-DD>/<00000001>, <00000002>, ...``, one folder per UTC
calendar day. Each numbered file is one immutable entry, ``{"job", "type", "rows"}``:
a reservation (rows > 0) or the release of one (rows < 0). An entry appears whole (written
aside, then hard-linked into place; ``O_EXCL`` where there are no hard links) and is never
changed or removed while its day is kept.

Why two daemons can never overshoot together, with no lock to go stale: entry *n* is
created by exclusive create, which the file server decides once, so at most one daemon
makes it. A daemon creates entry *n* only after reading entries 1 .. *n*-1 and finding
that their sum plus its rows stays within every budget. So every sum of entries 1 .. *n*
is within budget, whoever wrote them. A daemon that loses the race for *n* reads the
winner's entry and tries *n* + 1. Nothing here trusts a directory listing or a cached
"no such file": a name that looks free is only taken if the server agrees (``EEXIST``
otherwise), which is what holds on NFS and SSHFS mounts where ``flock`` does not.

A day is the UTC calendar day; rows count against the day they are reserved on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import structlog

from daemon.spool.fs import exclusive_write, fsync_dir
from daemon.spool.layout import Layout

log = structlog.get_logger(__name__)

_NAME_DIGITS = 8


@dataclass(frozen=True)
class Entry:
    """One reservation (rows > 0) or release (rows < 0) of a file job's rows."""

    job: str
    type: str
    rows: int


class TornEntryError(OSError):
    """An entry exists but cannot be read whole (a writer without hard links died mid-way).

    Its rows are unknown, so nothing more is admitted that day: overshooting is worse.
    """


@dataclass(frozen=True)
class Limits:
    """Rows per UTC day: ``per_day`` for all types together, ``per_type`` for some; 0 = none."""

    per_day: int = 0
    per_type: Mapping[str, int] = field(default_factory=dict)

    def refusal(self, used: Mapping[str, int], file_type: str, rows: int) -> str | None:
        """Why ``rows`` more of ``file_type`` would exceed a budget (None if they fit)."""
        total = sum(used.values())
        if self.per_day and total + rows > self.per_day:
            return (f"daily budget: {total} of {self.per_day} rows used today (UTC), "
                    f"next file needs {rows}")
        limit = self.per_type.get(file_type, 0)
        if limit and used.get(file_type, 0) + rows > limit:
            return (f"daily {file_type} budget: {used.get(file_type, 0)} of {limit} rows used "
                    f"today (UTC), next file needs {rows}")
        return None

    def left(self, used: Mapping[str, int], file_type: str) -> int | None:
        """Rows of ``file_type`` that still fit today; None when no budget applies."""
        room = []
        if self.per_day:
            room.append(self.per_day - sum(used.values()))
        if self.per_type.get(file_type, 0):
            room.append(self.per_type[file_type] - used.get(file_type, 0))
        return max(0, min(room)) if room else None


def utc_day(timestamp: float) -> date:
    """The UTC calendar day of a Unix timestamp."""
    return datetime.fromtimestamp(timestamp, UTC).date()


class Ledger:
    """Rows reserved per UTC day and type, in ``<spool_root>/budget/``.

    Blocking file I/O: call it from a thread (``asyncio.to_thread``). One instance per
    process; any number of processes (on any hosts) may share the folder.
    """

    def __init__(self, spool_root: Path, limits: Limits, *, file_mode: int = 0o640) -> None:
        self.root = Layout(spool_root).budget
        self.limits = limits
        self._mode = file_mode
        self._known: dict[date, list[Entry]] = {}  # entries 1..n read so far, per day
        self._lock = threading.Lock()  # one admission at a time within this process

    def reserve(self, job: str, file_type: str, rows: int, day: date) -> bool:
        """Count ``rows`` of ``job`` against ``day`` if every budget allows; False if not.

        Idempotent per job and day: a job that already holds a reservation (a daemon that
        resumes it after a restart) gets True without a second one.
        """
        if rows < 0:
            raise ValueError("rows must not be negative")
        with self._lock:
            try:
                return self._reserve(job, file_type, rows, day)
            except TornEntryError as exc:
                log.warning("budget_entry_unreadable", path=exc.filename)
                return False

    def _reserve(self, job: str, file_type: str, rows: int, day: date) -> bool:
        while True:
            entries = self._read(day)
            if _held(entries, job) > 0:
                return True
            if self.limits.refusal(_sum(entries), file_type, rows) is not None:
                return False
            if rows == 0:
                return True  # nothing to count: a file whose rows are unknown (a .url)
            if self._append(day, len(entries) + 1, Entry(job, file_type, rows)):
                return True
            # Another daemon took that number first: read its entry and decide again.

    def release(self, job: str, day: date) -> int:
        """Give back what ``job`` holds on ``day`` (it was not sent); the rows given back."""
        with self._lock:
            while True:
                entries = self._read(day)
                held = _held(entries, job)
                if held <= 0:
                    return 0
                kind = next(e.type for e in reversed(entries) if e.job == job)
                if self._append(day, len(entries) + 1, Entry(job, kind, -held)):
                    return held

    def used(self, day: date) -> dict[str, int]:
        """Rows reserved on ``day``, per type (types with none are absent)."""
        with self._lock:
            return {name: rows for name, rows in _sum(self._read(day)).items() if rows}

    def refusal(self, file_type: str, rows: int, day: date) -> str | None:
        """Why ``rows`` more would not be admitted on ``day`` now (None if they would)."""
        return self.limits.refusal(self.used(day), file_type, rows)

    def prune(self, keep_from: date) -> int:
        """Remove the folders of days before ``keep_from``; how many were removed."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for folder in self.root.iterdir():
                if _day_of(folder.name) is not None and folder.name < keep_from.isoformat():
                    shutil.rmtree(folder, ignore_errors=True)
                    self._known.pop(date.fromisoformat(folder.name), None)
                    removed += 1
        return removed

    # -- entries ---------------------------------------------------------------------

    def _folder(self, day: date) -> Path:
        return self.root / day.isoformat()

    def _read(self, day: date) -> list[Entry]:
        """Entries 1..n of ``day``: those read before, then new ones until one is missing."""
        entries = self._known.setdefault(day, [])
        folder = self._folder(day)
        while (entry := _load(folder / _name(len(entries) + 1))) is not None:
            entries.append(entry)
        return entries

    def _append(self, day: date, number: int, entry: Entry) -> bool:
        """Create entry ``number``; False if it exists (someone else's: read next time)."""
        folder = self._folder(day)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"job": entry.job, "type": entry.type, "rows": entry.rows}).encode()
        if not exclusive_write(folder / _name(number), data, self._mode):
            return False
        fsync_dir(folder)  # exclusive_write does not where it falls back to O_EXCL
        self._known[day].append(entry)
        log.debug("budget_entry", day=day.isoformat(), number=number, job=entry.job,
                  type=entry.type, rows=entry.rows)
        return True


def _name(number: int) -> str:
    return f"{number:0{_NAME_DIGITS}d}"


def _day_of(name: str) -> date | None:
    try:
        return date.fromisoformat(name)
    except ValueError:
        return None


def _held(entries: list[Entry], job: str) -> int:
    return sum(e.rows for e in entries if e.job == job)


def _sum(entries: list[Entry]) -> Counter[str]:
    used: Counter[str] = Counter()
    for entry in entries:
        used[entry.type] += entry.rows
    return used


def _load(path: Path) -> Entry | None:
    """The entry at ``path``; None if there is none (yet)."""
    try:
        data = json.loads(path.read_bytes())
        return Entry(str(data["job"]), str(data["type"]), int(data["rows"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise TornEntryError(errno.EIO, "budget entry cannot be read whole", str(path)) from None
