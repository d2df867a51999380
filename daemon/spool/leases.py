"""Leases: which daemon owns a job, its heartbeat, and taking over the jobs of a daemon
that is surely gone. Any number of daemons (and ``submit`` runs) may share one spool.

No two hosts' clocks are ever compared: another host's lease is stale only when its
heartbeat file has not *changed* for ``lease_seconds`` as timed by this process's own
monotonic clock, however far the writer's clock (and so the file's mtime) is off.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon import clocks
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


#: How many watched paths (heartbeats, job folders) are remembered before the gone are forgotten.
_SEEN_LIMIT = 4096


class Leases:
    """One daemon's leases on a spool. All methods block: call in a thread."""

    def __init__(self, layout: Layout, owner: Owner, *, lease_seconds: float,
                 file_mode: int, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.layout = layout
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.file_mode = file_mode
        #: ``time.monotonic()`` taken just before our last heartbeat was written.
        self.beat_at: float | None = None
        self.monotonic = monotonic
        self._beats = 0
        self._last_beat: float | None = None
        # path -> (what it looked like, when we first saw it look like that)
        self._seen: dict[Path, tuple[object, float]] = {}

    def heartbeat(self) -> None:
        """Tell other daemons on this spool that our jobs are alive: the file's content
        (a counter) changes with every beat, whatever any clock says."""
        path = self.layout.owners / self.owner.name
        # Taken before the write: "fresh" errs on the safe side.
        started, booted = time.monotonic(), clocks.boottime()
        self._beats += 1
        try:
            path.write_text(f"{self._beats}\n")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{self._beats}\n")
        self.beat_at = started
        self._last_beat = booted

    def fresh(self, margin: float = 0.0) -> bool:
        """Is our own lease surely still good for ``margin`` more seconds? Nobody can judge
        us gone sooner than ``lease_seconds`` after our last heartbeat; this counts the
        time since it on our monotonic clock and on the boot-time clock, which runs on
        while the host is suspended. A process frozen (SIGSTOP, ``docker pause``) past its
        lease sees on waking that it may be replaced. For fencing a side effect (the end
        of an upload body) that must not happen once replaced."""
        if self.beat_at is None or self._last_beat is None:
            return False
        since = max(time.monotonic() - self.beat_at, clocks.boottime() - self._last_beat)
        return since + margin < self.lease_seconds

    def quiet_for(self, path: Path) -> float | None:
        """For how long (by our monotonic clock) ``path`` has not changed; None if it does
        not exist. The first look counts as a change: we cannot know what came before."""
        try:
            info = path.stat()
            content = path.read_bytes()[:64] if path.is_file() else b""
        except FileNotFoundError:
            self._seen.pop(path, None)
            return None
        looks = (info.st_ino, info.st_size, info.st_mtime_ns, content)
        now = self.monotonic()
        if len(self._seen) >= _SEEN_LIMIT:  # forget what is gone: memory stays bounded
            self._seen = {p: v for p, v in self._seen.items() if p.exists()}
        seen = self._seen.get(path)
        if seen is None or seen[0] != looks:
            self._seen[path] = (looks, now)
            return 0.0
        return now - seen[1]

    def quiet(self, path: Path) -> bool:
        """Has ``path`` stayed unchanged for a whole lease? (False if it is missing.)"""
        quiet = self.quiet_for(path)
        return quiet is not None and quiet > self.lease_seconds

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
        which must have stayed unchanged for a lease. A daemon that never heartbeated is
        judged by ``folder`` staying unchanged instead.
        """
        local = self._local_pid(owner)
        if local is not None:
            return not pid_alive(local)
        # Another host, or our own pid under another token (an earlier life of this
        # process, or a second daemon inside it): its heartbeat decides.
        beat = self.layout.owners / owner
        if beat.exists():
            return self.quiet(beat)
        if self._earlier_life(owner):
            return True  # it released its heartbeat when it stopped, in this very process
        return self.quiet(folder)

    def alive(self, owner: str) -> bool:
        """Is ``owner`` surely still running? Unlike :meth:`gone`, a missing heartbeat
        says no: a holder that judges by heartbeat always beats before it holds anything."""
        local = self._local_pid(owner)
        if local is not None:
            return pid_alive(local)
        if owner == self.owner.name:
            return True
        beat = self.layout.owners / owner
        quiet = self.quiet_for(beat)
        return quiet is not None and quiet <= self.lease_seconds

    def _earlier_life(self, owner: str) -> bool:
        """Our host and pid under another token: an earlier daemon inside this process."""
        host, _, rest = owner.partition(":")
        return host == self.owner.host and rest.partition(":")[0] == str(self.owner.pid) \
            and owner != self.owner.name

    def _local_pid(self, owner: str) -> int | None:
        """The pid of an owner in our host and pid namespace (not us); else None."""
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if host == self.owner.host and pid.isdigit() and int(pid) != self.owner.pid:
            return int(pid)
        return None

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
