"""An upload's body: a file (or JSON bytes) that reports what has gone out, stops if it
changes, and runs the caller's fence before its last chunk."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractStreamWriter

_CHUNK = 1024 * 1024

BeforeLast = Callable[[], None]
"""Called (in a worker thread, may block) just before an upload's last chunk is handed to
the socket; raising stops the body there (the fence of a job that is no longer ours, or a
duplicate found while the bytes went out)."""


class BodyStopped(OSError):
    """The upload's last chunk was withheld: the body stays incomplete, IPQS creates nothing.
    ``reason`` is what the caller's ``before_last`` check raised."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(errno.ECANCELED, f"upload body stopped before its end: {reason}")
        self.reason = reason


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
    from that thread, when the last byte has been read; ``before_last`` runs before the
    chunk that completes the file is returned.
    """

    def __init__(self, path: Path, progress: Callable[[int], None] | None,
                 before_last: BeforeLast | None = None) -> None:
        super().__init__(path, "rb", opener=_open_no_follow)
        if not stat.S_ISREG(os.fstat(self.fileno()).st_mode):
            self.close()
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        self.sent = 0
        st = os.fstat(self.fileno())
        self.size, self._mtime_ns = st.st_size, st.st_mtime_ns
        self._progress = progress
        self.on_finished: Callable[[], None] | None = None
        self._before_last = before_last
        self.stopped: BodyStopped | None = None

    def read(self, size: int | None = -1, /) -> bytes:
        st = os.fstat(self.fileno())
        if (st.st_size, st.st_mtime_ns) != (self.size, self._mtime_ns):
            # Someone writes to it: stop before IPQS gets a mix of old and new bytes.
            raise InputChangedError(errno.ESTALE, "the file changed while it was being sent")
        # Never more than asked: aiohttp cuts a chunk to the length it still expects.
        chunk = super().read(_CHUNK if size is None or size < 0 else size)
        if self.sent + len(chunk) >= self.size:
            self._fence()
        if chunk:
            self.sent += len(chunk)
            if self._progress is not None:
                self._progress(len(chunk))
            if self.finished and self.on_finished is not None:
                self.on_finished()
                self.on_finished = None
        return chunk or b""

    def _fence(self) -> None:
        if self._before_last is None or self.stopped is not None:
            return
        try:
            self._before_last()
        except Exception as exc:
            self.stopped = BodyStopped(exc)
            raise self.stopped from None
        self._before_last = None  # once: later reads only find the end of the file

    @property
    def finished(self) -> bool:
        return self.sent >= self.size


class FencedBytes(aiohttp.payload.Payload):
    """An in-memory body (the JSON method) written in chunks, ``before_last`` run in a
    worker thread before the last one."""

    def __init__(self, data: bytes, content_type: str, before_last: BeforeLast | None) -> None:
        super().__init__(data, content_type=content_type)
        self._size = len(data)
        self._data = data
        self._before_last = before_last
        self.stopped: BodyStopped | None = None
        self.finished = False

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._data.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        data = self._data if content_length is None else self._data[:content_length]
        last = max(len(data) - _CHUNK, 0)
        for start in range(0, last, _CHUNK):
            await writer.write(data[start:min(start + _CHUNK, last)])
        if self._before_last is not None:
            try:
                await asyncio.to_thread(self._before_last)
            except Exception as exc:
                self.stopped = BodyStopped(exc)
                raise self.stopped from None
        await writer.write(data[last:])
        self.finished = True
