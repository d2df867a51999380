"""Odd answers: what IPQS's answers may look like by the time they reach a client.

Real answers pass through CDNs, gateways and firewalls, and IPQS documents little of their
shape (ipqs-api.md §6: parse leniently, every field nullable). Each knob below turns the
sandbox's tidy answer into one such variant, so that clients stay tested against them. All
act only on operations in ``faults.operations``, and always *after* the handler has acted:
an upload answered with an HTML page has still created its job.

* ``booleans``: ``json`` | ``string`` (``"true"``) | ``number`` (``1``), for ``success``
  and ``aborted``.
* ``status_case``: ``upper`` | ``lower`` | ``title``; ``finished_status``: the word a
  finished job is reported with (``COMPLETED``...), before the case is applied.
* ``downloads_form``: ``object`` | ``missing`` | ``empty_list``: a FINISHED status answer
  without its ``downloads`` object, or with ``[]``.
* ``answer_form``: ``json`` | ``bom`` (a UTF-8 BOM first) | ``jsonp`` (``callback({...});``)
  | ``junk`` (an HTML comment after the JSON) | ``html`` (a CDN's "Service temporarily
  unavailable" page, HTTP 200 ``text/html``; on a download too) | ``empty`` (no body).
* ``truncate_downloads``: a download is sent without Content-Length and the connection is
  closed in the middle of a line, half-way through the file.
* ``odd_answers``: how many more answers ``answer_form``, ``downloads_form`` and
  ``truncate_downloads`` act on (null: every one); each use counts one down.
* ``trickle_ms``: the answer's body goes out one byte every ``trickle_ms`` ms.
* ``redirect_to`` (acts in the fault middleware, before the handler): answer 302 with a
  Location at this base URL, the request's path and query kept.
* ``keyless_status = false``: the key-less ``/status/{id}`` form answers 404.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from daemon.sandbox.settings import Faults
from daemon.sandbox.state import FINISHED, SandboxState

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Service temporarily unavailable</title>"
             b"</head><body><h1>Service temporarily unavailable</h1><p>The server is "
             b"temporarily unable to service your request. Please try again later.</p>"
             b"</body></html>\n")
_JUNK = b"\n<!-- served by edge-cache-07 in 3 ms -->\n"
_BOM = b"\xef\xbb\xbf"


def take_odd(state: SandboxState) -> bool:
    """Whether one more answer may be odd; counts ``odd_answers`` down."""
    left = state.faults.odd_answers
    if left is None:
        return True
    if left <= 0:
        return False
    state.faults.odd_answers = left - 1
    return True


async def reshape(request: web.Request, state: SandboxState, operation: str,
                  response: web.StreamResponse) -> web.StreamResponse:
    """The handler's answer to an API call, in the form the knobs ask for."""
    faults = state.faults
    if (operation == "download" or operation not in faults.operations
            or not isinstance(response, web.Response) or response.prepared
            or not isinstance(response.body, bytes)):
        return response
    body, content_type = response.body, response.headers.get(hdrs.CONTENT_TYPE, "")
    if content_type.startswith("application/json") and _restyles(faults):
        body = json.dumps(_restyle(json.loads(body), state, operation)).encode()
    if faults.answer_form != "json" and take_odd(state):
        state.fired(f"answer_{faults.answer_form}")
        body, content_type = _reform(faults.answer_form, body, content_type)
    headers = {k: v for k, v in response.headers.items()
               if k not in (hdrs.CONTENT_LENGTH, hdrs.CONTENT_TYPE)}
    headers[hdrs.CONTENT_TYPE] = content_type
    if faults.trickle_ms > 0:
        state.fired("trickle")
        return await trickle(request, response.status, headers, body, faults.trickle_ms)
    return web.Response(status=response.status, body=body, headers=headers)


def _restyles(faults: Faults) -> bool:
    return (faults.booleans != "json" or faults.status_case != "upper"
            or faults.finished_status != FINISHED or faults.downloads_form != "object")


def _restyle(data: Any, state: SandboxState, operation: str) -> Any:
    if not isinstance(data, dict):
        return data
    faults = state.faults
    finished = data.get("status") == FINISHED
    csvs = data.get("csvs")
    items: list[Any] = csvs if isinstance(csvs, list) else []
    for item in [data, *items]:
        for name in ("success", "aborted"):
            if isinstance(item.get(name), bool):
                item[name] = _boolean(item[name], faults.booleans)
        if isinstance(item.get("status"), str):
            item["status"] = _status(item["status"], faults)
    if (operation == "status" and finished and faults.downloads_form != "object"
            and take_odd(state)):
        state.fired(f"downloads_{faults.downloads_form}")
        if faults.downloads_form == "missing":
            data.pop("downloads", None)
        else:
            data["downloads"] = []
    return data


def _boolean(value: bool, style: str) -> object:
    if style == "string":
        return "true" if value else "false"
    return int(value) if style == "number" else value


def _status(word: str, faults: Faults) -> str:
    word = faults.finished_status if word == FINISHED else word
    if faults.status_case == "lower":
        return word.lower()
    return word.title() if faults.status_case == "title" else word


def _reform(form: str, body: bytes, content_type: str) -> tuple[bytes, str]:
    if form == "bom":
        return _BOM + body, content_type
    if form == "jsonp":
        return b"callback(" + body + b");", "application/javascript"
    if form == "junk":
        return body + _JUNK, content_type
    if form == "html":
        return HTML_PAGE, "text/html; charset=utf-8"
    return b"", content_type  # "empty"


async def trickle(request: web.Request, status: int, headers: dict[str, str], body: bytes,
                  delay_ms: float) -> web.StreamResponse:
    """Send ``body`` one byte every ``delay_ms`` ms, with its true Content-Length."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    for index in range(len(body)):
        await asyncio.sleep(delay_ms / 1000)
        await response.write(body[index:index + 1])
    await response.write_eof()
    return response


async def odd_download(request: web.Request, state: SandboxState, headers: dict[str, str],
                       path: Path) -> web.StreamResponse | None:
    """A download answered as the knobs ask (an HTML page, cut short, trickled), or None
    for the ordinary answer."""
    faults = state.faults
    if "download" not in faults.operations:
        return None
    if faults.answer_form == "html" and take_odd(state):
        state.fired("answer_html")
        return web.Response(body=HTML_PAGE, content_type="text/html", charset="utf-8")
    if faults.truncate_downloads and take_odd(state):
        state.fired("truncated_download")
        return await _cut_short(request, headers, await asyncio.to_thread(path.read_bytes))
    if faults.trickle_ms > 0:
        state.fired("trickle")
        data = await asyncio.to_thread(path.read_bytes)
        return await trickle(request, 200, headers, data, faults.trickle_ms)
    return None


async def _cut_short(request: web.Request, headers: dict[str, str],
                     data: bytes) -> web.StreamResponse:
    """Half the file, ending mid-line, with no Content-Length; then the connection closes.

    Written to the socket by hand: aiohttp would frame a length-less answer as chunked,
    and a client can tell a cut chunked body from a whole one.
    """
    cut = max(1, len(data) // 2)
    while cut > 1 and data[cut - 1:cut] in (b"\n", b"\r"):
        cut -= 1  # end inside a line, as a connection cut at random mostly does
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    transport = request.transport
    if transport is not None:
        transport.write(f"HTTP/1.1 200 OK\r\n{head}Connection: close\r\n\r\n".encode()
                        + data[:cut])
        transport.close()
    return web.Response(status=444)  # never sent: the transport is closed (see faults)
