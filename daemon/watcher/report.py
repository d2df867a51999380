"""What the watcher tells the operator about its inboxes: each odd entry and each
unusable or recreated folder once, not on every scan."""

from __future__ import annotations

from pathlib import Path

import structlog

from daemon.watcher.scan import ScanResult

log = structlog.get_logger("daemon.watcher")

MAX_REPORTED = 10_000  # non-regular paths remembered so that each is logged only once


class Reports:
    """Paths already reported as not regular files, and inboxes already reported as
    unusable; memory stays bounded by :data:`MAX_REPORTED`."""

    def __init__(self) -> None:
        self.reported: set[Path] = set()
        self._unusable: set[str] = set()
        self._scanned = False  # a missing inbox is "created" at first, "recreated" later

    def room(self) -> int:
        return MAX_REPORTED - len(self.reported)

    def not_regular(self, path: Path, kind: str) -> None:
        """``path`` is a symlink, fifo, folder...: never a submission; say so once."""
        if path in self.reported:
            return
        if len(self.reported) >= MAX_REPORTED:
            log.debug("file_skipped_not_regular", path=str(path), kind=kind)
            return
        self.reported.add(path)
        log.warning("file_skipped_not_regular", path=str(path), kind=kind)

    def forget(self, path: Path) -> None:
        """``path`` is gone or a regular file now: report it again if it turns odd."""
        self.reported.discard(path)

    def scanned(self, result: ScanResult, folders: dict[str, Path]) -> None:
        """Report what a scan found about the folders and the odd entries in them."""
        for type_, mode in result.recreated.items():
            folder = str(folders[type_])
            if self._scanned:
                log.warning("inbox_recreated", type=type_, path=folder, mode=f"{mode:04o}")
            else:
                log.info("inbox_created", type=type_, path=folder, mode=f"{mode:04o}")
        self._scanned = True
        for type_, error in result.unusable.items():
            if type_ not in self._unusable:
                log.error("inbox_unusable", type=type_, path=str(folders[type_]), error=error)
        for type_ in self._unusable - set(result.unusable):
            log.info("inbox_usable", type=type_, path=str(folders[type_]))
        self._unusable = set(result.unusable)
        self.reported.difference_update(result.unreported)
        for path, kind in result.odd:
            self.not_regular(path, kind)

    def clear(self) -> None:
        self.reported.clear()
