"""Shared fixtures: a sandbox IPQS running for real over HTTP on loopback.

Both fixtures start it through :func:`tests.support.sandbox_server`, the one way tests
start a sandbox (tests that need one mid-test use that context manager directly).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from daemon import clocks
from daemon.sandbox import SandboxSettings
from tests.support import REPO, Sandbox, quick_settings, sandbox_server

StartSandbox = Callable[..., Awaitable[Sandbox]]


@pytest.fixture(scope="session", autouse=True)
def checkout_reachable_by_service_users() -> Iterator[None]:
    """Tests run the daemon as unprivileged users, as the unit does. A checkout inside a
    private folder (``mktemp -d`` makes it 0700) would hide the package from them, and the
    as-deployed tests would fail or skip. As root, for the session: the checkout's own
    folder may be listed and entered by others (its files already may be read; Python
    lists a folder on ``sys.path`` to import from it), and each folder above it may be
    passed through (x, never read). Modes are restored afterwards."""
    opened: list[tuple[Path, int]] = []
    if os.geteuid() == 0:
        for folder, needed in ((REPO, stat.S_IROTH | stat.S_IXOTH),
                               *((parent, stat.S_IXOTH) for parent in REPO.parents)):
            mode = stat.S_IMODE(folder.stat().st_mode)
            if mode & needed != needed:
                folder.chmod(mode | needed)
                opened.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(opened):
            folder.chmod(mode)


@pytest.fixture(autouse=True)
def synchronised_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether NTP synchronised this machine's clock is the machine's business, not the
    test's: in-process daemons see a synchronised one unless a test says otherwise."""
    monkeypatch.setattr(clocks, "wall_clock_synced", lambda: True)


@pytest.fixture
def sandbox_settings(tmp_path: Path) -> SandboxSettings:
    """Settings for an instant sandbox: every job is FINISHED as soon as it is uploaded."""
    return quick_settings(tmp_path, spool_dir=tmp_path / "sandbox-spool")


@pytest.fixture
async def start_sandbox() -> AsyncIterator[StartSandbox]:
    """Start sandboxes with any settings (and optionally a ``gate=`` operation to hold);
    all stop after the test."""
    async with AsyncExitStack() as stack:

        async def start(settings: SandboxSettings, *, gate: str | None = None) -> Sandbox:
            return await stack.enter_async_context(sandbox_server(settings, gate=gate))

        yield start


@pytest.fixture
async def sandbox(start_sandbox: StartSandbox, sandbox_settings: SandboxSettings) -> Sandbox:
    """The sandbox app served on 127.0.0.1 on a free port, for the length of one test."""
    return await start_sandbox(sandbox_settings)
