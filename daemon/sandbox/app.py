"""The sandbox application: routes, middleware and lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from daemon.sandbox import handlers
from daemon.sandbox.account import account
from daemon.sandbox.admin import admin_app
from daemon.sandbox.faults import Handler, fault_middleware
from daemon.sandbox.settings import SandboxSettings
from daemon.sandbox.state import SANDBOX, SandboxState

# JSON-rows uploads are parsed whole; multipart files are streamed and not limited.
JSON_BODY_LIMIT = 100 * 1024 * 1024

# (name, path under /api/{fmt}/csv, methods). The name's part before ":" is the operation
# the fault knobs aim at. Fixed paths come first so that "status" or "list" is never
# taken for a key.
_API_ROUTES: tuple[tuple[str, str, tuple[str, ...], Handler], ...] = (
    ("upload:keyless", "/upload", ("GET", "POST"), handlers.upload),
    ("status:param", "/status", ("GET", "POST"), handlers.status),
    ("list:keyless", "/list", ("GET", "POST"), handlers.list_jobs),
    ("status:keyless", "/status/{id}", ("GET", "POST"), handlers.status),
    ("status:path", "/{key}/status/{id}", ("GET", "POST"), handlers.status),
    ("list:path", "/{key}/list", ("GET", "POST"), handlers.list_jobs),
    ("upload:path", "/{key}/{type}/upload", ("GET", "POST"), handlers.upload),
)


def create_app(settings: SandboxSettings | None = None) -> web.Application:
    """A faithful IPQS Bulk CSV API emulator with fault knobs; see ``daemon.sandbox``."""
    settings = settings or SandboxSettings()
    settings.faults.check()
    app = web.Application(middlewares=[fault_middleware], client_max_size=JSON_BODY_LIMIT)
    app[SANDBOX] = SandboxState(settings)
    for name, path, methods, handler in _API_ROUTES:
        resource = app.router.add_resource("/api/{fmt:json|xml}/csv" + path, name=name)
        for method in methods:
            resource.add_route(method, handler)
    for name, path in (("account:keyless", ""), ("account:path", "/{key}")):
        resource = app.router.add_resource("/api/{fmt:json|xml}/account" + path, name=name)
        for method in ("GET", "POST"):
            resource.add_route(method, account)
    app.router.add_resource("/download", name="download:link").add_route(
        "GET", handlers.download
    )
    app.add_subapp("/_sandbox/", admin_app())
    app.cleanup_ctx.append(_lifetime)
    return app


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    async with app[SANDBOX].running():
        yield
