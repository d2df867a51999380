"""Leases: which daemon owns a job, its heartbeat, and taking over the jobs of a daemon
that is surely gone. Any number of daemons may share one spool."""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.spool.layout import Layout
from daemon.spool.record import JOB_FILE, Job, load_record, write_record


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


class Leases:
    """One daemon's leases on a spool. All methods block: call in a thread."""

    def __init__(self, layout: Layout, owner: Owner, *, lease_seconds: float,
                 file_mode: int) -> None:
        self.layout = layout
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.file_mode = file_mode
        #: ``time.monotonic()`` taken just before our last heartbeat was written.
        self.beat_at: float | None = None

    def heartbeat(self) -> None:
        """Tell other daemons on this spool that our jobs are alive."""
        path = self.layout.owners / self.owner.name
        started = time.monotonic()
        try:
            os.utime(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        self.beat_at = started

    def fresh(self) -> bool:
        """Is our own lease fresh by our own monotonic clock? A process frozen (SIGSTOP, a
        paused container) past ``lease_seconds`` sees on waking that it may be replaced."""
        return self.beat_at is not None and \
            time.monotonic() - self.beat_at < self.lease_seconds

    def prune(self) -> None:
        """Forget the heartbeat files of daemons on this host that are gone."""
        for beat in self.layout.owners.iterdir():
            host, _, rest = beat.name.partition(":")
            pid = rest.partition(":")[0]
            if host == self.owner.host and pid.isdigit() and int(pid) != self.owner.pid \
                    and not pid_alive(int(pid)):
                beat.unlink(missing_ok=True)

    def release(self) -> None:
        (self.layout.owners / self.owner.name).unlink(missing_ok=True)

    def orphaned(self, job: Job, job_dir: Path | None = None) -> bool:
        """May we take this job over? Ours, or its owner is surely gone."""
        if job.owner is None or job.owner == self.owner.name:
            return True
        return self.gone(job.owner, job_dir or self.layout.job_dir(job))

    def gone(self, owner: str, folder: Path) -> bool:
        """Is the daemon named ``owner`` surely gone?

        On this host (and pid namespace) its pid says it; elsewhere its heartbeat file,
        which must be older than the lease. A daemon that never heartbeated is judged by
        the age of ``folder`` instead.
        """
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if host == self.owner.host and pid.isdigit() and int(pid) != self.owner.pid:
            return not pid_alive(int(pid))
        # Another host, or our own pid under another token (an earlier life of this
        # process, or a second daemon inside it): its heartbeat decides.
        beat = self.layout.owners / owner
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
                if self.gone(p.name[len(prefix):], job_dir)]
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
        job = load_record(aside)
        if job is None:
            os.rename(aside, job_dir / JOB_FILE)
            return None
        job.owner = self.owner.name
        write_record(self.layout.job_dir(job) / JOB_FILE, job, self.file_mode)
        aside.unlink(missing_ok=True)
        return job

    def owns(self, job: Job) -> bool:
        """Is the record on disk still ours? (Checked before each POST: a daemon paused
        past its lease may have been replaced.)"""
        try:
            current = load_record(self.layout.job_dir(job) / JOB_FILE)
        except OSError:
            return False
        return current is not None and current.owner == self.owner.name


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` (of this pid namespace) alive? Another user's process is."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
