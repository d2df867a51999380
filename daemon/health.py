"""The optional health listener: ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.config import ConfigError
from daemon.metrics import Metrics

DEGRADED_PREFIX = "degraded: "
#: Ready, but something is off that the operator should know (``caveats``).
CAVEAT_PREFIX = "ready, but: "


@dataclass
class HealthState:
    """What the probes report; the service keeps it current."""

    recovered: bool = False
    watching: bool = False
    paused_reason: Callable[[], str | None] = lambda: None
    #: Conditions that degrade the daemon (each says why, or None when it does not hold).
    troubles: list[Callable[[], str | None]] = field(default_factory=list)
    #: The account's balance as the credit guard knows it (None: unknown or not checked).
    credits: Callable[[], int | None] = lambda: None
    #: Files waiting in the inboxes for a reason people should hear of (e.g. "unreadable").
    waiting: Callable[[], dict[str, int]] = dict
    #: What is off without making the daemon unready (e.g. an unsynchronised wall clock).
    caveats: list[str] = field(default_factory=list)
    #: Conditions worth a warning that do not make the daemon unready (e.g. low disk):
    #: a sidecar's readiness is its pod's, so only what stops delivery may take it away.
    warnings: list[Callable[[], str | None]] = field(default_factory=list)

    def notes(self) -> list[str]:
        """The caveats in force now: the fixed ones and the warnings that hold."""
        return [*self.caveats, *(why for check in self.warnings if (why := check()) is not None)]

    def ready(self) -> tuple[bool, str]:
        if not self.recovered:
            return False, "recovering jobs left in processing/"
        if not self.watching:
            return False, "inbox watcher not running"
        reason = self.paused_reason()
        if reason is not None:
            # The money guards' reasons say "paused: ..." or "waiting ..." themselves.
            if reason.startswith(("paused: ", "waiting ")):
                return False, reason
            return False, f"uploads paused: {reason}"
        troubles = [why for check in self.troubles if (why := check()) is not None]
        if troubles:
            return False, DEGRADED_PREFIX + "; ".join(troubles)
        if notes := self.notes():
            return True, CAVEAT_PREFIX + "; ".join(notes)
        return True, "ready"


def create_app(state: HealthState, metrics: Metrics,
               refresh: Callable[[], object] | None = None) -> web.Application:
    """The health application; served by :class:`HealthServer`.

    ``refresh`` is called before each ``/metrics`` answer, so that gauges read from the
    stages (queue depth, jobs in flight) are as of the scrape, not of the last status round.
    """

    async def healthz(_request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ok, why = state.ready()
        body: dict[str, object] = {"ready": ok, "reason": why, "credits": state.credits(),
                                   "waiting": state.waiting()}
        if notes := state.notes():  # ready, but something is off
            body["caveats"] = notes
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_view(_request: web.Request) -> web.Response:
        if refresh is not None:
            refresh()
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


class HealthServer:
    """Runs the health application on ``host:port`` until closed.

    ``port`` is the bound port once :meth:`start` returned (``port = 0`` picks a free one).
    A listener that cannot start is a :class:`ConfigError` naming ``health.host`` or
    ``health.port``: running on without it would leave liveness probes failing (and
    ``status`` reading another daemon's ``/readyz``).
    """

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._host = host
        self._port = port
        self.port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:  # e.g. the port is taken: leave nothing half set up behind
            await self._runner.cleanup()
            raise bind_error(exc, self._host, self._port) from None
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else self._port

    async def close(self) -> None:
        await self._runner.cleanup()


def reach_url(host: str, port: int) -> str:
    """Where a client on this host reaches a listener bound to ``host:port``
    (``http://HOST:PORT``): a wildcard address is reached on loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def bind_error(exc: OSError, host: str, port: int) -> ConfigError:
    """Why the listener cannot start, as one line naming the setting to change."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"config key health.host: cannot resolve {host!r} ({exc.strerror})")
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"config key health.port: {where} is already in use (another "
                           "ipqs-bulkd?): give each daemon its own health.port, 0 for any "
                           "free port, or set health.enabled = false")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"config key health.host: {host!r} is not an address of this host")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(f"config key health.port: {where} needs privileges; use a port "
                           "above 1023")
    return ConfigError(f"config key health.host/health.port: cannot listen on {where} "
                       f"({exc.strerror or exc})")
