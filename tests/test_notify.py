"""sd_notify against a real unix datagram socket: the Notifier alone, then a running daemon.

The socket stands in for systemd: it is bound in a temporary folder and named by
``NOTIFY_SOCKET``, exactly as systemd does for ``Type=notify`` services.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.aio import Wakeup
from daemon.notify import Notifier
from daemon.service import Service
from tests.support import (
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    sandbox_server,
    wait_for,
)

Message = dict[str, str]


class Systemd:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram, parsed, in order."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.messages: list[Message] = []

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def receive(self) -> list[Message]:
        """Take every datagram already queued on the socket (never waits)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            lines = data.decode().split("\n")
            self.messages.append(dict(line.split("=", 1) for line in lines))

    async def wait(self, predicate: Callable[[Message], bool], what: str) -> Message:
        """The first message (received so far or later) that satisfies ``predicate``."""
        found: list[Message] = []

        def seen() -> bool:
            found[:] = [m for m in self.receive() if predicate(m)]
            return bool(found)

        await wait_for(seen, what=what)
        return found[0]


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    # A unix socket path must fit in 108 bytes; pytest's tmp_path may not.
    folder = tmp_path if len(str(tmp_path)) < 80 else Path(tempfile.mkdtemp(prefix="sd-"))
    path = folder / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield Systemd(sock, str(path))
    path.unlink(missing_ok=True)
    if folder != tmp_path:
        folder.rmdir()


# -- the Notifier --------------------------------------------------------------------------


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.send(READY="1", STATUS="watching") is False


def test_messages_arrive_as_key_value_lines(systemd: Systemd) -> None:
    notifier = Notifier(systemd.environ())
    assert notifier.enabled
    assert notifier.send(READY="1", STATUS="inbox 0, at IPQS 2")
    assert notifier.send(WATCHDOG="1")
    assert systemd.receive() == [{"READY": "1", "STATUS": "inbox 0, at IPQS 2"},
                                 {"WATCHDOG": "1"}]


def test_abstract_socket_address() -> None:
    name = f"ipqs-bulkd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        systemd = Systemd(sock, "@" + name)
        assert Notifier(systemd.environ()).send(STOPPING="1")
        assert systemd.receive() == [{"STOPPING": "1"}]


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.send(READY="1") is False


def test_watchdog_interval_only_for_this_process() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_seconds == 30.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_seconds == 30.0
    # Meant for a parent or child process, not us.
    theirs = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(theirs).watchdog_seconds is None
    assert Notifier({}).watchdog_seconds is None


# -- a running daemon ----------------------------------------------------------------------


async def test_daemon_reports_ready_status_watchdog_and_stopping(
        tmp_path: Path, systemd: Systemd) -> None:
    async with sandbox_server(quick_settings(tmp_path), gate="list") as sandbox:
        gate = sandbox.gate
        assert gate is not None
        root = tmp_path / "spool"
        notifier = Notifier(systemd.environ(WATCHDOG_USEC="200000"))
        service = Service(daemon_config(root, sandbox.api_base), notifier=notifier)
        service.status_seconds = 0.02
        task = asyncio.create_task(service.run())
        try:
            # Held in recovery (the newest-id lookup): sendto() is synchronous, so a READY
            # sent by now would already be queued on the socket.
            await asyncio.wait_for(gate.arrived.wait(), timeout=30)
            assert systemd.receive() == []
            gate.open()
            first = await systemd.wait(lambda m: "READY" in m, "READY=1")
            assert first == {"READY": "1", "STATUS": "watching inboxes"}
            assert systemd.messages[0] is first  # nothing before READY
            assert service.health.recovered and service.health.watching

            drop(root, "email", "list.csv", emails(3))
            await systemd.wait(lambda m: m.get("STATUS", "").endswith("done 1, failed 0"),
                               "STATUS with the finished file")
            await wait_for(lambda: sum("WATCHDOG" in m for m in systemd.receive()) >= 2,
                           what="watchdog pings")
        finally:
            service.stop.set()
            assert await asyncio.wait_for(task, timeout=30) == 0

    messages = systemd.receive()
    assert "list.csv" in records(root, "done")
    assert messages[-1] == {"STOPPING": "1", "STATUS": "finishing uploads under way"}
    assert all(m == {"WATCHDOG": "1"} for m in messages if "WATCHDOG" in m)
    statuses = [m["STATUS"] for m in messages if set(m) == {"STATUS"}]
    assert statuses[0] == "inbox 0, queued 0, uploading 0, at IPQS 0, done 0, failed 0"
    # Sent when it changes, not every round.
    assert all(a != b for a, b in itertools.pairwise(statuses))


async def test_a_wakeup_set_in_a_worker_thread_wakes_the_loop() -> None:
    wakeup = Wakeup()
    wakeup.bind(asyncio.get_running_loop())
    waiter = asyncio.create_task(wakeup.event.wait())
    await asyncio.to_thread(wakeup.set)  # as the spool does, from asyncio.to_thread
    await asyncio.wait_for(waiter, timeout=5)
    assert wakeup.event.is_set()


async def test_work_wakes_the_status_line_of_an_idle_daemon(
        tmp_path: Path, systemd: Systemd) -> None:
    async with sandbox_server(quick_settings(tmp_path), gate="upload") as sandbox:
        gate = sandbox.gate
        assert gate is not None
        root = tmp_path / "spool"
        service = Service(daemon_config(root, sandbox.api_base),
                          notifier=Notifier(systemd.environ()))
        # Far beyond the wait below: only a wake-up by the work can send the line in time.
        service.idle_status_seconds = 3600.0
        task = asyncio.create_task(service.run())
        try:
            await systemd.wait(lambda m: m.get("STATUS", "").startswith("inbox 0, queued 0"),
                               "the idle status line")
            drop(root, "email", "list.csv", emails(3))
            # Claimed, and held at the upload by the gate.
            await asyncio.wait_for(
                systemd.wait(lambda m: "uploading 1," in m.get("STATUS", ""), "uploading 1"),
                timeout=5)
            await asyncio.wait_for(gate.arrived.wait(), timeout=30)
            gate.open()
            await asyncio.wait_for(
                systemd.wait(lambda m: m.get("STATUS", "").endswith("done 1, failed 0"),
                             "done 1"), timeout=5)
        finally:
            service.stop.set()
            assert await asyncio.wait_for(task, timeout=30) == 0
    assert "list.csv" in records(root, "done")


async def test_a_crashed_stage_stops_the_daemon_with_a_failure_status(
        tmp_path: Path, systemd: Systemd) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        service = Service(daemon_config(tmp_path / "spool", sandbox.api_base),
                          notifier=Notifier(systemd.environ()))
        task = asyncio.create_task(service.run())
        await systemd.wait(lambda m: "READY" in m, "READY=1")

        async def broken_stage() -> None:
            raise RuntimeError("a bug")

        service._spawn(broken_stage(), "broken")
        # Non-zero, so that systemd's Restart=on-failure restarts the daemon.
        assert await asyncio.wait_for(task, timeout=30) == 1
    assert systemd.receive()[-1]["STOPPING"] == "1"
