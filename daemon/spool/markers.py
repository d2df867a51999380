"""Duplicate markers: ``markers/<sha256>``, made by exclusive create, so that of two files
with the same content inside the window only the first is paid for, across daemons."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import structlog

from daemon.spool.fs import atomic_write, exclusive_write, link_no_clobber, read_json
from daemon.spool.layout import Layout
from daemon.spool.record import Job

log = structlog.get_logger(__name__)


class Markers:
    """The duplicate markers of one spool. All methods block: call in a thread."""

    def __init__(self, layout: Layout, file_mode: int) -> None:
        self.layout = layout
        self.file_mode = file_mode

    def mark(self, job: Job, window_seconds: float) -> dict[str, Any] | None:
        """Claim ``job.sha256`` for this job. Returns the earlier job's marker if the same
        content was taken within the window, else None (and the marker is ours)."""
        if window_seconds <= 0 or job.sha256 is None:
            return None
        path = self.layout.marker(job.sha256)
        mine = {"job": job.job, "source": job.source, "type": job.type, "id": job.id,
                "created": time.time()}
        for _ in range(3):
            if exclusive_write(path, json.dumps(mine).encode(), self.file_mode):
                return None
            other = read_json(path)
            if other is not None and other.get("job") == job.job:
                return None
            if other is not None and not self.stale(other, window_seconds):
                return other
            # Stale: move it aside under a unique name, then race for a fresh exclusive create.
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, path.with_name(f".{path.name}.{secrets.token_hex(4)}.old"))
            for old in self.layout.markers.glob(f".{path.name}.*.old"):
                old.unlink(missing_ok=True)
        return None

    def stale(self, mark: dict[str, Any], window_seconds: float) -> bool:
        """Older than the window; or never paid for (no IPQS id) and its job is gone."""
        try:
            created = float(mark.get("created", 0))
        except (TypeError, ValueError):
            return True
        if time.time() - created >= window_seconds:
            return True
        job = mark.get("job")
        return (mark.get("id") is None and isinstance(job, str)
                and not (self.layout.processing / job).exists())

    def prune(self, window_seconds: float, limit: int) -> int:
        """Remove markers that :meth:`stale` says are over (older than the window, or never
        paid for and their job gone), and leftovers of writers and of :meth:`mark`; at most
        ``limit``. Returns how many markers were removed."""
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.layout.markers) as it:
            for entry in it:
                if removed >= limit:
                    break
                path = Path(entry.path)
                if entry.name.startswith("."):  # an aside copy or a dead writer's temp file
                    with contextlib.suppress(OSError):
                        if time.time() - path.lstat().st_mtime >= window_seconds:
                            path.unlink()
                    continue
                removed += self._prune_one(path, window_seconds)
        return removed

    def _prune_one(self, path: Path, window_seconds: float) -> bool:
        try:
            before = path.lstat()
        except FileNotFoundError:
            return False
        mark = read_json(path)
        if mark is None:  # unreadable: only its age can say
            mark = {"created": before.st_mtime}
        if not self.stale(mark, window_seconds):
            return False
        # Aside first, then make sure it is the marker we judged: another daemon may have
        # replaced it with a fresh one meanwhile, which must stay.
        aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.prune")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        fresh = aside.lstat().st_ino != before.st_ino
        if fresh:
            link_no_clobber(aside, path)
        aside.unlink(missing_ok=True)
        return not fresh

    def update(self, job: Job) -> None:
        """Record the IPQS id in our duplicate marker (best effort)."""
        if job.sha256 is None:
            return
        path = self.layout.marker(job.sha256)
        data = read_json(path)
        if data is not None and data.get("job") == job.job:
            data["id"] = job.id
            try:
                atomic_write(path, json.dumps(data).encode(), self.file_mode)
            except OSError as exc:  # best effort: finish() and recovery write it again
                log.warning("marker_update_failed", error=str(exc))

    def unmark(self, job: Job) -> None:
        """Drop our marker: the content was never paid for, so a re-drop may go through."""
        if job.sha256 is None:
            return
        path = self.layout.marker(job.sha256)
        data = read_json(path)
        if data is not None and data.get("job") == job.job:
            path.unlink(missing_ok=True)
