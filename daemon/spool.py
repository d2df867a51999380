"""The folder protocol: where a file is, and moving it on without ever losing or clobbering it.

Layout under the spool root::

    inbox/<type>/<name>              drop zone
    processing/<job>/job.json        the job's state, always written before the step it guards
    processing/<job>/<name>          the input, renamed in at claim time
    processing/<job>/results/<set>   downloaded result sets
    processing/.owners/<owner>       one heartbeat file per running daemon (leases)
    markers/<sha256>                 duplicate markers, made by exclusive create
    done/<type>/<name>, <name>.json, <name>.<set>.csv
    failed/<type>/<name>, <name>.json

Every write is atomic (temporary file, fsync, rename or link, fsync of the folder), and a
finished file is placed with ``link()``, which refuses to replace an existing name, so
nothing in done/ or failed/ is ever overwritten, even by another daemon on the same spool.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import structlog

log = structlog.get_logger(__name__)

JOB_FILE = "job.json"
RESULTS_DIR = "results"
OWNERS_DIR = ".owners"
_HASH_CHUNK = 1024 * 1024
_BOM = codecs.BOM_UTF8

# Job states, in order. Each is saved before the side effect that follows it.
CLAIMED = "claimed"          # input renamed into processing/; nothing sent yet
UPLOADING = "uploading"      # an upload may be under way: never resend without a lookup
SUBMITTED = "submitted"      # IPQS accepted it: ``id`` is known
FETCHED = "fetched"          # results are in processing/<job>/results/
FINISHING = "finishing"      # being moved to done/ or failed/ under ``final_name``
RETURNING = "returning"      # going back to its inbox (nothing was sent): never upload it

# Fields of the public record (design.md), in the order they are written.
RECORD_FIELDS = ("id", "type", "source", "file_name", "sha256", "bytes", "method", "status",
                 "invalid_records", "results", "submitted_at", "finished_at")


def utcnow() -> str:
    """Now as ISO 8601 UTC, second precision."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Job:
    """A file's journey through the daemon; persisted as processing/<job>/job.json."""

    job: str
    type: str
    source: str
    file_name: str
    method: str
    state: str = CLAIMED
    sha256: str | None = None
    bytes: int | None = None
    rows: int | None = None
    mtime_ns: int | None = None
    id: int | None = None
    status: str | None = None
    invalid_records: int | None = None
    results: dict[str, str] = field(default_factory=dict)
    claimed_at: str | None = None
    upload_started_at: str | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    floor_id: int | None = None
    uploads: int = 0
    outcome: str | None = None
    reason: str | None = None
    error: str | None = None
    final_name: str | None = None
    owner: str | None = None
    warning: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def record(self) -> dict[str, Any]:
        """The public record: contract fields, plus reason/error in failed/."""
        out: dict[str, Any] = {name: getattr(self, name) for name in RECORD_FIELDS}
        if out["id"] is None:
            del out["id"]
        out["job"] = self.job
        if self.warning:
            out["warning"] = self.warning
        if self.outcome == "failed":
            out["reason"] = self.reason
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Owner:
    """Who runs a job: host, pid and a random token (a pid can be reused)."""

    host: str
    pid: int
    token: str

    @classmethod
    def current(cls) -> Owner:
        return cls(_host_identity(), os.getpid(), secrets.token_hex(4))

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


def _host_identity() -> str:
    """The host name plus the pid namespace: two containers may share a host name, and a
    pid means something only inside its own namespace."""
    host = socket.gethostname().replace(":", "_")
    try:
        return f"{host}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def new_job_id() -> str:
    """A job id that sorts by time: ``YYYYmmddTHHMMSS-<8 hex>``."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


class Spool:
    """Paths and atomic moves under one spool root. All methods block: call in a thread."""

    def __init__(self, root: Path, types: tuple[str, ...], *, owner: Owner | None = None,
                 file_mode: int = 0o640, lease_seconds: float = 60.0) -> None:
        self.root = root
        self.types = types
        self.owner = owner or Owner.current()
        self.file_mode = file_mode
        self.lease_seconds = lease_seconds
        self.processing = root / "processing"
        self.markers = root / "markers"

    # -- layout ---------------------------------------------------------------------------

    def inbox(self, file_type: str) -> Path:
        return self.root / "inbox" / file_type

    def prepare(self) -> None:
        """Create every folder of the layout (idempotent)."""
        for file_type in self.types:
            for top in ("inbox", "done", "failed"):
                (self.root / top / file_type).mkdir(parents=True, exist_ok=True)
        (self.processing / OWNERS_DIR).mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job: Job) -> Path:
        return self.processing / job.job

    def input_path(self, job: Job) -> Path:
        return self.job_dir(job) / job.source

    def results_dir(self, job: Job) -> Path:
        return self.job_dir(job) / RESULTS_DIR

    # -- claim ----------------------------------------------------------------------------

    def claim(self, file_type: str, path: Path, method: str,
              job_id: str | None = None) -> Job | None:
        """Take ``path`` out of the inbox into a new job folder, or None if it is gone.

        The job record is written before the rename, so a crash in between leaves a job
        folder without its input, which :meth:`recover` removes. Renaming is what makes a
        claim exclusive: of several daemons, exactly one rename succeeds. ``job_id`` (from
        :func:`new_job_id`) lets the caller register the job before its folder exists.
        """
        job_id = job_id or new_job_id()
        job = Job(job=job_id, type=file_type, source=path.name,
                  file_name=upload_name(path.name, job_id), method=method,
                  claimed_at=utcnow(), owner=self.owner.name)
        job_dir = self.job_dir(job)
        job_dir.mkdir(parents=True)
        self.save(job)
        try:
            os.rename(path, self.input_path(job))
        except FileNotFoundError:
            # Another daemon won, or the file went. But on NFS a retransmitted RENAME whose
            # first reply was lost reports ENOENT although it worked: then the input is
            # here, and removing the folder would delete it.
            if not os.path.lexists(self.input_path(job)):
                self._remove_job_dir(job_dir)
                return None
        _fsync_dir(job_dir)
        _fsync_dir(path.parent)
        return job

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
        if os.path.lexists(source) and not _link_no_clobber(source, inbox / job.source):
            # The name was taken meanwhile: back under a free one, to settle again there
            # (never uploaded from here without settling).
            place_no_clobber(source, inbox, job.source)
        _fsync_dir(inbox)
        self._remove_job_dir(self.job_dir(job))
        self.unmark(job)

    def inspect(self, job: Job) -> str | None:
        """Fill in sha256, size and line count of the claimed input, in one streamed pass,
        and say what makes it certainly unacceptable to IPQS (None when nothing does)."""
        path = self.input_path(job)
        before = path.lstat()
        facts = inspect_file(path)
        job.sha256, job.bytes, job.rows = facts.sha256, facts.bytes, facts.rows
        job.mtime_ns = before.st_mtime_ns
        if facts.problem is None and before.st_nlink > 1 and not hardlinks_protected():
            # Without fs.protected_hardlinks anyone could link in a file they may not
            # read; with it, a hard link only shares what its maker could read anyway.
            return ("the file has other hard links and fs.protected_hardlinks is off: "
                    "copy it into the inbox instead of linking it")
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
        # ASCII JSON: names that are not valid UTF-8 survive as \udcXX escapes.
        data = json.dumps(dataclasses.asdict(job), indent=2).encode()
        _atomic_write(self.job_dir(job) / JOB_FILE, data, self.file_mode)

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
        return _load_record(path)

    def jobs(self) -> Iterator[Path]:
        """Job folders in processing/, oldest first."""
        with contextlib.suppress(FileNotFoundError):
            yield from sorted(p for p in self.processing.iterdir()
                              if p.is_dir() and not p.name.startswith("."))

    # -- duplicates -----------------------------------------------------------------------

    def mark(self, job: Job, window_seconds: float) -> dict[str, Any] | None:
        """Claim ``job.sha256`` for this job. Returns the earlier job's marker if the same
        content was taken within the window, else None (and the marker is ours)."""
        if window_seconds <= 0 or job.sha256 is None:
            return None
        path = self.markers / job.sha256
        mine = {"job": job.job, "source": job.source, "type": job.type, "id": job.id,
                "created": time.time()}
        for _ in range(3):
            if _exclusive_write(path, json.dumps(mine).encode(), self.file_mode):
                return None
            other = _read_json(path)
            if other is not None and other.get("job") == job.job:
                return None
            if other is not None and not self._stale_mark(other, window_seconds):
                return other
            # Stale: move it aside under a unique name, then race for a fresh exclusive create.
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, path.with_name(f".{path.name}.{secrets.token_hex(4)}.old"))
            for old in self.markers.glob(f".{path.name}.*.old"):
                old.unlink(missing_ok=True)
        return None

    def _stale_mark(self, mark: dict[str, Any], window_seconds: float) -> bool:
        """Older than the window; or never paid for (no IPQS id) and its job is gone."""
        try:
            created = float(mark.get("created", 0))
        except (TypeError, ValueError):
            return True
        if time.time() - created >= window_seconds:
            return True
        job = mark.get("job")
        return (mark.get("id") is None and isinstance(job, str)
                and not (self.processing / job).exists())

    def update_mark(self, job: Job) -> None:
        """Record the IPQS id in our duplicate marker (best effort)."""
        if job.sha256 is None:
            return
        path = self.markers / job.sha256
        data = _read_json(path)
        if data is not None and data.get("job") == job.job:
            data["id"] = job.id
            try:
                _atomic_write(path, json.dumps(data).encode(), self.file_mode)
            except OSError as exc:  # best effort: finish() and recovery write it again
                log.warning("marker_update_failed", error=str(exc))

    def unmark(self, job: Job) -> None:
        """Drop our marker: the content was never paid for, so a re-drop may go through."""
        if job.sha256 is None:
            return
        path = self.markers / job.sha256
        data = _read_json(path)
        if data is not None and data.get("job") == job.job:
            path.unlink(missing_ok=True)

    # -- leases ---------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Tell other daemons on this spool that our jobs are alive."""
        path = self.processing / OWNERS_DIR / self.owner.name
        try:
            os.utime(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def prune_owners(self) -> None:
        """Forget the heartbeat files of daemons on this host that are gone."""
        for beat in (self.processing / OWNERS_DIR).iterdir():
            host, _, rest = beat.name.partition(":")
            pid = rest.partition(":")[0]
            if host == self.owner.host and pid.isdigit() and int(pid) != self.owner.pid \
                    and not _pid_alive(int(pid)):
                beat.unlink(missing_ok=True)

    def release(self) -> None:
        (self.processing / OWNERS_DIR / self.owner.name).unlink(missing_ok=True)

    def orphaned(self, job: Job, job_dir: Path | None = None) -> bool:
        """May we take this job over? Ours, or its owner is surely gone."""
        if job.owner is None or job.owner == self.owner.name:
            return True
        return self._gone(job.owner, job_dir or self.job_dir(job))

    def _gone(self, owner: str, folder: Path) -> bool:
        """Is the daemon named ``owner`` surely gone?

        On this host (and pid namespace) its pid says it; elsewhere its heartbeat file,
        which must be older than the lease. A daemon that never heartbeated is judged by
        the age of ``folder`` instead.
        """
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if host == self.owner.host and pid.isdigit() and int(pid) != self.owner.pid:
            return not _pid_alive(int(pid))
        # Another host, or our own pid under another token (an earlier life of this
        # process, or a second daemon inside it): its heartbeat decides.
        beat = self.processing / OWNERS_DIR / owner
        try:
            return time.time() - beat.stat().st_mtime > self.lease_seconds
        except FileNotFoundError:
            try:
                return time.time() - folder.stat().st_mtime > self.lease_seconds
            except FileNotFoundError:
                return False

    def adopt(self, job_dir: Path) -> Job | None:
        """Take a job over; None if another daemon took it first.

        Moving the record aside is the compare-and-swap: of several daemons, exactly one
        rename succeeds. The winner then writes the record back as its own. A record left
        aside by an adopter that died half-way is taken the same way, once that adopter is
        surely gone.
        """
        prefix = f"{JOB_FILE}.adopt-"
        aside = job_dir / f"{prefix}{self.owner.name}"
        candidates = [job_dir / JOB_FILE]
        dead = [p for p in sorted(job_dir.glob(prefix + "*"))
                if self._gone(p.name[len(prefix):], job_dir)]
        if (job_dir / JOB_FILE).exists():
            for stale in dead:  # left by an adopter that died after writing the record back
                stale.unlink(missing_ok=True)
        else:
            candidates += dead
        for source in candidates:
            try:
                os.rename(source, aside)
                break
            except FileNotFoundError:
                continue
        else:
            return None
        job = _load_record(aside)
        if job is None:
            os.rename(aside, job_dir / JOB_FILE)
            return None
        job.owner = self.owner.name
        self.save(job)
        aside.unlink(missing_ok=True)
        return job

    def owns(self, job: Job) -> bool:
        """Is the record on disk still ours? (Checked before each POST: a daemon paused
        past its lease may have been replaced.)"""
        try:
            current = _load_record(self.job_dir(job) / JOB_FILE)
        except OSError:
            return False
        return current is not None and current.owner == self.owner.name

    # -- finish ---------------------------------------------------------------------------

    def finish(self, job: Job) -> Path:
        """Move input, results and record to done/ or failed/ and drop the job folder.

        Idempotent: after a crash half-way it completes the same placement again. Returns the
        path of the written record.
        """
        outcome_dir = self.root / (job.outcome or "failed") / job.type
        outcome_dir.mkdir(parents=True, exist_ok=True)
        if job.id is not None:
            # Paid for: once the job folder is gone, only the id keeps its marker alive.
            self.update_mark(job)
        while True:
            if job.final_name is None or job.state != FINISHING:
                job.final_name = self._free_name(outcome_dir, job)
                job.state = FINISHING
                self.save(job)
            if self._place(job, outcome_dir):
                break
            job.final_name = None
        self._remove_job_dir(self.job_dir(job))
        return outcome_dir / f"{job.final_name}.json"

    def _free_name(self, folder: Path, job: Job) -> str:
        stem, dot, ext = _fit_name(job.source).partition(".")
        for n in range(0, 100000):
            name = f"{stem}{dot}{ext}" if n == 0 else f"{stem}-{n}{dot}{ext}"
            names = [name, f"{name}.json", *(f"{name}.{s}.csv" for s in job.results)]
            if not any(os.path.lexists(folder / n2) for n2 in names):
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
            if not _link_no_clobber(src, dst):
                return False
        public = dict(job.record())
        public["results"] = {s: f"{name}.{s}.csv" for s in job.results}
        data = json.dumps(public, indent=2).encode() + b"\n"
        record = folder / f"{name}.json"
        if not _exclusive_write(record, data, self.file_mode):
            existing = _read_json(record)
            return existing is not None and existing.get("job") == job.job
        _fsync_dir(folder)
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
        _fsync_dir(job_dir.parent)


@dataclass(frozen=True)
class FileFacts:
    """What one streamed pass over a file tells: its digest, size, rows, and a problem."""

    sha256: str
    bytes: int
    rows: int
    problem: str | None


def inspect_file(path: Path) -> FileFacts:
    """sha256, size and line count of ``path`` in one streamed pass, and what makes it
    certainly unacceptable to IPQS as CSV (``problem`` is None when nothing does)."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = lines = 0
    last = b"\n"
    problem: str | None = None
    text_seen = False
    with open_regular(path) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
            if problem is None:
                problem = _check_text(chunk, decoder)
            text_seen = text_seen or bool(chunk.replace(_BOM, b"").strip())
    if problem is None and size > 0:
        problem = _check_text(b"", decoder, final=True)
    if problem is None and not text_seen:
        problem = "the file is empty" if size == 0 else "the file holds no rows"
    return FileFacts(digest.hexdigest(), size, lines + (last != b"\n"), problem)


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file, never through a symlink.

    ``O_NOFOLLOW`` refuses a symlink swapped in at the last moment; ``O_NONBLOCK`` keeps a
    fifo from hanging the open, and the ``fstat`` then turns it (or a device) away.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class NotRegularFileError(OSError):
    """A path that should be a plain file is a fifo, socket, device or folder."""


def hardlinks_protected() -> bool:
    """Does the kernel stop users from hard-linking files they may not read?"""
    try:
        return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    except OSError:
        return False


def place_no_clobber(src: Path, folder: Path, name: str, *, tries: int = 10000) -> Path:
    """Move ``src`` into ``folder`` as ``name``, or ``stem-1.ext``, ``stem-2.ext``... (the
    suffix goes before the first dot, as in done/), whichever is free. Never replaces a
    file: placement is by ``link()``, so it holds against other writers too. Returns the
    new path."""
    if not os.path.lexists(src):
        raise FileNotFoundError(errno.ENOENT, "no such file", str(src))
    stem, dot, ext = name.partition(".")
    for n in range(tries):
        dst = folder / (name if n == 0 else f"{stem}-{n}{dot}{ext}")
        if not os.path.lexists(dst) and _link_no_clobber(src, dst):
            _fsync_dir(folder)
            return dst
    raise OSError(errno.EEXIST, f"no free name for {name} in {folder}")


def _check_text(chunk: bytes, decoder: codecs.IncrementalDecoder, *,
                final: bool = False) -> str | None:
    if b"\0" in chunk:
        return "the file is binary (it contains NUL bytes), not CSV text"
    try:
        decoder.decode(chunk, final=final)
    except UnicodeDecodeError:
        return "the file is not UTF-8 text"
    return None


# Room for what a placed name gets: "-99999" and the longest suffix, ".pristine.csv".
_NAME_MAX = 255 - len("-99999") - len(".pristine.csv")


def _fit_name(name: str) -> str:
    """``name`` shortened (in bytes, keeping the end of its extensions) so that every file
    placed beside it still has a legal name."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_MAX:
        return name
    stem, dot, ext = raw.partition(b".")
    tail = (dot + ext)[-(_NAME_MAX // 2):] if dot else b""
    return os.fsdecode(stem[: _NAME_MAX - len(tail)] or b"file") + os.fsdecode(tail)


def upload_name(source: str, job_id: str) -> str:
    """A unique, readable ``file_name`` for IPQS: the sanitised stem plus the job's token."""
    stem = source.rsplit(".", 1)[0] if "." in source.lstrip(".") else source
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in stem)
    return f"{safe.strip('._')[:80] or 'file'}-{job_id.rsplit('-', 1)[-1]}"


def _link_no_clobber(src: Path, dst: Path) -> bool:
    """Give ``src`` the name ``dst`` unless that name exists; True if ``dst`` is ``src``.

    ``link()`` fails instead of replacing, which is what makes "never overwrite" hold
    between daemons. Filesystems without hard links fall back to a checked rename.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        return _same_file(src, dst)
    except FileNotFoundError:
        # Placed by an earlier, interrupted attempt: the source is already gone.
        return dst.exists()
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
        return True
    src.unlink()
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return not a.exists() and b.exists()


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _exclusive_write(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` unless it exists. All or nothing: written to a temporary
    file first, then linked into place, so nobody ever reads a half-written file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(tmp, data, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            # No hard links here: O_EXCL create still gives exclusivity, minus atomicity.
            return _exclusive_create(path, data, mode)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _exclusive_create(path: Path, data: bytes, mode: int) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (SMB, some FUSE) refuse fsync on folders
    finally:
        os.close(fd)


def _load_record(path: Path) -> Job | None:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return Job.from_json(data) if isinstance(data, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
