"""``status`` finds its daemons (issue 21 item 2): each publishes its health address in the
spool's ``.daemon/``, so ``health.port = 0`` (any free port) still shows who runs, and how.

Real daemons in subprocesses, on one spool, each with its embedded sandbox.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.spool import Layout, Owner, daemons
from tests.cli_helpers import cli, health_port_config
from tests.support import free_port, start_daemon, wait_for


async def stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), timeout=30)


def published(root: Path) -> list[Path]:
    folder = root / ".daemon"
    return sorted(folder.glob("*.json")) if folder.exists() else []


async def status(config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(cli, "status", "--config", str(config), *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
async def test_two_daemons_with_health_port_0_are_both_shown_ready(tmp_path: Path) -> None:
    config = health_port_config(tmp_path, 0)
    root = tmp_path / "spool"
    first = await start_daemon(config, "--sandbox", stderr=asyncio.subprocess.DEVNULL)
    second = await start_daemon(config, "--sandbox", stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_for(lambda: len(published(root)) == 2 or None not in (
            first.returncode, second.returncode), what="both daemons published")

        async def ready() -> list[dict[str, Any]]:
            return list(json.loads((await status(config, tmp_path, "--json")).stdout)
                        ["daemons"])

        deadline = time.monotonic() + 30
        while not ((found := await ready()) and len(found) == 2
                   and all(d["ready"] for d in found)):  # recovery takes a moment
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.1)
        report = json.loads((await status(config, tmp_path, "--json")).stdout)
        assert sorted(d["pid"] for d in report["daemons"]) == sorted([first.pid, second.pid])
        assert report["daemon"]["ready"] is True
        text = (await status(config, tmp_path)).stdout
        assert "uploads: running" in text.splitlines()
        assert "daemons on this spool: 2" in text
        rows = [line for line in text.splitlines() if line.split()[:1] in
                ([str(first.pid)], [str(second.pid)])]
        assert len(rows) == 2 and all(row.endswith("running") for row in rows)
        # A config naming another port (nobody listens there) finds them the same way.
        elsewhere = health_port_config(tmp_path / "other", free_port(), root=str(root))
        other = json.loads((await status(elsewhere, tmp_path, "--json")).stdout)
        assert len(other["daemons"]) == 2 and other["daemon"]["ready"] is True

        # A clean exit withdraws the address; a killed daemon's is left, and ignored.
        assert await stop(first, signal.SIGTERM) == 0
        assert len(published(root)) == 1
        await stop(second, signal.SIGKILL)
        assert len(published(root)) == 1
        after = json.loads((await status(config, tmp_path, "--json")).stdout)
        assert after["daemons"] == []
        assert after["daemon"]["reachable"] is False
        assert ".daemon" in after["daemon"]["reason"]
    finally:
        for proc in (first, second):
            await stop(proc, signal.SIGKILL)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_published_addresses_skip_the_gone_and_prune_removes_them(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    me = Owner.current()
    mine = daemons.publish(layout, me, "http://127.0.0.1:1234", 0o640)
    gone = daemons.publish(layout, Owner(me.host, dead_pid(), "aaaa"), "http://127.0.0.1:1",
                           0o640)
    earlier_me = daemons.publish(layout, Owner(me.host, me.pid, "bbbb"),
                                 "http://127.0.0.1:2", 0o640)
    elsewhere = daemons.publish(layout, Owner("other-host-1", 1, "cccc"),
                                "http://10.0.0.9:9187", 0o640)
    (layout.daemons / "junk.json").write_text("{not json")
    found = {p.path: p for p in daemons.published(layout, host_id=me.host)}
    assert set(found) == {mine, earlier_me, elsewhere}  # the gone pid is skipped
    assert found[mine].local and not found[elsewhere].local
    assert found[mine].health_url == "http://127.0.0.1:1234"

    daemons.prune(layout, me)
    assert not gone.exists() and not earlier_me.exists()
    assert mine.exists() and elsewhere.exists()  # another host's is not ours to judge
    daemons.withdraw(mine)
    assert [p.path for p in daemons.published(layout, host_id=me.host)] == [elsewhere]
