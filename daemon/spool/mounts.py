"""What the spool sits on, and files dropped where no inbox is.

- :func:`foreign_inboxes`: inboxes on another file system than ``processing/``. A claim is a
  rename, which cannot cross file systems (EXDEV), so the daemon refuses to start on them.
- :func:`network_fs`: the file-system type when the spool is on NFS, SMB/CIFS or FUSE,
  where inotify misses writes made elsewhere and /proc cannot see remote writers.
- :func:`misplaced`: regular files directly in ``inbox/`` or in a folder of ``inbox/`` that
  is no configured type (``inbox/emails/x.csv``): never taken, so they must be reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from daemon.config import ConfigError, WatchConfig
from daemon.spool.layout import Layout, is_ignored

log = structlog.get_logger(__name__)

#: File-system types (``/proc/self/mountinfo``) of network and FUSE file systems.
_NETWORK = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs",
                      "fuse", "fuseblk"})


def foreign_inboxes(layout: Layout, types: tuple[str, ...]) -> list[Path]:
    """The inboxes on another file system (device) than ``processing/``. A symlinked inbox
    is not looked through: the watcher refuses it, and the other inboxes work on."""
    device = os.stat(layout.processing).st_dev
    return [layout.inbox(t) for t in types
            if os.lstat(layout.inbox(t)).st_dev != device and not layout.inbox(t).is_symlink()]


def refuse_foreign_inboxes(layout: Layout, types: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` (one line, both paths, what to do) for an inbox that a
    claim could not rename out of."""
    for inbox in foreign_inboxes(layout, types):
        raise ConfigError(
            f"config key spool.root: inbox {inbox} is on another file system than "
            f"{layout.processing}, and a claim is a rename, which cannot cross file systems; "
            "mount the shared folder at spool.root (or above it), not on an inbox")


def advise_on_network(root: Path, watch: WatchConfig) -> str | None:
    """Log once what a spool on a network or FUSE file system needs; its type, if so."""
    kind = network_fs(root)
    if kind is None:
        return None
    advice = []
    if not watch.force_polling:
        advice.append("set watch.force_polling = true: inotify does not see files written "
                      "through another host or mount")
    if watch.writer_check != "quiet":
        advice.append('set watch.writer_check = "quiet" where writers are on other hosts: '
                      "their open files are not in this /proc")
    log.warning("spool_on_network_fs", root=str(root), fs_type=kind,
                advice="; ".join(advice) or "settings fit")
    return kind


class MisplacedFiles:
    """Files dropped where no inbox is: one warning per name, and how many there are."""

    def __init__(self, layout: Layout, types: tuple[str, ...]) -> None:
        self._layout = layout
        self._types = types
        self._warned: set[Path] = set()

    def sweep(self) -> int:
        """Look again; warn about names not seen before. Returns the current count."""
        found = set(misplaced(self._layout, self._types))
        for path in sorted(found - self._warned):
            log.warning("file_misplaced", path=str(path),
                        hint=f"never taken: move it into inbox/<type>/ (types: "
                             f"{', '.join(self._types)})")
        self._warned = found  # a name that left and comes back is worth a new warning
        return len(found)


def network_fs(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the file system holding ``path`` if it is a network or FUSE one."""
    kind = fs_type(path, mountinfo)
    if kind is None:
        return None
    return kind if kind in _NETWORK or kind.startswith("fuse.") else None


def fs_type(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file-system type of the mount holding ``path`` (what statfs's f_type names),
    matched by device number; None where /proc is unreadable."""
    st_dev = os.stat(path).st_dev
    device = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                fields = line.split()
                if len(fields) > 2 and fields[2] == device and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        return None
    return None


def misplaced(layout: Layout, types: tuple[str, ...]) -> list[Path]:
    """Regular files in ``inbox/`` itself or one level down in a folder that is no type."""
    inbox = layout.root / "inbox"
    found: list[Path] = []
    for entry in _entries(inbox):
        if is_ignored(entry.name):
            continue
        if entry.is_file(follow_symlinks=False):
            found.append(Path(entry.path))
        elif entry.name not in types and entry.is_dir(follow_symlinks=False):
            found += [Path(e.path) for e in _entries(Path(entry.path))
                      if not is_ignored(e.name) and e.is_file(follow_symlinks=False)]
    return sorted(found)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
