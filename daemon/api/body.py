"""An upload's body: a file that reports what has gone out and stops if it changes."""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1024 * 1024


class InputChangedError(OSError):
    """The file being uploaded changed under the upload."""


def _open_no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


class UploadFile(io.FileIO):
    """A file opened for upload that counts and reports what aiohttp reads, and stops if
    the file changes under it.

    aiohttp reads it in a worker thread and takes Content-Length from ``fstat``; when
    ``finished`` is true the whole body has gone to the socket, which is what separates
    "nothing was sent" from "sent, answer lost". ``on_finished`` (if set) is called once,
    from that thread, when the last byte has been read.
    """

    def __init__(self, path: Path, progress: Callable[[int], None] | None) -> None:
        super().__init__(path, "rb", opener=_open_no_follow)
        if not stat.S_ISREG(os.fstat(self.fileno()).st_mode):
            self.close()
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        self.sent = 0
        st = os.fstat(self.fileno())
        self.size, self._mtime_ns = st.st_size, st.st_mtime_ns
        self._progress = progress
        self.on_finished: Callable[[], None] | None = None

    def read(self, size: int | None = -1, /) -> bytes:
        st = os.fstat(self.fileno())
        if (st.st_size, st.st_mtime_ns) != (self.size, self._mtime_ns):
            # Someone writes to it: stop before IPQS gets a mix of old and new bytes.
            raise InputChangedError(errno.ESTALE, "the file changed while it was being sent")
        # Never more than asked: aiohttp cuts a chunk to the length it still expects.
        chunk = super().read(_CHUNK if size is None or size < 0 else size)
        if chunk:
            self.sent += len(chunk)
            if self._progress is not None:
                self._progress(len(chunk))
            if self.finished and self.on_finished is not None:
                self.on_finished()
                self.on_finished = None
        return chunk or b""

    @property
    def finished(self) -> bool:
        return self.sent >= self.size
