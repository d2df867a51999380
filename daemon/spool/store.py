"""The Spool: claim a file out of its inbox, keep the job's record, and move it on to done/
or failed/ (or back to its inbox) without ever losing or clobbering a file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from daemon.spool.fs import (
    NotRegularFileError,
    SymlinkedFolderError,
    check_readable,
    exclusive_write,
    fit_name,
    fsync_dir,
    inspect_file,
    link_no_clobber,
    make_dir_like,
    open_folder,
    own_copy,
    place_no_clobber,
    read_json,
)
from daemon.spool.layout import Layout
from daemon.spool.leases import Leases, Owner
from daemon.spool.markers import Markers
from daemon.spool.notices import Notices, new_notice
from daemon.spool.record import (
    FINISHING,
    JOB_FILE,
    RETURNING,
    Job,
    load_record,
    new_job_id,
    upload_name,
    utcnow,
    write_record,
)

log = structlog.get_logger(__name__)

#: What a job id looks like (``new_job_id``); anything else is never put in a name.
_TAG = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")


class Spool(Layout):
    """Paths and atomic moves under one spool root. All methods block: call in a thread."""

    def __init__(self, root: Path, types: tuple[str, ...], *, owner: Owner | None = None,
                 file_mode: int = 0o640, lease_seconds: float = 60.0,
                 on_change: Callable[[], None] | None = None,
                 hook_notices: bool = False) -> None:
        """``on_change`` is called (in the calling thread) after every change of a job: a
        claim, a saved state, a file finished or put back. With ``hook_notices`` (an
        ``on_finish`` hook is configured), :meth:`finish` leaves a hook notice."""
        super().__init__(root)
        self._on_change = on_change or _nothing
        self.types = types
        self.owner = owner or Owner.current()
        self.file_mode = file_mode
        self.lease_seconds = lease_seconds
        self.leases = Leases(self, self.owner, lease_seconds=lease_seconds,
                             file_mode=file_mode)
        self.marks = Markers(self, file_mode, self.owner.name, self.leases.alive)
        self.notices = Notices(self, file_mode)
        self.hook_notices = hook_notices

    def prepare(self) -> None:
        """Create every folder of the layout (idempotent)."""
        for file_type in self.types:
            for folder in (self.inbox(file_type), self.done(file_type), self.failed(file_type)):
                folder.mkdir(parents=True, exist_ok=True)
        self.owners.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)

    # -- claim ----------------------------------------------------------------------------

    def claim(self, file_type: str, path: Path, method: str,
              job_id: str | None = None) -> Job | None:
        """Take ``path`` out of the inbox into a new job folder, or None if it is gone.

        The job record is written before the rename, so a crash in between leaves a job
        folder without its input, which recovery removes. Renaming is what makes a claim
        exclusive: of several daemons, exactly one rename succeeds. ``job_id`` (from
        :func:`new_job_id`) lets the caller register the job before its folder exists.
        """
        job_id = job_id or new_job_id()
        job = Job(job=job_id, type=file_type, source=path.name,
                  file_name=upload_name(path.name, job_id), method=method,
                  claimed_at=utcnow(), owner=self.owner.name)
        # Both folders opened without following a link (a symlinked inbox or processing/
        # raises SymlinkedFolderError), and the rename made relative to them.
        inbox_fd = open_folder(self.inbox(file_type), below=self.root)
        try:
            # Unreadable (mode 0600 of another user): it waits in its inbox, unclaimed.
            if not check_readable(path.name, inbox_fd, path):
                return None
            processing_fd = open_folder(self.processing, below=self.root)
            try:
                if not self._claim_into(job, path, inbox_fd, processing_fd):
                    return None
            finally:
                os.close(processing_fd)
        finally:
            os.close(inbox_fd)
        fsync_dir(self.job_dir(job))
        fsync_dir(path.parent)
        self._on_change()
        return job

    def _claim_into(self, job: Job, path: Path, inbox_fd: int, processing_fd: int) -> bool:
        """Write the record into a new job folder, then rename the input in; False if the
        input is gone (another daemon won, or the file went)."""
        job_dir = self.job_dir(job)
        os.mkdir(job.job, dir_fd=processing_fd)
        try:
            self.save(job)
        except BaseException:
            # ENOSPC, say: the file never left its inbox; leave no empty job folder behind.
            self._remove_job_dir(job_dir)
            raise
        try:
            os.rename(path.name, f"{job.job}/{job.source}", src_dir_fd=inbox_fd,
                      dst_dir_fd=processing_fd)
        except FileNotFoundError:
            # Another daemon won, or the file went. But on NFS a retransmitted RENAME whose
            # first reply was lost reports ENOENT although it worked: then the input is
            # here, and removing the folder would delete it.
            if not os.path.lexists(self.input_path(job)):
                self._remove_job_dir(job_dir)
                return False
        return True

    def unclaim(self, job: Job) -> None:
        """Put a job's input back into its inbox, when nothing was sent. Idempotent.

        ``returning`` is saved first, so that a crash half-way is finished the same way by
        recovery instead of being resumed as an upload while the inbox copy is claimed
        again. If the inbox name was taken meanwhile, the file goes back under a free one.
        """
        if job.state != RETURNING:
            job.state = RETURNING
            self.save(job)
        source = self.input_path(job)
        inbox = self.inbox(job.type)
        if os.path.lexists(source) and not link_no_clobber(source, inbox / job.source):
            # The name was taken meanwhile: back under a free one, to settle again there
            # (never uploaded from here without settling).
            place_no_clobber(source, inbox, job.source)
        fsync_dir(inbox)
        self._remove_job_dir(self.job_dir(job))
        self.unmark(job)
        self._on_change()

    def inspect(self, job: Job, *, read: bool = True) -> str | None:
        """Fill in sha256, size and line count of the claimed input, in one streamed pass,
        and say what makes it certainly unacceptable to IPQS (None when nothing does).

        With ``read=False`` only its size and mtime are taken: the upload body will be the
        one read of it (see :meth:`daemon.job.conversation.Conversation.send`).
        """
        path = self.input_path(job)
        if path.lstat().st_nlink > 1 and not own_copy(path):
            # Other names of this inode are outside our control: what is sent, billed and
            # kept in done/ must be a copy nobody else can change (verified by its sha256).
            return ("the file has other hard links and kept changing while it was copied: "
                    "drop a finished file")
        before = path.lstat()
        if job.mtime_ns is not None and (before.st_size, before.st_mtime_ns) != (
                job.bytes, job.mtime_ns):
            # Its facts were taken at the claim (a resumed job): the file must still be so.
            return "the file changed after it was claimed"
        job.mtime_ns = before.st_mtime_ns
        if not read:
            if not stat.S_ISREG(before.st_mode):
                raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
            job.bytes = before.st_size
            return "the file is empty" if before.st_size == 0 else None
        facts = inspect_file(path)
        job.sha256, job.bytes, job.rows = facts.sha256, facts.bytes, facts.rows
        return facts.problem

    def changed(self, job: Job) -> bool:
        """Has the input changed (size or mtime) since :meth:`inspect`, or vanished?"""
        try:
            now = self.input_path(job).lstat()
        except FileNotFoundError:
            return True
        return (now.st_size, now.st_mtime_ns) != (job.bytes, job.mtime_ns)

    # -- records --------------------------------------------------------------------------

    def save(self, job: Job) -> None:
        """Write the job's state atomically; on return it survives a crash."""
        write_record(self.job_dir(job) / JOB_FILE, job, self.file_mode)
        self._on_change()

    def load(self, job_dir: Path) -> Job | None:
        """Read a job record; None if there is none or it is not a record.

        Other I/O errors (EIO, ESTALE, EACCES) are raised: a record we cannot read now is
        not a broken job.
        """
        path = job_dir / JOB_FILE
        if not path.exists():
            # A crash in the middle of an adoption leaves the record under its aside name.
            aside = sorted(job_dir.glob(f"{JOB_FILE}.adopt-*"))
            if not aside:
                return None
            path = aside[-1]
        return load_record(path)

    def jobs(self) -> Iterator[Path]:
        """Job folders in processing/, oldest first."""
        with contextlib.suppress(FileNotFoundError):
            yield from sorted(p for p in self.processing.iterdir()
                              if p.is_dir() and not p.name.startswith("."))

    # -- duplicates (see markers.py) and leases (see leases.py) ---------------------------

    def mark(self, job: Job, window_seconds: float, *,
             holder: str = "daemon") -> dict[str, Any] | None:
        return self.marks.mark(job, window_seconds, holder=holder)

    def update_mark(self, job: Job, *, sending: bool = False) -> None:
        """Record the IPQS id in our marker; ``sending``: say first that a POST of
        ``job.file_name`` may reach IPQS from now on (raises OSError if it cannot)."""
        if sending:
            self.marks.sending(job)
        else:
            self.marks.update(job)

    def unmark(self, job: Job) -> None:
        self.marks.unmark(job)

    def heartbeat(self) -> None:
        self.leases.heartbeat()

    def prune_owners(self) -> None:
        self.leases.prune()

    def release(self) -> None:
        self.leases.release()

    def orphaned(self, job: Job, job_dir: Path | None = None) -> bool:
        return self.leases.orphaned(job, job_dir)

    def adopt(self, job_dir: Path) -> Job | None:
        return self.leases.adopt(job_dir)

    def owns(self, job: Job) -> bool:
        return self.leases.owns(job)

    def still_ours(self, job: Job) -> bool:
        """The fence before an upload body completes: our lease is fresh by our own clock
        and the record on disk still names us."""
        return self.leases.fresh() and self.leases.owns(job)

    def write_orphan(self, job: Job, csv_id: int | None, error: str) -> Path:
        """Record an IPQS job we paid for after the job stopped being ours (a second
        payment), under ``orphans/<type>/``; never overwrites. Returns the record's path."""
        folder = self.orphans(job.type)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"id": csv_id, "type": job.type, "source": job.source,
                "file_name": job.file_name, "sha256": job.sha256, "bytes": job.bytes,
                "method": job.method, "job": job.job, "owner": self.owner.name,
                "found_at": utcnow(), "error": error}
        body = json.dumps(data, indent=2).encode() + b"\n"
        for n in range(1000):
            path = folder / f"{job.file_name}.{csv_id}{f'-{n}' if n else ''}.json"
            if exclusive_write(path, body, self.file_mode):
                fsync_dir(folder)
                return path
        raise OSError(errno.EEXIST, f"no free orphan record name in {folder}")
    def lease_fresh(self, margin: float = 0.0) -> bool:
        return self.leases.fresh(margin)

    # -- finish ---------------------------------------------------------------------------

    def finish(self, job: Job) -> Path:
        """Move input, results and record to done/ or failed/ and drop the job folder.

        Idempotent: after a crash half-way it completes the same placement again. Returns the
        path of the written record.
        """
        outcome_dir = self._outcome_folder(job.outcome or "failed", job.type)
        if job.id is not None:
            # Paid for: once the job folder is gone, only the id keeps its marker alive.
            self.update_mark(job)
        while True:
            if job.final_name is None or job.state != FINISHING:
                job.final_name = self._free_name(outcome_dir, job)
                job.state = FINISHING
                self.save(job)
            if self.hook_notices:
                # Before the move: a crash after it still owes the hook (at least once).
                self._owe_hook(job, outcome_dir)
            if self._place(job, outcome_dir):
                break
            job.final_name = None
        self._remove_job_dir(self.job_dir(job))
        self._on_change()
        return outcome_dir / f"{job.final_name}.json"

    def _owe_hook(self, job: Job, folder: Path) -> None:
        record = (folder / f"{job.final_name}.json").relative_to(self.root)
        self.notices.write(new_notice(job.job, job.type, job.outcome or "failed",
                                      str(record), self.owner.name))

    def _outcome_folder(self, outcome: str, file_type: str) -> Path:
        """done/<type> or failed/<type>; re-created as its siblings are if it went missing
        (an operator rotating it away, say)."""
        folder = self.outcome_dir(outcome, file_type)
        if folder.is_symlink() or folder.parent.is_symlink():
            # Never followed, never replaced: the job waits aside until an operator fixes it.
            linked = folder if folder.is_symlink() else folder.parent
            raise SymlinkedFolderError(errno.ELOOP, "a symbolic link, not a folder: refused, "
                                       "never followed", str(linked))
        if not os.path.lexists(folder):
            models = [self.outcome_dir(outcome, t) for t in self.types if t != file_type]
            mode = make_dir_like(folder, models)
            if mode is not None:
                log.warning("folder_recreated", folder=str(folder.relative_to(self.root)),
                            mode=f"{mode:04o}")
        return folder

    def _free_name(self, folder: Path, job: Job) -> str:
        """The input's own name, or on a clash ``stem.<job id>.ext`` (the job id is its
        claim time and token: unique and sortable, so no search among earlier clashes).

        A constant number of looks whatever the folder holds. Only this job can hold its
        own suffixed name (from an attempt cut short); then a random token is added.
        """
        stem, dot, ext = fit_name(job.source).partition(".")
        tag = job.job if _TAG.fullmatch(job.job) else new_job_id()
        for name in (f"{stem}{dot}{ext}", f"{stem}.{tag}{dot}{ext}",
                     *(f"{stem}.{tag}-{secrets.token_hex(2)}{dot}{ext}" for _ in range(8))):
            names = [name, f"{name}.json", *(f"{name}.{s}.csv" for s in job.results)]
            if not any(os.path.lexists(folder / n) for n in names):
                return name
        raise OSError(errno.EEXIST, f"no free name for {job.source} in {folder}")

    def _place(self, job: Job, folder: Path) -> bool:
        """Link input and results under ``final_name``, then write the record.

        False if another writer took one of the names first (then a new name is chosen).
        """
        assert job.final_name is not None
        name = job.final_name
        moves = []
        if self.input_path(job).exists() or os.path.lexists(folder / name):
            moves.append((self.input_path(job), folder / name))
        else:
            job.warning = "the input file vanished from processing/ before it was moved"
        moves += [(self.results_dir(job) / s, folder / f"{name}.{s}.csv") for s in job.results]
        for src, dst in moves:
            if not link_no_clobber(src, dst):
                return False
        public = dict(job.record())
        public["results"] = {s: f"{name}.{s}.csv" for s in job.results}
        data = json.dumps(public, indent=2).encode() + b"\n"
        record = folder / f"{name}.json"
        if not exclusive_write(record, data, self.file_mode):
            existing = read_json(record)
            return existing is not None and existing.get("job") == job.job
        fsync_dir(folder)
        return True

    def discard_dir(self, job_dir: Path) -> None:
        """Remove a job folder that holds no input worth keeping."""
        self._remove_job_dir(job_dir)

    def _remove_job_dir(self, job_dir: Path) -> None:
        for path in sorted(job_dir.rglob("*"), reverse=True):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            job_dir.rmdir()
        fsync_dir(job_dir.parent)


def _nothing() -> None:
    pass
