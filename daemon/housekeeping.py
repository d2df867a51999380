"""Year-two housekeeping: old outcomes, history and duplicate markers go; low disk is said.

- ``[retention] done_days`` / ``failed_days``: a finished file older than that (by its
  record's modification time: the record is written once, when the file finished) is
  deleted together with its record and result files. ``history_days`` does the same for
  ``history/<type>/``, the earlier records (and results) of files put back by ``retry``.
  0 keeps them forever. A file whose ``on_finish`` hook is still owed is kept.
- Duplicate markers that are over (:meth:`Markers.stale`: older than the duplicate window)
  are removed. (The budget ledger's old days are pruned by :mod:`daemon.job.money`.)
- Free space on the spool's file system under ``spool.min_free_mb`` degrades ``/readyz``,
  shows in ``status`` and a metric, and is logged once when it happens (and once when it
  clears).

Everything here blocks: the service calls it in a thread. A pass is bounded: at most
``max_deletions`` outcomes and ``max_markers`` markers; a pass that hit a bound makes the
next one come at the next housekeeping round instead of ``sweep_seconds`` later.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import structlog

from daemon.config import Config
from daemon.metrics import Metrics
from daemon.spool import Spool
from daemon.spool.fs import read_json

log = structlog.get_logger(__name__)

DAY = 86400.0
MiB = 1024**2


@dataclass
class Swept:
    """What one pass removed."""

    done: int = 0
    failed: int = 0
    history: int = 0
    markers: int = 0

    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


class Housekeeper:
    """Retention, marker pruning and the low-disk check of one spool."""

    max_deletions = 500
    max_markers = 5000
    #: Retention and pruning run at most this often (unless a pass was cut short).
    sweep_seconds = 3600.0

    def __init__(self, spool: Spool, config: Config, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.retention = config.retention
        self.window_seconds = config.upload.duplicate_window_hours * 3600
        self.min_free = config.spool.min_free_mb * MiB
        self.metrics = metrics
        self.clock = clock
        self._next_sweep = 0.0
        self._low: str | None = None

    # -- low disk ---------------------------------------------------------------------------

    def low_disk(self) -> str | None:
        """Why the spool is low on disk space, for readiness and status; None when not."""
        return self._low

    def check_disk(self) -> None:
        """Measure free space; say so once when it falls under the threshold or recovers."""
        try:
            free = shutil.disk_usage(self.spool.root).free
        except OSError as exc:
            log.warning("disk_usage_unknown", error=str(exc))
            return
        self.metrics.spool_free_bytes.set(free)
        low = self.min_free > 0 and free < self.min_free
        self.metrics.low_disk.set(1 if low else 0)
        if low:
            was = self._low
            self._low = (f"low disk: {free // MiB} MiB free on the spool's file system, "
                         f"under spool.min_free_mb ({self.min_free // MiB})")
            if was is None:
                log.warning("low_disk", free_mb=free // MiB, min_free_mb=self.min_free // MiB,
                            root=str(self.spool.root))
        elif self._low is not None:
            self._low = None
            log.info("disk_space_ok", free_mb=free // MiB)

    # -- retention and pruning --------------------------------------------------------------

    def due(self) -> bool:
        return self.clock() >= self._next_sweep

    def sweep(self) -> Swept:
        """One bounded pass of retention and pruning."""
        swept = Swept()
        left = self.max_deletions
        for outcome in ("done", "failed"):
            days = getattr(self.retention, f"{outcome}_days")
            for file_type in self.spool.types:
                if days and left > 0:
                    count = self._expire(self.spool.outcome_dir(outcome, file_type), days,
                                         left, history=False)
                    setattr(swept, outcome, getattr(swept, outcome) + count)
                    left -= count
        if self.retention.history_days:
            for file_type in self.spool.types:
                if left > 0:
                    count = self._expire(self.spool.history(file_type),
                                         self.retention.history_days, left, history=True)
                    swept.history += count
                    left -= count
        swept.markers = _safely(self.spool.marks.prune, self.window_seconds, self.max_markers)
        self._count(swept)
        cut_short = left <= 0 or swept.markers >= self.max_markers
        self._next_sweep = 0.0 if cut_short else self.clock() + self.sweep_seconds
        return swept

    def _count(self, swept: Swept) -> None:
        for kind in ("done", "failed", "history", "markers"):
            if getattr(swept, kind):
                self.metrics.expired.labels(kind).inc(getattr(swept, kind))
        if swept.total():
            log.info("housekeeping_removed", done=swept.done, failed=swept.failed,
                     history=swept.history, markers=swept.markers)

    def _expire(self, folder: Path, days: int, limit: int, *, history: bool) -> int:
        """Delete up to ``limit`` records older than ``days`` in ``folder``, each with the
        files it names. A folder that cannot be read now is said and skipped."""
        return _safely(self._expire_in, folder, days, limit, history=history)

    def _expire_in(self, folder: Path, days: int, limit: int, *, history: bool) -> int:
        cutoff = self.clock() - days * DAY
        deleted = 0
        try:
            entries = os.scandir(folder)  # streamed: a folder of a million costs no memory
        except FileNotFoundError:
            return 0
        with entries:
            for entry in entries:
                if deleted >= limit:
                    break
                if self._expired(entry, cutoff):
                    deleted += self._delete(folder, entry.name, history=history)
        return deleted

    @staticmethod
    def _expired(entry: os.DirEntry[str], cutoff: float) -> bool:
        """A record (``x.json``, unless ``x.json.json`` is one: then it is an input) last
        written before ``cutoff``."""
        name = entry.name
        if name.startswith(".") or not name.endswith(".json"):
            return False
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff
                and not os.path.lexists(f"{entry.path}.json"))

    def _delete(self, folder: Path, name: str, *, history: bool) -> bool:
        """Delete a record and the input and results it names; the record goes last, so a
        pass cut short leaves it to name what is left."""
        record = read_json(folder / name)
        if record is None or not isinstance(record.get("job"), str):
            return False  # not a record the daemon wrote: not ours to delete
        if self.spool.notices.exists(record["job"]):
            return False  # its hook is still owed
        stem = name[:-5]
        results = record.get("results")
        sets = results if isinstance(results, dict) else {}
        if history:  # retry renamed them <name>.<stamp>.<set>.csv, beside the record
            files = [f"{stem}.{s}.csv" for s in sets]
        else:
            files = [stem, *(f for f in sets.values() if isinstance(f, str))]
        for file_name in files:
            if "/" not in file_name and file_name not in (".", ".."):
                (folder / file_name).unlink(missing_ok=True)
        (folder / name).unlink(missing_ok=True)
        log.debug("outcome_expired", folder=str(folder.relative_to(self.spool.root)),
                  record=name)
        return True


def _safely(fn: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """``fn``'s count; 0 when the disk refuses now (the next pass tries again)."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        log.warning("housekeeping_failed", error=str(exc), path=exc.filename)
        return 0
