"""Reading what a request carries: parameters, and for uploads the file, rows or link.

Parameters come from the query string, then a urlencoded or multipart form, or a JSON
object body, later sources winning (IPQS takes parameters by GET or POST, and ``key`` and
``type`` also in a JSON body; which source wins is an assumption). The key comes from the
path, else the ``key`` parameter, else the ``IPQS-KEY`` header (assumption: IPQS's
precedence is not documented). The CSV id of key-less status calls is the ``id``
parameter (assumption).

Uploads pick their method by what arrives: a multipart file part (any field name, the
first one wins) is the file method; an ``input`` array in a JSON body is the rows method;
otherwise a ``url`` or string ``input`` parameter is the link method.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import BodyPartReader, web

from daemon.sandbox import answers
from daemon.sandbox.samples import fabricate_rows
from daemon.sandbox.spool import SpooledFile, SpoolWriter, spool_rows

CHUNK_SIZE = 1 << 18
FIELD_LIMIT = 1 << 16
URL_SCHEMES = frozenset({"http", "https", "ftp"})


class Refused(Exception):
    """The upload cannot be accepted; the message is the answer's ``message``."""


@dataclass
class Incoming:
    """What an upload request carried. ``problem`` is a reason to refuse found on the way."""

    params: dict[str, str] = field(default_factory=dict)
    file: SpooledFile | None = None
    method: str | None = None  # "multipart" or "json" once a file has been stored
    problem: str | None = None

    def discard(self) -> None:
        """Remove the received file unless a job has adopted it (moved it away)."""
        if self.file is not None:
            self.file.path.unlink(missing_ok=True)


def api_key(request: web.Request, params: Mapping[str, str]) -> str:
    """The key from the path, a parameter or the ``IPQS-KEY`` header."""
    key = request.match_info.get("key") or params.get("key") or request.headers.get("IPQS-KEY")
    return (key or "").strip()


async def read_params(request: web.Request) -> dict[str, str]:
    """Parameters of a non-upload call: query, then form or JSON body fields."""
    params = dict(request.query)
    if request.content_type == "application/json":
        body = await _json_body(request)
        params.update(_strings(body) if body is not None else {})
    elif request.method == "POST" and request.content_type in _FORM_TYPES:
        form = await request.post()
        params.update({name: value for name, value in form.items() if isinstance(value, str)})
    return params


_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


async def receive_upload(request: web.Request, incoming: Incoming, spool_path: Path, *,
                         kib_per_second: float = 0) -> None:
    """Read an upload request into ``incoming``, streaming any file to ``spool_path`` (no
    faster than ``kib_per_second`` when it is above 0).

    The caller owns ``incoming`` so that it can discard a stored file whatever happens
    later, a client going away in the middle of a later form field included.
    """
    incoming.params.update(request.query)
    if request.content_type == "multipart/form-data":
        await _receive_multipart(request, incoming, spool_path, kib_per_second)
    elif request.content_type == "application/json":
        await _receive_json(request, incoming, spool_path)
    else:
        incoming.params.update(await read_params(request))


async def _receive_multipart(request: web.Request, incoming: Incoming, spool_path: Path,
                             kib_per_second: float = 0) -> None:
    if request.content_length is None:
        # IPQS warns that multipart uploads without a computed Content-Length fail.
        incoming.problem = answers.NO_CONTENT_LENGTH
        return
    try:
        await _read_parts(await request.multipart(), incoming, spool_path, kib_per_second)
    except ValueError:
        incoming.problem = answers.MALFORMED
    except Refused as refused:
        incoming.problem = str(refused)


async def _read_parts(reader: aiohttp.MultipartReader, incoming: Incoming, path: Path,
                      kib_per_second: float = 0) -> None:
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            await part.release()  # a nested multipart: not something IPQS takes
        elif part.filename is None:
            incoming.params[part.name or ""] = await _read_field(part)
        elif incoming.file is None:
            incoming.file = await _spool_part(part, path, kib_per_second)
            incoming.method = "multipart"
        else:
            # Read to the end anyway: answering before the client has sent everything
            # would make it see a broken connection instead of the answer.
            incoming.problem = answers.MANY_FILES
            await part.release()


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_SIZE):
        data += chunk
        if len(data) > FIELD_LIMIT:
            raise Refused(answers.FIELD_TOO_LARGE)
    return data.decode("utf-8", errors="replace")


async def _spool_part(part: BodyPartReader, path: Path, kib_per_second: float = 0) -> SpooledFile:
    with SpoolWriter(path) as sink:
        while chunk := await part.read_chunk(CHUNK_SIZE):
            sink.write(chunk)
            if kib_per_second > 0:  # a slow link: this chunk's share of a second
                await asyncio.sleep(len(chunk) / 1024 / kib_per_second)
    return sink.result


async def _receive_json(request: web.Request, incoming: Incoming, spool_path: Path) -> None:
    body = await _json_body(request)
    if body is None:
        incoming.problem = answers.BAD_JSON
        return
    incoming.params.update(_strings(body))
    rows = body.get("input")
    if isinstance(rows, list):
        incoming.problem = _rows_problem(rows)
        if incoming.problem is None:
            incoming.file, incoming.method = spool_rows(spool_path, rows), "json"


async def _json_body(request: web.Request) -> dict[str, object] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _strings(body: Mapping[str, object]) -> dict[str, str]:
    return {name: value for name, value in body.items() if isinstance(value, str)}


def _rows_problem(rows: list[object]) -> str | None:
    if not rows:
        return answers.EMPTY_INPUT
    for row in rows:
        if not isinstance(row, list) or not all(isinstance(cell, str) for cell in row):
            return answers.BAD_ROWS
    return None


def whole_number(text: str | None) -> int | None:
    """A plain run of ASCII digits as an int; None for anything else (int() takes "+1_0")."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def link_of(params: Mapping[str, str]) -> str | None:
    """The upload-by-URL link, from ``url`` or a string ``input``."""
    return params.get("url") or params.get("input") or None


async def spool_link(
    url: str, file_type: str, path: Path, http: aiohttp.ClientSession | None
) -> SpooledFile:
    """Store the file behind ``url``: fetched when ``http`` is given, else made up."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in URL_SCHEMES or not parts.hostname:
        raise Refused(answers.BAD_URL)
    if http is None:
        return spool_rows(path, fabricate_rows(file_type, url))
    if parts.scheme.lower() == "ftp" or not _is_loopback_host(parts.hostname):
        # The sandbox must never become a way to reach other hosts.
        raise Refused(answers.FETCH_FAILED)
    return await _fetch(http, url, path)


async def _fetch(http: aiohttp.ClientSession, url: str, path: Path) -> SpooledFile:
    try:
        async with http.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise Refused(answers.FETCH_FAILED)
            with SpoolWriter(path) as sink:
                async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                    sink.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise Refused(answers.FETCH_FAILED) from error
    return sink.result


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
