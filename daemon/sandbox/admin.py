"""``/_sandbox/``: inspect and steer the running sandbox. Loopback peers only.

* ``GET  uploads``: every accepted upload, in arrival order.
* ``GET  faults``, ``POST faults`` (a partial JSON object of knobs; 400 on a bad one).
* ``POST clock`` ``{"advance": seconds}``: move the sandbox clock forward.
* ``GET  stats``: requests per operation and faults fired per kind.
* ``POST reset``: forget jobs, links, uploads and stats; faults back to the start values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from daemon.sandbox.faults import update_faults
from daemon.sandbox.state import SANDBOX

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address is on this machine (127.0.0.0/8, ::1, or ::ffff:127.x)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False  # a Unix socket peer or garbage: not provably local
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@web.middleware
async def loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse every peer that is not on this machine."""
    if not is_loopback(request.remote):
        refusal = {"error": "the sandbox admin API answers loopback peers only"}
        return web.json_response(refusal, status=403)
    return await handler(request)


async def _uploads(request: web.Request) -> web.Response:
    return web.json_response({"uploads": request.config_dict[SANDBOX].uploads})


async def _faults(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[SANDBOX].faults.as_json())


async def _change_faults(request: web.Request) -> web.Response:
    state = request.config_dict[SANDBOX]
    try:
        changes = await _json_object(request)
        update_faults(state.faults, changes)
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=400)
    if "seed" in changes:
        state.reseed()  # sending a seed means "reproducible from here", even the same one
    return web.json_response(state.faults.as_json())


async def _clock(request: web.Request) -> web.Response:
    state = request.config_dict[SANDBOX]
    try:
        seconds = (await _json_object(request)).get("advance")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError("advance must be a number of seconds")
        state.advance(seconds)
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=400)
    return web.json_response({"offset": state.offset, "now": state.now()})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[SANDBOX].stats.as_json())


async def _reset(request: web.Request) -> web.Response:
    await request.config_dict[SANDBOX].reset()
    return web.json_response({"reset": True})


async def _json_object(request: web.Request) -> dict[str, object]:
    body = await request.json()  # a JSONDecodeError is a ValueError: answered 400
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def admin_app() -> web.Application:
    """The admin sub-application, to be mounted at ``/_sandbox/``."""
    app = web.Application(middlewares=[loopback_only])
    app.router.add_get("/uploads", _uploads)
    app.router.add_get("/faults", _faults)
    app.router.add_post("/faults", _change_faults)
    app.router.add_post("/clock", _clock)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/reset", _reset)
    return app
