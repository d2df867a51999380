"""Writing received uploads to disk in chunks, hashing and checking them on the way.

Nothing here holds a whole upload in memory: a multi-gigabyte file costs one chunk.
A "row" is a non-blank line: a line holding at least one non-whitespace byte. CRLF and
LF line ends both work, and a UTF-8 byte order mark at the start is not content.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BOM = codecs.BOM_UTF8

_CONTENT = re.compile(rb"\S")
# A newline followed by a line of nothing but whitespace: it opens a blank line.
_OPENS_BLANK_LINE = re.compile(rb"\n(?=[ \t\r\f\v]*\n)")


class RowCounter:
    """Counts non-blank lines in a byte stream fed in chunks of any size."""

    def __init__(self) -> None:
        self.rows = 0
        self._open_line_has_content = False

    def feed(self, chunk: bytes) -> None:
        """Count the lines that end in ``chunk``; remember whether the open one has content."""
        first = chunk.find(b"\n")
        if first < 0:
            self._open_line_has_content |= _CONTENT.search(chunk) is not None
            return
        if self._open_line_has_content or _CONTENT.search(chunk, 0, first):
            self.rows += 1
        last = chunk.rfind(b"\n")
        # Lines wholly inside the chunk, found with C-speed scans rather than a Python loop
        # per line: a 200 MB upload has millions of them.
        inner_lines = chunk.count(b"\n", first, last + 1) - 1
        inner_blank = len(_OPENS_BLANK_LINE.findall(chunk, first, last + 1))
        self.rows += inner_lines - inner_blank
        self._open_line_has_content = _CONTENT.search(chunk, last + 1) is not None

    def finish(self) -> int:
        """Count a last line without a line end, and return the total."""
        if self._open_line_has_content:
            self.rows += 1
            self._open_line_has_content = False
        return self.rows


@dataclass(frozen=True)
class SpooledFile:
    """An upload as stored: where, its digest and size, and what its content looks like."""

    path: Path
    sha256: str
    size: int
    rows: int
    is_text: bool  # valid UTF-8 without NUL bytes


class SpoolWriter:
    """Writes one upload to ``path`` chunk by chunk.

    Used as a context manager: leaving the block by an exception (a client disconnect, a
    cancelled handler) removes the partial file, so nothing half-received survives.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file = path.open("xb")
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._rows = RowCounter()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._is_text = True
        self._head: bytes | None = b""  # the first bytes, until we know whether they are a BOM
        self._result: SpooledFile | None = None

    @property
    def result(self) -> SpooledFile:
        """The stored file, once the ``with`` block has ended without an exception."""
        if self._result is None:
            raise RuntimeError("the upload has not been completely written")
        return self._result

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._result = self._finish()
        else:
            self._file.close()
            self._path.unlink(missing_ok=True)

    def write(self, chunk: bytes) -> None:
        """Store, hash and inspect the next chunk."""
        self._file.write(chunk)
        self._sha256.update(chunk)
        self._size += len(chunk)
        self._inspect(chunk)
        if self._head is not None:
            self._head += chunk
            if len(self._head) < len(BOM):
                return
            chunk, self._head = self._head.removeprefix(BOM), None
        self._rows.feed(chunk)

    def _inspect(self, chunk: bytes) -> None:
        if not self._is_text:
            return
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError:
            self._is_text = False
        else:
            self._is_text = b"\0" not in chunk

    def _finish(self) -> SpooledFile:
        self._file.close()
        if self._head is not None:
            self._rows.feed(self._head.removeprefix(BOM))
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            self._is_text = False
        return SpooledFile(
            self._path, self._sha256.hexdigest(), self._size, self._rows.finish(), self._is_text
        )


def spool_rows(path: Path, rows: Iterable[Sequence[str]]) -> SpooledFile:
    """Write rows as CSV (excel dialect: minimal quoting, CRLF) to ``path``.

    Rows whose cells are all blank are left out: they are blank lines, not rows (the
    excel dialect would write a lone empty cell as ``""``, which is not blank).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    with SpoolWriter(path) as sink:
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            writer.writerow(row)
            if buffer.tell() >= 1 << 16:
                sink.write(_take(buffer))
        sink.write(_take(buffer))
    return sink.result


def _take(buffer: io.StringIO) -> bytes:
    data = buffer.getvalue().encode()
    buffer.seek(0)
    buffer.truncate()
    return data
