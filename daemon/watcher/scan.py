"""Looking at the inboxes: the bounded round-robin scan and the settle round's lstats.

Blocking: run in a thread. Symlinks are never followed, and nothing in an inbox is opened
but a regular file the lstat gate just saw, for a lease probe (opening a fifo would hang).
An inbox folder is opened with ``O_NOFOLLOW`` from the spool root and listed through that
fd: an inbox replaced by a symlink is refused, never listed, and never re-created over the
link.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from daemon.spool.fs import SymlinkedFolderError, make_dir_like, open_folder
from daemon.spool.layout import is_ignored
from daemon.watcher.checks import Probe
from daemon.watcher.lease import LeaseProbe
from daemon.watcher.proc import proc_writers
from daemon.watcher.settle import Key, Observation, Seen


@dataclass
class ScanResult:
    """What one scan found; ``wall`` is the wall-clock time it ran (for mtime credit)."""

    found: list[tuple[str, Path, Seen]] = field(default_factory=list)
    odd: list[tuple[Path, str]] = field(default_factory=list)
    unreported: list[Path] = field(default_factory=list)
    recreated: dict[str, int] = field(default_factory=dict)  # type -> mode given
    unusable: dict[str, str] = field(default_factory=dict)
    truncated: bool = False
    wall: float = 0.0


#: The mode ``systemd/ipqs-bulkd.tmpfiles`` gives an inbox: group-writable, setgid.
INBOX_MODE = 0o2770


def look(path: Path) -> Seen | None:
    """``lstat`` of ``path``; None when it is gone."""
    try:
        return Seen.of(path.lstat())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _linked(folder: Path) -> bool:
    try:
        return folder.is_symlink()
    except OSError:
        return False


def observe(paths: list[Path], targets: frozenset[Key] | None,
            probes: dict[Path, Key] | None = None,
            prober: LeaseProbe | None = None) -> Observation:
    """One settle round's look: the /proc pass for ``targets`` (if any), the lease probes
    of ``probes`` (path -> the file it must still be), then an lstat of every path."""
    writers: frozenset[Key] = frozenset()
    visible = None
    if targets:
        writers, visible = proc_writers(targets)
    # A file in an inbox that became a symlink is gone for us: never looked at through it.
    linked = {folder for folder in {path.parent for path in [*paths, *(probes or {})]}
              if _linked(folder)}
    lease = {path: Probe.CHANGED if path.parent in linked else _probe(prober, path, key)
             for path, key in (probes or {}).items()}
    # lstat after the /proc pass and the probes: a writer that writes and closes in
    # between shows up as a change, instead of slipping between the two looks.
    wall = time.time()
    seen = {path: None if path.parent in linked else look(path) for path in paths}
    return Observation(seen, writers, visible, wall, lease)


def _probe(prober: LeaseProbe | None, path: Path, key: Key) -> Probe:
    # The lstat gate: only the regular file the table knows is ever opened.
    gate = look(path)
    if gate is None or gate.kind != "regular" or gate.key != key:
        return Probe.CHANGED
    return prober.probe(path, key) if prober is not None else Probe.UNSUPPORTED


def scan(
    inboxes: list[tuple[str, Path]],
    known: frozenset[Path],
    reported: frozenset[Path],
    room: int,
    report_room: int,
) -> ScanResult:
    """Walk the inboxes in turn, one new regular file from each, until ``room`` new files
    were found or every inbox is exhausted."""
    result = ScanResult(wall=time.time())
    with ExitStack() as stack:
        turn: deque[tuple[str, Path, Iterator[os.DirEntry[str]]]] = deque()
        folders = [path for _, path in inboxes]
        for type_, path in inboxes:
            fd = _open_inbox(type_, path, folders, result)
            if fd is not None:
                stack.callback(os.close, fd)
                turn.append((type_, path, stack.enter_context(os.scandir(fd))))
        while turn and len(result.found) < room:
            type_, folder, entries = turn.popleft()
            if _take_one(type_, folder, entries, known, reported, report_room, result):
                turn.append((type_, folder, entries))
        result.truncated = bool(turn)
    result.unreported = [p for p in reported if (s := look(p)) is None or s.kind == "regular"]
    return result


def _open_inbox(type_: str, path: Path, folders: list[Path], result: ScanResult) -> int | None:
    """An fd of the inbox (re-created as its siblings are if it is missing), or None when
    it cannot be used (a symlink, a file, no access: recorded in ``result.unusable``)."""
    try:
        return _open_or_recreate(type_, path, folders, result)
    except SymlinkedFolderError as exc:
        result.unusable[type_] = f"{exc.filename} is {exc.strerror}"
    except (NotADirectoryError, PermissionError) as exc:
        result.unusable[type_] = str(exc)
    except FileNotFoundError as exc:  # gone again already; the next scan tries once more
        result.unusable[type_] = str(exc)
    return None


def _open_or_recreate(type_: str, path: Path, folders: list[Path], result: ScanResult) -> int:
    # The spool root is the operator's choice (followed); inbox/ and inbox/<type> are not.
    root = path.parent.parent
    try:
        return open_folder(path, below=root)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise
    # Deleted while running: as its siblings are (group, setgid, group write), or as
    # systemd-tmpfiles makes it, never with the daemon's own umask and group.
    siblings = [folder for folder in folders if folder != path]
    mode = make_dir_like(path, siblings, default_mode=INBOX_MODE)
    if mode is not None:
        result.recreated[type_] = mode
    return open_folder(path, below=root)


def _take_one(
    type_: str,
    folder: Path,
    entries: Iterator[os.DirEntry[str]],
    known: frozenset[Path],
    reported: frozenset[Path],
    report_room: int,
    result: ScanResult,
) -> bool:
    """Move ``entries`` on to the next new regular file and record it; False when the
    folder has no more entries."""
    for entry in entries:
        if is_ignored(entry.name):
            continue
        path = folder / entry.name
        if path in known:
            continue
        try:
            seen = Seen.of(entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
        if seen.kind == "regular":
            result.found.append((type_, path, seen))
            return True
        if path not in reported and len(result.odd) < report_room:
            result.odd.append((path, seen.kind))
    return False
