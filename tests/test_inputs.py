"""What an input costs: the rows IPQS bills, counted in chunks as the file streams past."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.inputs import RowCounter, billed_rows, count_lines
from daemon.sandbox.spool import RowCounter as SandboxRowCounter

# Bytes that make line structure interesting: line ends, whitespace, BOM pieces, content.
_PIECES = st.sampled_from(
    [b"\n", b"\r\n", b"\r", b" ", b"\t", b"\x0b", b"a", b"x@example.com", b",", b'"',
     b"\xef\xbb\xbf", b"\xef", b"\xbb", b"\xbf", b"\xc3\xa9", b"\x00"]
)
_CONTENT = st.lists(_PIECES, max_size=40).map(b"".join)


def reference(data: bytes) -> int:
    """The rule, written the obvious way: non-blank lines, a leading BOM not content."""
    return sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())


def counted(chunks: list[bytes]) -> int:
    counter = RowCounter()
    for chunk in chunks:
        counter.feed(chunk)
    return counter.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(_CONTENT, st.lists(st.integers(min_value=0), max_size=12))
def test_chunked_counting_equals_whole_file_counting_for_any_split(data, cuts):
    whole = counted([data])
    assert whole == reference(data)
    assert counted(split(data, cuts)) == whole
    assert counted([data[i:i + 1] for i in range(len(data))]) == whole  # byte by byte


@given(_CONTENT, st.lists(st.integers(min_value=0), max_size=6))
def test_the_daemon_counts_rows_as_the_sandbox_bills_them(data, cuts):
    # Two implementations of one rule, written apart: the sandbox must not borrow the
    # daemon's idea of a row, or a wrong rule would be checked against itself.
    sandbox = SandboxRowCounter()
    for chunk in split(data.removeprefix(b"\xef\xbb\xbf"), cuts):
        sandbox.feed(chunk)
    assert counted(split(data, cuts)) == sandbox.finish()


@pytest.mark.parametrize(
    ("data", "rows"),
    [
        (b"", 0),
        (b"a@example.com", 1),  # no final newline
        (b"email\r\na@example.com\r\n", 2),  # a header line is billed: it is sent
        (b"\xef\xbb\xbfa\n\n  \r\n\tb\n", 2),
        (b"\xef\xbb\xbf\r\n", 0),
    ],
)
def test_count_lines_of_a_file(tmp_path: Path, data, rows):
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    assert count_lines(path) == rows
    assert billed_rows(path, "multipart") == rows


def test_a_file_larger_than_one_read_is_counted_across_reads(tmp_path: Path):
    path = tmp_path / "big.csv"
    line = b"user@example.com,some extra cell\r\n"
    lines = 2 * 1024 * 1024 // len(line) + 7  # over two of count_lines' chunks
    path.write_bytes(line * lines + b"\r\n   \r\nlast-without-newline")
    assert count_lines(path) == lines + 1


def test_json_rows_and_url_files(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_bytes(b'a@example.com,"two\nlines"\n\n,\nb@example.com\n')
    assert billed_rows(path, "json") == 2  # JSON rows: blank rows (",") are not sent
    assert billed_rows(path, "multipart") == 4  # lines: the quoted newline makes one more
    link = tmp_path / "x.url"
    link.write_text("https://example.com/list.csv\n")
    assert billed_rows(link, "url") is None
    assert billed_rows(link, "multipart") is None
