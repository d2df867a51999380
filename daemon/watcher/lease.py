"""Who has a file open for writing anywhere on this kernel, asked through a read lease.

``fcntl(fd, F_SETLEASE, F_RDLCK)`` fails with EAGAIN while any process holds the file open
for writing: of any user, in any pid or mount namespace on this kernel (another
container, smbd serving a share). Otherwise it succeeds and the lease is dropped with the
very next call. Unlike ``/proc`` it needs no view of the writer, only the right to take a
lease: owning the file, or ``CAP_LEASE`` in the initial user namespace.

Costs and limits, and how they are met here:

* A writer opening the file while the lease is held waits until it is dropped: the
  lease lives between two ``fcntl`` calls, and the kernel sends the holder ``SIGIO``,
  whose default action kills. :func:`sigio_handled` must be true before any probe
  (the service handles SIGIO; see :meth:`daemon.service.Service.install_signal_handlers`).
* Leases are local. NFS and FUSE refuse them (EINVAL) or, worse, grant them without
  seeing the writers on other machines (FUSE), and SMB answers EAGAIN without any
  writer; so network and FUSE file systems are never probed (:data:`daemon.spool.mounts`
  names them).
* Only regular files are opened (the caller's ``lstat`` said so), with ``O_NONBLOCK``
  and ``O_NOFOLLOW`` anyway: a fifo swapped in meanwhile neither hangs nor is followed.

Blocking: run in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from pathlib import Path

from daemon.spool.mounts import fs_type, network_fs
from daemon.watcher.checks import Probe
from daemon.watcher.settle import Key

CAP_LEASE = 28  # linux/capability.h
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def sigio_handled() -> bool:
    """Whether SIGIO is ignored or handled, so a broken lease cannot kill the process."""
    return signal.getsignal(signal.SIGIO) not in (signal.SIG_DFL, None)


def has_cap_lease(status: str = "/proc/self/status") -> bool | None:
    """Whether CAP_LEASE is in this process's effective set; None when unknown."""
    try:
        with open(status, encoding="ascii") as lines:
            for line in lines:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_LEASE & 1)
    except (OSError, ValueError):
        return None
    return None


def refusal() -> str | None:
    """Why no lease may be probed for at all in this process; None when they may."""
    if not sigio_handled():
        return "SIGIO is neither handled nor ignored: a broken lease would kill the process"
    if has_cap_lease() is False:
        return "no CAP_LEASE: leases on other users' files are refused"
    return None


class LeaseProbe:
    """Probes files for writers; remembers per file system whether leases can be trusted
    there (a local one: yes; network, FUSE or unknown: no)."""

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self._mountinfo = mountinfo
        self._local: dict[int, str | None] = {}  # st_dev -> None (local) or why not

    def untrusted(self, path: Path, dev: int) -> str | None:
        """Why leases on ``dev`` (holding ``path``) must not be trusted; None if they may."""
        if dev not in self._local:
            self._local[dev] = self._judge_fs(path.parent)
        return self._local[dev]

    def _judge_fs(self, folder: Path) -> str | None:
        try:
            kind = fs_type(folder, self._mountinfo)
            network = network_fs(folder, self._mountinfo)
        except OSError as exc:
            return f"file system unknown: {exc.strerror}"
        if kind is None:
            return "file system unknown"
        if network is not None:
            return f"{network}: leases there do not see writers on other machines"
        return None

    def probe(self, path: Path, key: Key) -> Probe:
        """Whether anyone has ``path`` (lstat said: the regular file ``key``) open for
        writing."""
        if self.untrusted(path, key[0]) is not None:
            return Probe.UNSUPPORTED
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return Probe.CHANGED
        except OSError as exc:
            return _open_failed(exc)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != key or not stat.S_ISREG(st.st_mode):
                return Probe.CHANGED
            return _lease_once(fd)
        finally:
            os.close(fd)


def _open_failed(exc: OSError) -> Probe:
    if exc.errno == errno.ELOOP:  # a symlink swapped in since the lstat
        return Probe.CHANGED
    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        return Probe.WRITER  # someone holds a write lease on it: they are writing
    return Probe.BLIND


def _lease_once(fd: int) -> Probe:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return Probe.WRITER
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Probe.DENIED
        return Probe.UNSUPPORTED  # EINVAL, ENOLCK, EOPNOTSUPP...: leases do not work here
    # Dropped by the very next call: a writer's open() waits at most this long.
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return Probe.FREE
