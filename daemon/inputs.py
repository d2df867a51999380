"""What makes an input file sendable by each method: shared by the daemon and `submit`.

Also what an input costs. IPQS bills rows; its documentation says nothing about header
lines, so a header is billed like any other line: the count is what is sent.
A row of a CSV is a non-blank line (one with a byte that is not ASCII whitespace), CRLF
and LF alike, a UTF-8 byte order mark at the start not being content; the JSON method
bills the rows it sends; a ``.url`` file's rows are unknown until IPQS fetches it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

URL_SUFFIX = ".url"
URL_SCHEMES = ("http", "https", "ftp")
MAX_URL_FILE = 8192
# Lookup lists may carry long extra cells; the csv module's default cap is 128 KiB.
MAX_CELL = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
_BOM = codecs.BOM_UTF8
_CONTENT = re.compile(rb"\S")
# A newline that opens a blank line: whitespace other than newlines up to the next one.
_OPENS_BLANK_LINE = re.compile(rb"\n[^\S\n]*(?=\n)")


class RowCounter:
    """Counts the rows IPQS bills (non-blank lines) of a CSV fed as byte chunks.

    Feed it the chunks of the pass that already reads the file (hashing, checking); a
    chunk may end anywhere, inside a line or a byte order mark. :meth:`finish` counts a
    last line that has no line end.
    """

    def __init__(self) -> None:
        self.rows = 0  # complete lines with content so far
        self._open_line_has_content = False
        self._head: bytes | None = b""  # the first bytes, until we know if they are a BOM

    def feed(self, chunk: bytes | bytearray) -> None:
        """Count the lines that end in ``chunk``."""
        if self._head is not None:
            self._head += chunk
            if len(self._head) < len(_BOM) and _BOM.startswith(self._head):
                return
            chunk, self._head = self._head.removeprefix(_BOM), None
        self._scan(chunk)

    def finish(self) -> int:
        """The total, counting a last line without a line end; the counter is spent."""
        if self._head is not None:
            self._scan(self._head.removeprefix(_BOM))
            self._head = None
        if self._open_line_has_content:
            self.rows += 1
            self._open_line_has_content = False
        return self.rows

    def _scan(self, chunk: bytes | bytearray) -> None:
        last = chunk.rfind(b"\n")
        if last < 0:
            self._open_line_has_content |= _CONTENT.search(chunk) is not None
            return
        first = chunk.find(b"\n")
        # The line left open by earlier chunks ends at ``first``.
        if self._open_line_has_content or _CONTENT.search(chunk, 0, first):
            self.rows += 1
        # Lines wholly inside the chunk: every line end, less the blank lines. Both are
        # found at C speed with nothing made per line; files have millions of lines.
        lines = chunk.count(b"\n", first + 1, last + 1)
        blank = sum(1 for _ in _OPENS_BLANK_LINE.finditer(chunk, first, last + 1))
        self.rows += lines - blank
        self._open_line_has_content = _CONTENT.search(chunk, last + 1) is not None


@dataclass(frozen=True)
class FileFacts:
    """What one streamed pass over a file tells: its digest, size, rows, and a problem."""

    sha256: str
    bytes: int
    rows: int
    problem: str | None


class Inspection:
    """sha256, size and billed rows of a file fed as chunks in order, and what makes it
    certainly unacceptable to IPQS as CSV: not UTF-8, NUL bytes, no rows.

    The one pass over a file: the hashing pass of ``inspect_file``, or the upload body
    itself (:class:`daemon.api.body.UploadFile`), so a big file is read once.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._rows = RowCounter()
        self.size = 0
        self._problem: str | None = None
        self._text_seen = False

    def feed(self, chunk: bytes | bytearray) -> None:
        self._digest.update(chunk)
        self.size += len(chunk)
        self._rows.feed(chunk)
        if self._problem is None:
            self._problem = _text_problem(chunk, self._decoder)
        self._text_seen = self._text_seen or bool(chunk.replace(_BOM, b"").strip())

    def facts(self) -> FileFacts:
        """The facts of everything fed; the inspection is spent."""
        problem = self._problem
        if problem is None and self.size > 0:
            problem = _text_problem(b"", self._decoder, final=True)
        if problem is None and not self._text_seen:
            problem = "the file is empty" if self.size == 0 else "the file holds no rows"
        return FileFacts(self._digest.hexdigest(), self.size, self._rows.finish(), problem)


def _text_problem(chunk: bytes | bytearray, decoder: codecs.IncrementalDecoder, *,
                  final: bool = False) -> str | None:
    if b"\0" in chunk:
        return "the file is binary (it contains NUL bytes), not CSV text"
    if chunk.isascii() and not decoder.getstate()[0]:
        return None  # valid UTF-8 as it is: no decoded copy is made
    try:
        decoder.decode(chunk, final=final)
    except UnicodeDecodeError:
        return "the file is not UTF-8 text"
    return None


def count_lines(path: Path) -> int:
    """The non-blank lines of a file, read in chunks (see :class:`RowCounter`)."""
    counter = RowCounter()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            counter.feed(chunk)
    return counter.finish()


def billed_rows(path: Path, method: str) -> int | None:
    """The rows IPQS bills for sending ``path`` by ``method`` (multipart, json or url).

    None for the URL method: IPQS fetches the file, and what it holds is not known here.
    The JSON method sends CSV rows, which may span lines (a quoted cell with a newline).
    """
    if method == "url" or path.name.endswith(URL_SUFFIX):
        return None
    if method == "json":
        return sum(1 for _ in iter_rows(path))
    return count_lines(path)


def url_of(data: bytes) -> tuple[str | None, str | None]:
    """The one http, https or ftp URL a ``.url`` file holds, or why there is none."""
    if len(data) > MAX_URL_FILE:
        return None, "a .url file must hold one URL, not a large file"
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()
             if line.strip()]
    if len(lines) != 1:
        return None, f"a .url file must hold exactly one URL, found {len(lines)} lines"
    return lines[0], url_problem(lines[0])


def url_problem(url: str) -> str | None:
    """Why ``url`` is not one http, https or ftp URL (None if it is)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in URL_SCHEMES or not parts.hostname:
        return "a .url file must hold an http, https or ftp URL"
    if any(c.isspace() for c in url):
        return "the URL contains whitespace"
    return None


def url_file_problem(path: Path) -> str | None:
    """Why a ``.url`` file is not exactly one http, https or ftp URL (None if it is)."""
    with path.open("rb") as fh:
        return url_of(fh.read(MAX_URL_FILE + 1))[1]


def iter_rows(path: Path) -> Iterator[list[str]]:
    """The CSV's non-blank rows, for the JSON method."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL))
    with path.open(encoding="utf-8-sig", newline="") as fh:
        yield from (row for row in csv.reader(fh) if any(cell.strip() for cell in row))


def read_rows(path: Path) -> list[list[str]]:
    return list(iter_rows(path))


def rows_problem(path: Path) -> str | None:
    """Why the file cannot be sent as JSON rows (None if it can)."""
    return json_rows(path)[1]


def json_rows(path: Path) -> tuple[int, str | None]:
    """The rows a JSON upload of ``path`` sends (and bills), and why it cannot be sent
    that way (None if it can), in one pass."""
    try:
        rows = sum(1 for _ in iter_rows(path))
    except (csv.Error, UnicodeDecodeError) as exc:
        return 0, f"the file cannot be read as CSV rows: {exc}"
    return rows, None if rows else "the file holds no rows"


#: A lookup value (email, phone, IP, URL) always holds one of these; a column name none.
_VALUE_MARKS = re.compile(r"[0-9@.:/]")


def first_row_is_header(path: Path) -> bool | None:
    """Whether the CSV's first row looks like column names (``email``, ``phone``...) rather
    than a lookup value: its first cell holds no digit, ``@``, ``.``, ``:`` or ``/``. IPQS
    returns no result row for a header. None when the file cannot be read as CSV."""
    try:
        first = next(iter_rows(path), None)
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    if not first:
        return None
    return not _VALUE_MARKS.search(first[0])
