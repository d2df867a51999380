"""Duplicate markers: ``markers/<sha256>``, made by exclusive create, so that of two files
with the same content inside the window only the first is paid for, across daemons and
``submit`` runs.

A marker says who holds it (``owner``, and ``holder``: ``daemon`` or ``submit``). A daemon's
job lives in ``processing/<job>/``, so its marker lasts as long as that folder does, or for
the window once paid for. A ``submit`` has no such folder: its marker lasts while the
submit is alive (its lease), and once it is gone, a marker whose upload may have reached
IPQS (``sending``) is *unresolved*: whoever meets it next must look it up at IPQS by its
``file_name`` (:mod:`daemon.job.duplicates`) before the content is sent again.

Ages are judged with :func:`daemon.clocks.age`: by the boot-time clock within one boot, so
a wall clock that is stepped (fixed after being days off) neither ends nor stretches the
window.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from daemon import clocks
from daemon.spool.fs import atomic_write, exclusive_write, link_no_clobber, read_json
from daemon.spool.layout import Layout
from daemon.spool.record import Job

log = structlog.get_logger(__name__)

DAEMON = "daemon"
SUBMIT = "submit"


class MarkerContendedError(OSError):
    """A duplicate marker could not be taken, nor found held: others kept replacing it."""


class Markers:
    """The duplicate markers of one spool. All methods block: call in a thread.

    ``alive(owner)`` says whether a marker's holder is surely still running (the leases').
    """

    def __init__(self, layout: Layout, file_mode: int, owner: str = "",
                 alive: Callable[[str], bool] = lambda owner: False) -> None:
        self.layout = layout
        self.file_mode = file_mode
        self.owner = owner
        self.alive = alive

    def mark(self, job: Job, window_seconds: float, *,
             holder: str = DAEMON) -> dict[str, Any] | None:
        """Claim ``job.sha256`` for this job. Returns the earlier job's marker if the same
        content was taken within the window (or its fate is still open: see
        :meth:`unresolved`), else None (and the marker is ours). Raises
        :class:`MarkerContendedError` when neither can be said."""
        if window_seconds <= 0 or job.sha256 is None:
            return None
        path = self.layout.marker(job.sha256)
        mine = {"job": job.job, "source": job.source, "type": job.type, "id": job.id,
                "sha256": job.sha256, "file_name": job.file_name, "method": job.method,
                "holder": holder, "owner": self.owner, "sending": False, **clocks.stamp()}
        for _ in range(3):
            if exclusive_write(path, json.dumps(mine).encode(), self.file_mode):
                return None
            other = read_json(path)
            if other is not None and other.get("job") == job.job:
                return None
            if other is not None and not self.stale(other, window_seconds, path):
                return other
            aside = self._move_aside(path, sweep=False)
            if aside is not None:
                moved = read_json(aside)
                if moved is not None and moved != other:
                    # Not the marker judged stale: another daemon replaced it meanwhile
                    # with its own, fresh one, which must stay (and wins).
                    if link_no_clobber(aside, path):
                        aside.unlink(missing_ok=True)
                    return moved
                aside.unlink(missing_ok=True)
        # Replaced under us on every try: not ours, and not known to be anyone's. The job
        # waits (it stays where it is) rather than going without a marker.
        raise MarkerContendedError(errno.EAGAIN, "the duplicate marker kept changing while "
                                   "it was taken; the file waits and is tried again", str(path))

    def stale(self, mark: dict[str, Any], window_seconds: float,
              path: Path | None = None) -> bool:
        """Older than the window; or never paid for (no IPQS id), and its holder is done
        with it without having sent anything that IPQS may have."""
        if self.age(mark, path) >= window_seconds:
            return True
        if mark.get("id") is not None or mark.get("sending"):
            # Paid, or a POST may have gone out: only the window ends it (its job may be in
            # failed/, and its upload may still show up at IPQS).
            return False
        job = mark.get("job")
        if mark.get("holder") == SUBMIT:
            owner = mark.get("owner")
            return not (isinstance(owner, str) and self.alive(owner))
        if not isinstance(job, str):
            return False
        owner = mark.get("owner")
        if isinstance(owner, str) and owner and owner != self.owner and self.alive(owner):
            # Another daemon that lives: its job may be only just made, and through a second
            # network mount (SSHFS caches) a fresh job folder may not show yet. Our own job
            # folders we see as they are.
            return False
        return not (self.layout.processing / job).exists()

    def unresolved(self, mark: dict[str, Any]) -> bool:
        """A submit's marker whose holder is gone while its upload may have reached IPQS:
        only a lookup by its ``file_name`` can say whether the content was paid for."""
        owner = mark.get("owner")
        return (mark.get("holder") == SUBMIT and mark.get("id") is None
                and bool(mark.get("sending")) and isinstance(mark.get("file_name"), str)
                and not (isinstance(owner, str) and self.alive(owner)))

    def age(self, mark: dict[str, Any], path: Path | None = None) -> float:
        """How old the marker is, by the clock that can tell (see :func:`clocks.age`)."""
        mtime = None
        if path is not None:
            with contextlib.suppress(OSError):
                mtime = path.stat().st_mtime
        return clocks.age(mark, mtime=mtime)

    def sending(self, job: Job) -> None:
        """Our upload of ``job`` may go out now: say so in the marker *before* the POST,
        with what a lookup needs (``floor_id``, ``uploads``). Raises OSError: an upload
        that is not recorded must not be made."""
        self._rewrite(job, sending=True, floor_id=job.floor_id, uploads=job.uploads,
                      file_name=job.file_name)

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
        if not self.stale(mark, window_seconds, path):
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
        try:
            self._rewrite(job, id=job.id)
        except OSError as exc:  # best effort: finish() and recovery write it again
            log.warning("marker_update_failed", error=str(exc))

    def _rewrite(self, job: Job, **fields: Any) -> None:
        if job.sha256 is None:
            return
        path = self.layout.marker(job.sha256)
        data = read_json(path)
        if data is not None and data.get("job") == job.job:
            data.update(fields)
            atomic_write(path, json.dumps(data).encode(), self.file_mode)

    def settle(self, mark: dict[str, Any], ipqs_id: int | None) -> dict[str, Any]:
        """An unresolved marker was found at IPQS as ``ipqs_id``: record it (it is now an
        ordinary paid marker). Returns the marker as it now stands."""
        settled = {**mark, "id": ipqs_id, "sending": False}
        sha = self._sha_of(mark)
        if sha is None:
            return settled
        path = self.layout.marker(sha)
        data = read_json(path)
        if data is not None and data.get("job") == mark.get("job"):
            try:
                atomic_write(path, json.dumps(settled).encode(), self.file_mode)
            except OSError as exc:  # the lookup is repeated by the next one to meet it
                log.warning("marker_update_failed", error=str(exc))
        return settled

    def retire(self, mark: dict[str, Any]) -> None:
        """Drop a marker found surely absent at IPQS, but only that very marker: another
        process may have replaced it while we looked it up."""
        sha = self._sha_of(mark)
        if sha is None:
            return
        path = self.layout.marker(sha)
        aside = self._move_aside(path, sweep=False)
        if aside is None:
            return
        moved = read_json(aside)
        if moved is not None and moved.get("job") != mark.get("job"):
            # Someone else's marker: put it back, unless a third one took the name.
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        aside.unlink(missing_ok=True)

    def _sha_of(self, mark: dict[str, Any]) -> str | None:
        sha = mark.get("sha256")
        return sha if isinstance(sha, str) and sha.isalnum() else None

    def _move_aside(self, path: Path, *, sweep: bool = True) -> Path | None:
        """Rename the marker aside under a unique name (then race for a fresh exclusive
        create); with ``sweep``, the stale markers moved aside before go too."""
        aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        if sweep:
            for old in self.layout.markers.glob(f".{path.name}.*.old"):
                old.unlink(missing_ok=True)
            return None
        return aside

    def unmark(self, job: Job) -> None:
        """Drop our marker: the content was never paid for, so a re-drop may go through."""
        if job.sha256 is None:
            return
        path = self.layout.marker(job.sha256)
        data = read_json(path)
        if data is not None and data.get("job") == job.job:
            path.unlink(missing_ok=True)
