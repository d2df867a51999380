"""Helpers for end-to-end tests: a real sandbox on loopback, a daemon over a real spool."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from asyncio.subprocess import DEVNULL, PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon import ALL_TYPES
from daemon.config import (
    Config,
    HealthConfig,
    PollConfig,
    SpoolConfig,
    UploadConfig,
    WatchConfig,
    load_config,
)
from daemon.sandbox import SANDBOX, SandboxSettings, SandboxState, create_app
from daemon.sandbox.faults import operation_of
from daemon.service import Service

REPO = Path(__file__).resolve().parent.parent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Obviously fake; the sandbox accepts any non-empty key by default.
FAKE_KEY = "fake-key-for-tests-0000"


@dataclass
class Gate:
    """Holds every sandbox request of one operation until opened (nothing else sleeps)."""

    operation: str
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def open(self) -> None:
        self.opened.set()


@dataclass
class Sandbox:
    """A started sandbox: ``url`` is its base (``http://127.0.0.1:PORT``); ``gate`` holds
    the requests of one operation when the sandbox was started with one."""

    server: TestServer
    state: SandboxState
    gate: Gate | None = None

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return str(self.server.make_url("")).rstrip("/")

    @property
    def api_base(self) -> str:
        """What the daemon's ``api.base_url`` should be set to."""
        return self.url + "/api"

    def uploads(self) -> list[dict[str, Any]]:
        """A copy of the upload log: every accepted upload, in arrival order."""
        return list(self.state.uploads)


def quick_settings(tmp_path: Path, **kw: Any) -> SandboxSettings:
    """A sandbox that finishes jobs at once, keeping its files under ``tmp_path``."""
    base: dict[str, Any] = {"new_seconds": 0, "processing_seconds": 0, "per_row_seconds": 0,
                            "spool_dir": tmp_path / "sandbox"}
    base.update(kw)
    return SandboxSettings(**base)


@asynccontextmanager
async def sandbox_server(settings: SandboxSettings, *, gate: str | None = None,
                         answer_seconds: float = 0.0) -> AsyncIterator[Sandbox]:
    """The one way tests start a sandbox: served on 127.0.0.1, a free port, until the
    block ends. With ``gate``, requests of that operation (e.g. "list", which the daemon
    calls during recovery) wait at :attr:`Sandbox.gate` until it is opened. With
    ``answer_seconds``, IPQS makes an uploaded job at once but answers only that much
    later (unlike ``faults.latency_ms``, which delays before the job is made)."""
    app = create_app(settings)
    held = Gate(gate) if gate is not None else None
    if held is not None:
        app.middlewares.append(_holding(held))
    if answer_seconds:
        app.middlewares.append(_slow_answers(answer_seconds))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Sandbox(server, app[SANDBOX], held)
    finally:
        if held is not None:
            held.open()
        await server.close()


def _slow_answers(seconds: float) -> Any:
    @web.middleware
    async def slow(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if operation_of(request) == "upload":
            await asyncio.sleep(seconds)
        return response

    return slow


def _holding(gate: Gate) -> Any:
    @web.middleware
    async def hold(request: web.Request, handler: Handler) -> web.StreamResponse:
        if operation_of(request) == gate.operation:
            gate.arrived.set()
            await gate.opened.wait()
        response: web.StreamResponse = await handler(request)
        return response

    return hold


def daemon_config(root: Path, api_base: str, **sections: dict[str, Any]) -> Config:
    """Config for a test daemon: fast timings everywhere, health listener off."""
    config = load_config(None, {"IPQS_API_KEY": FAKE_KEY})
    config = dataclasses.replace(
        config,
        api=dataclasses.replace(config.api, base_url=api_base, read_timeout=10.0),
        spool=SpoolConfig(root=root, types=ALL_TYPES),
        watch=WatchConfig(settle_seconds=0.05, quiet_seconds=1.0, writer_check="proc",
                          rescan_seconds=2.0),
        upload=UploadConfig(retry_initial_seconds=0.01, retry_max_seconds=0.1,
                            lookup_delay_seconds=0.05),
        poll=PollConfig(initial_seconds=0.02, max_seconds=0.2, factor=1.5),
        health=HealthConfig(enabled=False),
    )
    for name, values in sections.items():
        config = dataclasses.replace(
            config, **{name: dataclasses.replace(getattr(config, name), **values)})
    return config


def write_config_file(path: Path, config: Config) -> Path:
    """``config`` as a TOML file, for a daemon started as a subprocess."""
    lines = []
    for section, values in config.as_dict(redact=False).items():
        lines.append(f"[{section}]")
        # JSON literals of strings, numbers, booleans and string lists are valid TOML.
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_daemon(config_file: Path, *args: str, stdout: int | IO[bytes] = DEVNULL,
                       stderr: int | IO[bytes] = PIPE,
                       wrap: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
    """The one way tests run the daemon as a child process: ``python -m daemon run`` with
    ``args`` (under ``wrap``, e.g. ``unshare``), in a session of its own, configured by
    ``config_file`` alone (see :func:`write_config_file`: the key is in it, and an
    ``IPQS_API_KEY`` of the test's own environment is not passed on).

    Its logs go to ``stderr``: a pipe by default, which the test must read (an unread
    pipe blocks the child once full); pass ``DEVNULL`` or a file otherwise."""
    env = {**os.environ, "IPQS_BULKD_CONFIG": str(config_file)}
    env.pop("IPQS_API_KEY", None)
    return await asyncio.create_subprocess_exec(
        *wrap, sys.executable, "-m", "daemon", "run", *args, env=env, stdin=DEVNULL,
        stdout=stdout, stderr=stderr, start_new_session=True)


async def run_once(config: Config) -> int:
    return await Service(config).run(once=True)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Service]:
    """A daemon running in the background of the test's event loop."""
    service = Service(config)
    task = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: service.health.watching or task.done(), what="daemon ready")
        yield service
    finally:
        service.stop.set()
        await asyncio.wait_for(task, timeout=30)


async def wait_for(predicate: Callable[[], bool], *, timeout: float = 30.0,
                   what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def job_state(root: Path) -> str | None:
    """The state in the record of the (first) job in ``root``'s processing/, if any."""
    for record in (root / "processing").glob("*/job.json"):
        return str(json.loads(record.read_text()).get("state"))
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records(root: Path, outcome: str, file_type: str = "email") -> dict[str, dict[str, Any]]:
    folder = root / outcome / file_type
    if not folder.exists():
        return {}
    return {p.name[:-5]: json.loads(p.read_text()) for p in folder.glob("*.json")}


def drop(root: Path, file_type: str, name: str, data: bytes) -> Path:
    """Write elsewhere, then rename into the inbox: how files should be dropped."""
    inbox = root / "inbox" / file_type
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = root / f".staging-{abs(hash(name))}"
    tmp.write_bytes(data)
    tmp.rename(inbox / name)
    return inbox / name


def emails(n: int, seed: str = "") -> bytes:
    return "".join(f"user{i}{seed}@example.com\n" for i in range(n)).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def get_readyz(port: int) -> tuple[int, dict[str, object]]:
    """``/readyz`` of a daemon's health listener on 127.0.0.1: status and JSON body."""
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


async def get_metrics(port: int) -> str:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        return await resp.text()


async def is_ready(port: int) -> bool:
    try:
        return (await get_readyz(port))[0] == 200
    except aiohttp.ClientError:
        return False


async def until(check: Callable[[], Awaitable[bool]], what: str,
                timeout: float = 60.0) -> None:
    """Like :func:`wait_for`, for a check that must be awaited (e.g. over HTTP)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
