"""Shared fixtures: a sandbox IPQS running for real over HTTP on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from daemon.sandbox import SANDBOX, SandboxSettings, SandboxState, create_app


@dataclass
class RunningSandbox:
    """A started sandbox: ``url`` is its base (``http://127.0.0.1:PORT``)."""

    server: TestServer
    state: SandboxState

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"http://{self.server.host}:{self.server.port}"

    @property
    def api_base(self) -> str:
        """What the daemon's ``api.base_url`` should be set to."""
        return self.url + "/api"

    def uploads(self) -> list[dict[str, object]]:
        """A copy of the upload log: every accepted upload, in arrival order."""
        return list(self.state.uploads)


StartSandbox = Callable[[SandboxSettings], Awaitable[RunningSandbox]]


@pytest.fixture
def sandbox_settings(tmp_path: Path) -> SandboxSettings:
    """Settings for an instant sandbox: every job is FINISHED as soon as it is uploaded."""
    return SandboxSettings(
        new_seconds=0,
        processing_seconds=0,
        per_row_seconds=0,
        spool_dir=tmp_path / "sandbox-spool",
    )


@pytest.fixture
async def start_sandbox() -> AsyncIterator[StartSandbox]:
    """Start sandboxes with any settings on 127.0.0.1, free ports; all stop after the test."""
    servers: list[TestServer] = []

    async def start(settings: SandboxSettings) -> RunningSandbox:
        server = TestServer(create_app(settings), host="127.0.0.1", port=0)
        servers.append(server)
        await server.start_server()
        return RunningSandbox(server, server.app[SANDBOX])

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def sandbox(
    start_sandbox: StartSandbox, sandbox_settings: SandboxSettings
) -> RunningSandbox:
    """The sandbox app served on 127.0.0.1 on a free port, for the length of one test."""
    return await start_sandbox(sandbox_settings)
