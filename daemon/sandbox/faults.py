"""Fault injection: a middleware in front of the API routes and ``/download``.

Per request, in this order:

1. ``outage``: the connection is closed without an answer (any operation).
2. For operations in ``faults.operations`` only: ``latency_ms`` of real sleep; then one
   draw each, in turn, for ``drop_rate`` (close without answering, before anything is
   done), ``error_5xx_rate`` (500, 502 or 503 with a short HTML body, like a proxy in
   front of IPQS), ``rate_limit_403_rate`` (IPQS's documented rate-limit convention, JSON
   ``success: false``) and ``rate_limit_429_rate``; both rate limits send Retry-After.
   Before those draws, ``keyless_status = false`` answers the key-less status form 404,
   and ``redirect_to`` answers 302 to another host (nothing is done).
3. The handler. Uploads then draw ``lost_answer_rate`` after the job is created (when
   ``upload`` is in ``faults.operations``) and, if it hits, close without answering.
4. The odd-answer knobs of :mod:`daemon.sandbox.odd` reshape what the handler answered
   (BOM, JSONP, HTML page, string booleans, status case, missing downloads, trickling...).

Delivery faults act on status and downloads, whatever ``faults.operations`` says:
``status_soft_failures`` answers that many status calls ``success: false`` "An internal
error occurred." (counting down); ``null_link_answers`` gives that many FINISHED status
answers a null link for every set (counting down, in the handler); ``links_dead_seconds``
answers a download HTTP 404 until the job has been FINISHED that long on the sandbox clock
(a CDN that has not caught up; the link is not used up); ``short_results`` serves that many
downloads of an ``all`` set without their last row, whole lines and a matching length (a
file cut at a line end, which only a row count catches).

``invalid_key`` and ``credits`` act inside the handlers, as IPQS answers them;
``account_missing`` makes the account API answer 404 (see :mod:`.account`).

Retry-After carries ``retry_after_seconds`` as written: a whole number for whole seconds
(RFC 9110), a decimal otherwise, so tests can retry fast; clients should parse a float.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from daemon.sandbox import answers, odd
from daemon.sandbox.settings import CHOICE_KNOBS, RATE_KNOBS, Faults
from daemon.sandbox.state import SANDBOX, SandboxState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SERVER_ERRORS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}

# HTTP status nginx logs for "closed the connection without a response".
NO_RESPONSE = 444


class DropConnection(Exception):
    """Raised while handling an API request to close the connection without an answer."""


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.name if resource is not None else None


def operation_of(request: web.Request) -> str | None:
    """``upload``, ``status``, ``list`` or ``download`` for API routes; None otherwise.

    API resources are named ``<operation>:<shape>`` when the routes are added.
    """
    name = _route(request)
    return name.partition(":")[0] if name and ":" in name else None


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count API requests and inject the configured faults (see the module docstring)."""
    operation = operation_of(request)
    if operation is None:
        return await handler(request)
    state = request.config_dict[SANDBOX]
    state.stats.requests[operation] += 1
    try:
        injected = await _inject(request, state, operation)
        if injected is not None:
            return injected
        return await odd.reshape(request, state, operation, await handler(request))
    except DropConnection:
        return _drop(request)
    # The client went away mid-request: reading the body fails under run_app's default,
    # and the handler is cancelled under handler_cancellation (as in TestServer).
    except ConnectionError:
        state.stats.abandoned[operation] += 1
        return _drop(request)
    except asyncio.CancelledError:
        state.stats.abandoned[operation] += 1
        raise


async def _inject(
    request: web.Request, state: SandboxState, operation: str
) -> web.Response | None:
    faults = state.faults
    if faults.outage:
        state.fired("outage")
        raise DropConnection
    if not faults.keyless_status and _route(request) == "status:keyless":
        state.fired("keyless_status_404")
        return web.Response(status=404, text="404: Not Found")
    if operation == "status" and faults.status_soft_failures > 0:
        faults.status_soft_failures -= 1
        state.fired("status_soft_failure")
        return answers.failure(request.match_info.get("fmt", "json"), answers.INTERNAL_ERROR)
    if operation not in faults.operations:
        return None
    if faults.redirect_to:
        state.fired("redirect")
        await _swallow_body(request)
        location = faults.redirect_to.rstrip("/") + request.path_qs
        return web.Response(status=302, headers={"Location": location})
    if faults.latency_ms > 0:
        state.fired("latency")
        await asyncio.sleep(faults.latency_ms / 1000)
    if state.chance(faults.drop_rate):
        state.fired("drop")
        raise DropConnection
    fmt = request.match_info.get("fmt", "json")
    if state.chance(faults.error_5xx_rate):
        state.fired("error_5xx")
        await _swallow_body(request)
        return _server_error(state.pick(tuple(_SERVER_ERRORS)))
    retry_after = {"Retry-After": f"{faults.retry_after_seconds:g}"}
    if state.chance(faults.rate_limit_403_rate):
        state.fired("rate_limit_403")
        return answers.failure(fmt, answers.RATE_LIMITED, status=403, headers=retry_after)
    if state.chance(faults.rate_limit_429_rate):
        state.fired("rate_limit_429")
        return answers.failure(fmt, answers.TOO_MANY_REQUESTS, status=429, headers=retry_after)
    return None


async def _swallow_body(request: web.Request) -> None:
    """Read (and drop) the whole request body, as a gateway that buffers requests does
    before it answers: the client then surely sent it, and the answer never races it."""
    while await request.content.readany():
        pass


def _server_error(status: int) -> web.Response:
    title = f"{status} {_SERVER_ERRORS[status]}"
    body = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
    return web.Response(status=status, text=body, content_type="text/html")


def _drop(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp cannot write this placeholder to the aborted transport; it treats that as
    # a premature client disconnection, logged at debug level only, with no warning.
    return web.Response(status=NO_RESPONSE)


# -- runtime changes through the admin endpoint ---------------------------------------


def _rate(value: object) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def _non_negative(value: object) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return float(value)


def _count_or_none(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a whole number of 0 or more, or null")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a whole number of 0 or more")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _operations(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValueError("must be a list of operation names")
    return frozenset(value)


def _choice(name: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in CHOICE_KNOBS[name]:
            raise ValueError(f"must be one of: {', '.join(CHOICE_KNOBS[name])}")
        return str(value)

    return convert


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _seed(value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("must be a whole number or null")
    return value


# Each converter checks one knob's JSON value; Any because each returns its knob's type.
_KNOBS: dict[str, Callable[[object], Any]] = {
    **dict.fromkeys(RATE_KNOBS, _rate),
    "latency_ms": _non_negative,
    "receive_kib_per_second": _non_negative,
    "retry_after_seconds": _non_negative,
    "credits": _count_or_none,
    "account_missing": _flag,
    "invalid_key": _flag,
    "outage": _flag,
    "operations": _operations,
    "seed": _seed,
    **{name: _choice(name) for name in CHOICE_KNOBS},
    "finished_status": _text,
    "truncate_downloads": _flag,
    "odd_answers": _count_or_none,
    "redirect_to": _text,
    "trickle_ms": _non_negative,
    "keyless_status": _flag,
    "links_dead_seconds": _non_negative,
    "status_soft_failures": _count,
    "null_link_answers": _count,
    "short_results": _count,
}


def update_faults(faults: Faults, changes: Mapping[str, object]) -> None:
    """Apply a partial JSON update, all or nothing; ``ValueError`` names the bad knob."""
    converted: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in _KNOBS:
            raise ValueError(f"unknown fault knob: {name}")
        try:
            converted[name] = _KNOBS[name](value)
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None
    dataclasses.replace(faults, **converted).check()
    for name, value in converted.items():
        setattr(faults, name, value)
