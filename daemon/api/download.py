"""Fetching a one-time result link: every hop checked, every file checked before it is kept.

Results are paid for, and a link dies once used, so a file is kept only when it is surely
the whole results file: not an HTML page from a CDN, not cut short. Anything in doubt is a
:class:`TransientError` (ask the status for a fresh link and fetch again). Redirects are
followed by hand, each hop's host checked against ``api.download_hosts``; the key is never
sent on a download.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

import aiohttp

from daemon.api.answers import retry_after
from daemon.errors import AccountError, RejectedError, TransientError

_CHUNK = 1024 * 1024
MAX_HOPS = 5
#: A download may take ``api.total_timeout_seconds`` plus one second per this many bytes:
#: a large file at any sane speed is never cut, a trickle is.
MIN_BYTES_PER_SECOND = 16 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {403, 408, 425, 429}
_QUOTE_OR_NEWLINE = re.compile(rb'["\n]')
_HTML_STARTS = (b"<!doctype", b"<html")


@dataclass(frozen=True)
class ResultFile:
    """A results file saved in full: its size and its number of CSV records (lines that
    end outside a quoted field), a header line included."""

    bytes: int
    lines: int

    @property
    def data_rows(self) -> int:
        """Records after the header line (the sandbox's and IPQS's examples have one)."""
        return max(self.lines - 1, 0)


@dataclass(frozen=True)
class DownloadPolicy:
    """Where links may lead and how long and large a download may be."""

    hosts: frozenset[str]
    schemes: frozenset[str]
    max_bytes: int
    total_timeout: float

    def check_url(self, url: str, *, hop: int = 0) -> None:
        """Raise :class:`AccountError` for a link to a scheme or host not allowed."""
        parts = urlsplit(url)
        if parts.scheme in self.schemes and parts.hostname in self.hosts:
            return
        where = f"{parts.scheme}:" + (f"//{parts.hostname}" if parts.hostname else "")
        what = "download redirected" if hop else "download link"
        # A setting to fix (api.download_hosts), not a reason to give up paid results.
        raise AccountError(f"{what} to {where} refused: not an allowed download host "
                           "(api.download_hosts)")


class _Records:
    """Counts CSV records in a byte stream without keeping it, and keeps its first bytes."""

    def __init__(self) -> None:
        self.count = 0
        self.in_quotes = False
        self.head = b""
        self.last = b""

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < 64:
            self.head += chunk[:64]
        self.last = chunk[-1:]
        if not self.in_quotes and b'"' not in chunk:
            self.count += chunk.count(b"\n")  # the common case, at C speed
            return
        for match in _QUOTE_OR_NEWLINE.finditer(chunk):
            if match.group() == b'"':
                self.in_quotes = not self.in_quotes
            elif not self.in_quotes:
                self.count += 1

    @property
    def looks_like_html(self) -> bool:
        return self.head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_STARTS)


async def fetch(session: aiohttp.ClientSession, policy: DownloadPolicy, url: str, dest: Path,
                *, mode: int, ssl_context: ssl.SSLContext | bool,
                proxy_for: Callable[[str], str | None], scrub: Callable[[str], str]
                ) -> ResultFile:
    """Fetch ``url`` into ``dest`` (through a temporary file) and return what was saved."""
    policy.check_url(url)
    tmp = dest.with_name(f".{dest.name}.part")
    started = time.monotonic()
    try:
        async with asyncio.timeout(None) as limit:
            limit.reschedule(asyncio.get_running_loop().time() + policy.total_timeout)
            for hop in range(MAX_HOPS + 1):
                async with session.get(url, ssl=ssl_context, proxy=proxy_for(url),
                                       allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        url = _next_hop(policy, url, resp, hop + 1)
                        continue
                    await _check_response(resp, policy, scrub)
                    saved = await _stream_to(resp, tmp, mode, policy, limit)
                await asyncio.to_thread(os.replace, tmp, dest)
                return saved
        raise RejectedError(f"download link redirected more than {MAX_HOPS} times")
    except aiohttp.ClientError as exc:
        cause = "timeout" if isinstance(exc, aiohttp.ServerTimeoutError) else "dropped"
        raise TransientError(f"download: failed ({type(exc).__name__})", cause=cause) from None
    except TimeoutError:
        raise TransientError(f"download: not complete after {time.monotonic() - started:.0f} "
                             "s (api.total_timeout_seconds)", cause="timeout") from None
    finally:
        await asyncio.to_thread(tmp.unlink, missing_ok=True)


def _next_hop(policy: DownloadPolicy, url: str, resp: aiohttp.ClientResponse, hop: int) -> str:
    location = resp.headers.get("Location")
    if not location:
        raise RejectedError(f"download link answered HTTP {resp.status} without a Location")
    target = urljoin(url, location)
    policy.check_url(target, hop=hop)
    return target


async def _check_response(resp: aiohttp.ClientResponse, policy: DownloadPolicy,
                          scrub: Callable[[str], str]) -> None:
    status = resp.status
    if status in _TRANSIENT_STATUS or status >= 500:
        cause = "rate_limit" if status in (403, 429) else f"http_{status // 100}xx"
        raise TransientError(f"download: HTTP {status}", cause=cause,
                             retry_after=retry_after(resp.headers.get("Retry-After")))
    if status != 200:
        # 404/410 and the like: the one-time link is dead; a fresh one is a status away.
        raise RejectedError(f"download link refused (HTTP {status})")
    if "json" in resp.content_type:
        raise RejectedError(scrub(_message(await resp.text(errors="replace"))))
    if resp.content_type == "text/html":
        raise TransientError("download: an HTML page instead of the results file",
                             cause="invalid_answer")
    if resp.content_length is not None and resp.content_length > policy.max_bytes:
        raise RejectedError(f"result file of {resp.content_length} bytes exceeds "
                            "api.max_download_bytes")


def _message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) and message else "download link refused"


async def _stream_to(resp: aiohttp.ClientResponse, tmp: Path, mode: int,
                     policy: DownloadPolicy, limit: asyncio.Timeout) -> ResultFile:
    records, written = _Records(), 0
    loop = asyncio.get_running_loop()
    begun = loop.time()
    fh = _create(tmp, mode)  # on the loop: a cancelled thread could leak the handle
    try:
        async for chunk in resp.content.iter_chunked(_CHUNK):
            written += len(chunk)
            if written > policy.max_bytes:
                raise RejectedError("result file exceeds api.max_download_bytes")
            records.feed(chunk)
            limit.reschedule(begun + policy.total_timeout + written / MIN_BYTES_PER_SECOND)
            await asyncio.to_thread(fh.write, chunk)
        await asyncio.to_thread(_flush_and_sync, fh)
    finally:
        fh.close()
    return _verdict(resp, records, written)


def _verdict(resp: aiohttp.ClientResponse, records: _Records, written: int) -> ResultFile:
    expected = resp.content_length
    if expected is not None and written != expected:
        raise TransientError(f"download ended after {written} of {expected} bytes",
                             cause="dropped")
    if written == 0:
        raise TransientError("download: an empty results file", cause="dropped")
    if records.looks_like_html:
        raise TransientError("download: an HTML page instead of the results file",
                             cause="invalid_answer")
    complete = records.last == b"\n"
    if not complete and expected is None:
        # Without a length, only a whole last line shows the connection was not cut.
        raise TransientError(f"download ended mid-line after {written} bytes, with no "
                             "Content-Length to vouch for it", cause="dropped")
    return ResultFile(written, records.count + (0 if complete else 1))


def _create(path: Path, mode: int) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    os.fchmod(fd, mode)  # O_CREAT's mode is cut by the umask; the setting is meant exactly
    return os.fdopen(fd, "wb")


def _flush_and_sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
