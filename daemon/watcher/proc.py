"""Who has a file open for writing, seen through ``/proc/<pid>/fd`` and ``fdinfo``.

Blocking: run in a thread. Nothing here opens a watched file; following an fd link with
``stat`` opens nothing either.
"""

from __future__ import annotations

import functools
import os

from daemon.watcher.settle import Key

PROC = "/proc"


def proc_writers(targets: frozenset[Key], proc: str = PROC) -> tuple[frozenset[Key], bool]:
    """Which of ``targets`` some other process has open for writing, in one pass over
    ``/proc``; and whether every other process's fds could be read."""
    found: set[Key] = set()
    complete = not _pids_hidden(proc)
    own = str(os.getpid())
    try:
        entries = os.scandir(proc)
    except OSError:
        return frozenset(), False
    with entries:
        for entry in entries:
            if entry.name.isdigit() and entry.name != own:
                complete = _scan_process(entry.path, targets, found) and complete
    return frozenset(found), complete


@functools.lru_cache(maxsize=4)
def _pids_hidden(proc: str) -> bool:
    """Whether ``proc`` is mounted with ``hidepid=invisible`` (systemd's
    ``ProtectProc=invisible``): other users' processes are then not listed at all, and a
    pass that read every fd it was shown would wrongly look complete."""
    options = None
    try:
        with open(f"{proc}/self/mountinfo", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                mount, _, fs = line.partition(" - ")
                fields = mount.split()
                if len(fields) > 4 and fields[4] == proc and fs:
                    options = fs.split()[-1]  # the last mount there is the one we see
    except OSError:
        return True  # cannot tell: assume the worst
    if options is None:
        return False  # not a proc mount point (a test's folder): nothing hides there
    return any(o in ("hidepid=invisible", "hidepid=2") for o in options.split(","))


def _scan_process(pid_dir: str, targets: frozenset[Key], found: set[Key]) -> bool:
    """Add to ``found`` the targets this process holds open for writing; False if its fds
    could not all be read (which makes the caller assume an unseen writer)."""
    try:
        with os.scandir(f"{pid_dir}/fd") as fds:
            for fd in fds:
                key = _fd_key(fd)
                if key in targets and _fd_writable(f"{pid_dir}/fdinfo/{fd.name}"):
                    found.add(key)
    except (FileNotFoundError, ProcessLookupError):
        return True  # exited meanwhile: it holds nothing any more
    except OSError:
        return False  # EACCES and the like: this process is invisible to us
    return True


def _fd_key(fd: os.DirEntry[str]) -> Key | None:
    try:
        st = fd.stat()  # follows the fd link to the open file; opens nothing
    except FileNotFoundError:
        return None  # closed meanwhile
    except PermissionError:
        # The fd list was readable but this one link is not (seen for some container
        # init processes): its target is nothing we can read, so not one of our files.
        return None
    return (st.st_dev, st.st_ino)


def _fd_writable(fdinfo: str) -> bool:
    try:
        with open(fdinfo, encoding="ascii") as info:
            for line in info:
                if line.startswith("flags:"):
                    access = int(line.split()[1], 8) & 0o3  # O_ACCMODE
                    return access in (os.O_WRONLY, os.O_RDWR)
    except FileNotFoundError:
        return False  # closed meanwhile
    return True  # no flags line: assume the worst
