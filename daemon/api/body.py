"""An upload's body: a file (or JSON bytes) that reports what has gone out, stops if it
changes, and awaits the caller's fence before its last chunk.

A file's body is also the one read of it: :class:`UploadFile` feeds every chunk to an
:class:`~daemon.inputs.Inspection` (hash, UTF-8 check, row count) in the worker thread that
reads it, so a big file is not read once to be checked and again to be sent.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractStreamWriter

from daemon.inputs import Inspection

#: Read (and hashed) in a worker thread per chunk: big enough that the hand-offs between
#: the loop and the thread cost little, small enough to keep the body's memory low.
_CHUNK = 256 * 1024

BeforeLast = Callable[[], Awaitable[None]]
"""Awaited just before an upload's last chunk is handed to the socket; raising stops the
body there (the fence of a job that is no longer ours, or a duplicate found while the bytes
went out)."""


class BodyStopped(OSError):
    """The upload's last chunk was withheld: the body stays incomplete, IPQS creates nothing.
    ``reason`` is what the caller's ``before_last`` check raised."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(errno.ECANCELED, f"upload body stopped before its end: {reason}")
        self.reason = reason


class InputChangedError(OSError):
    """The file being uploaded changed under the upload."""


def _open_regular(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class UploadFile(aiohttp.payload.Payload):
    """A file sent as a body, read in chunks in a worker thread.

    It counts and reports what went out (``progress``), stops if the file changes under
    it, feeds ``inspection`` (if given) every chunk in order, and awaits ``before_last``
    before the chunk that completes the file is written. ``finished`` is true once the
    whole body has gone to the socket, which is what separates "nothing was sent" from
    "sent, answer lost"; ``on_finished`` (if set) is called once, then.
    """

    def __init__(self, path: Path, progress: Callable[[int], None] | None,
                 before_last: BeforeLast | None = None, *,
                 inspection: Inspection | None = None,
                 expect: tuple[int | None, int | None] | None = None,
                 content_type: str = "text/csv") -> None:
        # Opened on the loop (a quick syscall): a cancelled thread could leak the handle.
        self._fd = _open_regular(path)
        st = os.fstat(self._fd)
        if expect is not None and (st.st_size, st.st_mtime_ns) != expect:
            # Not the file that was claimed (its size and mtime then): nothing goes.
            os.close(self._fd)
            raise InputChangedError(errno.ESTALE, "the file changed after it was claimed")
        super().__init__(path, content_type=content_type)
        self._size = st.st_size
        self._mtime_ns = st.st_mtime_ns
        self._progress = progress
        self._before_last = before_last
        self._inspection = inspection
        self.sent = 0
        self._read = 0
        self._last_handed = False
        self.on_finished: Callable[[], None] | None = None
        self.stopped: BodyStopped | None = None

    @property
    def finished(self) -> bool:
        """The last chunk was handed to the socket: IPQS may have the whole file."""
        return self._last_handed

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("an upload body is streamed, never decoded whole")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        size = self._size or 0
        if content_length is not None:
            size = min(size, content_length)
        while True:
            # Allocated here, on the loop's thread, and filled in a worker: the worker
            # allocates nothing, so no thread's malloc arena grows with the body.
            chunk = bytearray(min(_CHUNK, size - self._read))
            await asyncio.to_thread(self._fill, chunk)
            last = self._read >= size
            if last:
                await self._fence()
                # The fence may have taken a while (money, the marker, a save): the file
                # must still be the one read, or IPQS would get its old bytes.
                await asyncio.to_thread(self._check_unchanged)
                self._last_handed = True
            if chunk:
                await writer.write(chunk)
                self._went(len(chunk))
            if last:
                if self.on_finished is not None:
                    self.on_finished()
                    self.on_finished = None
                return

    def _fill(self, chunk: bytearray) -> None:
        """Read the next chunk into ``chunk`` (in a worker thread): checked unchanged, fed
        to the inspection."""
        self._check_unchanged()
        if chunk and os.preadv(self._fd, [chunk], self._read) != len(chunk):
            raise InputChangedError(errno.ESTALE, "the file ended early while it was sent")
        self._read += len(chunk)
        if self._inspection is not None:
            self._inspection.feed(chunk)

    def _check_unchanged(self) -> None:
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (self._size, self._mtime_ns):
            # Someone writes to it: stop before IPQS gets a mix of old and new bytes.
            raise InputChangedError(errno.ESTALE, "the file changed while it was being sent")

    async def _fence(self) -> None:
        if self._before_last is None or self.stopped is not None:
            return
        try:
            await self._before_last()
        except Exception as exc:
            self.stopped = BodyStopped(exc)
            raise self.stopped from None
        self._before_last = None  # once: a body is not fenced twice

    def _went(self, n: int) -> None:
        self.sent += n
        if self._progress is not None:
            self._progress(n)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def release(self) -> None:
        """Close the file (idempotent): the caller's, once the request is over."""
        self._close()


class FencedBytes(aiohttp.payload.Payload):
    """An in-memory body (the JSON method) written in chunks, ``before_last`` awaited
    before the last one."""

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
                await self._before_last()
            except Exception as exc:
                self.stopped = BodyStopped(exc)
                raise self.stopped from None
        self.finished = True  # handed over: from here IPQS may get it whole
        await writer.write(data[last:])
