"""Plausible input rows made up from an upload-by-URL link when the sandbox does not fetch it.

The rows depend only on the type and the URL, so a test can predict them. Every value is
from a documentation range (RFC 2606 names, RFC 5737 addresses, 555 phone numbers); about
one row in five is syntactically invalid, so every result set gets used.
"""

from __future__ import annotations

import hashlib

FABRICATED_ROWS = 20


def fabricate_rows(file_type: str, url: str) -> list[list[str]]:
    """Twenty one-cell rows of the right type, derived from ``url``."""
    seed = hashlib.sha256(f"{file_type}\0{url}".encode()).hexdigest()
    return [[_value(file_type, seed, n)] for n in range(FABRICATED_ROWS)]


def _value(file_type: str, seed: str, n: int) -> str:
    tag = seed[n : n + 6]
    invalid = n % 5 == 4
    if file_type in ("email", "leaked_email"):
        return f"user{n}.{tag}" + ("" if invalid else "@example.com")
    if file_type == "proxy":
        return f"host-{tag}" if invalid else f"198.51.100.{int(tag, 16) % 254 + 1}"
    if file_type == "phone":
        return f"55{n}" if invalid else f"+1 555 01{int(tag, 16) % 100:02d} {n:04d}"
    if file_type == "url":
        return f"localhost-{tag}" if invalid else f"https://site-{tag}.example/page/{n}"
    return f"{file_type.removeprefix('leaked_')}-{tag}-{n}"
