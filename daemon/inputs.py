"""What makes an input file sendable by each method: shared by the daemon and `submit`."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

URL_SUFFIX = ".url"
URL_SCHEMES = ("http", "https", "ftp")
MAX_URL_FILE = 8192
# Lookup lists may carry long extra cells; the csv module's default cap is 128 KiB.
MAX_CELL = 64 * 1024 * 1024


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
    try:
        rows = sum(1 for _ in iter_rows(path))
    except (csv.Error, UnicodeDecodeError) as exc:
        return f"the file cannot be read as CSV rows: {exc}"
    return None if rows else "the file holds no rows"
