"""Deterministic result files, generated from a job's stored input once it has finished.

Every value is derived from a SHA-256 of the type and the lookup value, so the same input
always gives the same bytes. Files are written row by row; none is held in memory.

Fidelity assumptions (IPQS documents neither the input columns nor what each result set
holds; only one example of result file names, for email, is published):

* The lookup value is column 0 of each row. The sandbox's verdict columns follow it, then
  the row's other cells, unchanged. Every row has the header's width: the header names
  the other cells after the input's header row (``input_2``, ``input_3``, ... where it
  has none), and shorter rows are padded with empty cells.
* A first row whose first cell is a column name (``email``, ``ip``, ``phone``, ``url``,
  ``value``, ... case-insensitive) is a header and is skipped. Blank rows are skipped.
* A row is *invalid* when its value is syntactically impossible for the type: an email
  without ``@``, a phone number with fewer than 7 digits, a proxy value that is not an IP
  address, a URL without a dot, a leaked_email without ``@``.
* Sets: ``all`` is every row; ``bad`` is invalid rows and rows scoring 85 or more;
  ``clean`` is the rest; ``pristine`` is clean rows scoring under 25. ``invalid_records``
  counts invalid rows. An empty set gets no download link.
* Result files are CSV in the excel dialect (minimal quoting, CRLF line ends), named
  ``{file_name}-IPQualityScore-{Product}-{Set}-Results.csv``; only the email product name
  and the ``Invalid``/``All`` set names are confirmed by the OpenAPI example.
"""

from __future__ import annotations

import csv
import hashlib
import ipaddress
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

#: Result sets in the order IPQS lists them in ``downloads``.
RESULT_SETS = ("pristine", "clean", "bad", "all")

PRODUCTS = {
    "email": "Email-Verification",
    "proxy": "Proxy-Detection",
    "phone": "Phone-Validation",
    "url": "URL-Scanner",
    "leaked_email": "Leaked-Email",
    "leaked_password": "Leaked-Password",
    "leaked_username": "Leaked-Username",
}
_SET_LABELS = {"pristine": "Pristine", "clean": "Clean", "bad": "Invalid", "all": "All"}

HEADER_WORDS = frozenset(
    {"email", "ip", "ip_address", "phone", "url", "value", "username", "password"}
)

BAD_SCORE = 85
PRISTINE_BELOW = 25

_COUNTRIES = ("US", "GB", "DE", "FR", "NL", "BR", "IN", "JP", "CA", "AU")
_ISPS = ("Example Telecom", "Sample Fiber", "Demo Cloud", "Test Mobile", "Placeholder Net")
_CARRIERS = ("Example Wireless", "Sample Mobile", "Demo Tel", "Test Cellular")

# A judge turns (value, digest, score, invalid) into the verdict cells after the value.
Judge = Callable[[str, bytes, int, bool], list[str]]


@dataclass(frozen=True)
class ResultSummary:
    """How many rows each set holds, and how many rows were invalid."""

    counts: dict[str, int]
    invalid_records: int


def result_file_name(file_name: str, file_type: str, result_set: str) -> str:
    """IPQS's name for a result file: ``x-IPQualityScore-Email-Verification-All-Results.csv``."""
    return f"{file_name}-IPQualityScore-{PRODUCTS[file_type]}-{_SET_LABELS[result_set]}-Results.csv"


def result_path(directory: Path, result_set: str) -> Path:
    """Where a job's result set is stored."""
    return directory / f"{result_set}.csv"


def generate_results(file_type: str, source: Path, directory: Path) -> ResultSummary:
    """Judge every row of ``source`` and write the four result sets into ``directory``."""
    fixed, judge = _TYPES[file_type]
    input_header, extra = _input_shape(source)
    header = [*fixed, *_extra_names(input_header, extra)]
    counts = dict.fromkeys(RESULT_SETS, 0)
    invalid_records = 0
    with ExitStack() as stack:
        files = {
            name: stack.enter_context(
                result_path(directory, name).open("w", encoding="utf-8", newline="")
            )
            for name in RESULT_SETS
        }
        writers = {name: csv.writer(handle) for name, handle in files.items()}
        for writer in writers.values():
            writer.writerow(header)
        for row in _lookup_rows(source):
            invalid, score, cells = _judge_row(file_type, judge, row)
            cells += [""] * (len(header) - len(cells))
            invalid_records += invalid
            for name in _sets_of(invalid, score):
                writers[name].writerow(cells)
                counts[name] += 1
    return ResultSummary(counts, invalid_records)


MAX_CELL = 64 * 1024 * 1024


def _lookup_rows(source: Path) -> Iterator[list[str]]:
    """The non-blank rows of the input, without a header row."""
    rows = _rows(source)
    first = next(rows, None)
    if first is not None and not _is_header(first):
        yield first
    yield from rows


def _rows(source: Path) -> Iterator[list[str]]:
    # Lookup lists may carry long extra cells; the csv module's default cap is 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL))
    with source.open(encoding="utf-8-sig", newline="") as handle:
        yield from (row for row in csv.reader(handle) if any(cell.strip() for cell in row))


def _is_header(row: list[str]) -> bool:
    return row[0].strip().lower() in HEADER_WORDS


def _input_shape(source: Path) -> tuple[list[str], int]:
    """The input's header row (empty if none) and the most cells any row has after column 0.

    A pass of its own, so that the result header can name every column before the first
    row is written: rows are streamed, never held.
    """
    rows = _rows(source)
    first = next(rows, None)
    if first is None:
        return [], 0
    header = first if _is_header(first) else []
    extra = max((len(row) - 1 for row in rows), default=0)
    return header, max(extra, len(first) - 1)


def _extra_names(input_header: list[str], extra: int) -> list[str]:
    """Names for the input's other cells: its own header's, else ``input_<column>``."""
    named = [cell.strip() for cell in input_header[1:]]
    return [
        (named[i] if i < len(named) and named[i] else f"input_{i + 2}") for i in range(extra)
    ]


def _judge_row(file_type: str, judge: Judge, row: list[str]) -> tuple[bool, int, list[str]]:
    value = row[0].strip()
    digest = hashlib.sha256(f"{file_type}\0{value}".encode()).digest()
    score = int.from_bytes(digest[:2], "big") % 101
    invalid = not _VALID[file_type](value)
    return invalid, score, [value, *judge(value, digest, score, invalid), *row[1:]]


def _sets_of(invalid: bool, score: int) -> tuple[str, ...]:
    if invalid or score >= BAD_SCORE:
        return ("bad", "all")
    if score < PRISTINE_BELOW:
        return ("pristine", "clean", "all")
    return ("clean", "all")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_VALID: dict[str, Callable[[str], bool]] = {
    "email": lambda value: "@" in value,
    "leaked_email": lambda value: "@" in value,
    "phone": lambda value: sum(ch.isdigit() for ch in value) >= 7,
    "proxy": _is_ip,
    "url": lambda value: "." in value,
    "leaked_password": lambda value: True,
    "leaked_username": lambda value: True,
}


def _flag(condition: bool) -> str:
    return "true" if condition else "false"


def _pick(digest: bytes, index: int, choices: tuple[str, ...]) -> str:
    return choices[digest[index] % len(choices)]


def _email(value: str, d: bytes, score: int, invalid: bool) -> list[str]:
    good = not invalid and score < BAD_SCORE
    deliverability = _pick(d, 7, ("high", "medium")) if good else "low"
    domain = value.rpartition("@")[2] if not invalid else ""
    return [
        _flag(good), _flag(d[4] % 10 == 0), str(d[5] % 4 if good else -1), str(d[6] % 5),
        deliverability, str(score), _flag(d[8] % 5 == 0), _flag(score >= 75), domain,
    ]


def _proxy(value: str, d: bytes, score: int, invalid: bool) -> list[str]:
    proxy = not invalid and score >= 75
    country = "N/A" if invalid else _pick(d, 6, _COUNTRIES)
    return [
        _flag(proxy), _flag(proxy and d[4] % 2 == 0), _flag(proxy and d[5] % 10 == 0),
        _flag(d[9] % 4 == 0), str(score), country, _pick(d, 7, _ISPS),
        str(int.from_bytes(d[10:12], "big")),
    ]


def _phone(value: str, d: bytes, score: int, invalid: bool) -> list[str]:
    good = not invalid
    line_type = _pick(d, 4, ("Wireless", "Landline", "VOIP", "Toll Free")) if good else "N/A"
    return [
        _flag(good), _flag(good and d[5] % 8 != 0), line_type,
        _pick(d, 6, _CARRIERS) if good else "N/A", _pick(d, 7, _COUNTRIES), str(score),
        _flag(line_type == "VOIP"), _flag(d[8] % 6 == 0), _flag(score >= 75),
    ]


def _url(value: str, d: bytes, score: int, invalid: bool) -> list[str]:
    target = value if "://" in value else f"http://{value}"
    unsafe = invalid or score >= BAD_SCORE
    return [
        _flag(unsafe), (urlsplit(target).hostname or "") if not invalid else "", str(score),
        _flag(unsafe and d[4] % 2 == 0), _flag(unsafe and d[5] % 3 == 0),
        _flag(score >= 75), _flag(d[6] % 20 == 0), _flag(d[7] % 25 == 0),
    ]


def _leaked(value: str, d: bytes, score: int, invalid: bool) -> list[str]:
    exposed = not invalid and score >= BAD_SCORE
    first_seen = f"20{10 + d[5] % 15}-{1 + d[6] % 12:02d}-{1 + d[7] % 28:02d}" if exposed else ""
    sources = 1 + d[4] % 9 if exposed else 0
    return [_flag(exposed), str(sources), first_seen, _flag(exposed and d[8] % 2 == 0), str(score)]


_LEAKED_HEADER = ("exposed", "source_count", "first_seen", "plain_text", "risk_score")

_TYPES: dict[str, tuple[tuple[str, ...], Judge]] = {
    "email": (
        ("email", "valid", "disposable", "smtp_score", "overall_score", "deliverability",
         "fraud_score", "leaked", "suspect", "domain"),
        _email,
    ),
    "proxy": (
        ("ip", "proxy", "vpn", "tor", "recent_abuse", "fraud_score", "country_code", "ISP",
         "ASN"),
        _proxy,
    ),
    "phone": (
        ("phone", "valid", "active", "line_type", "carrier", "country", "fraud_score", "VOIP",
         "prepaid", "risky"),
        _phone,
    ),
    "url": (
        ("url", "unsafe", "domain", "risk_score", "phishing", "malware", "suspicious",
         "spamming", "parking"),
        _url,
    ),
    "leaked_email": (("email", *_LEAKED_HEADER), _leaked),
    "leaked_password": (("password", *_LEAKED_HEADER), _leaked),
    "leaked_username": (("username", *_LEAKED_HEADER), _leaked),
}
