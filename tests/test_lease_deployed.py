"""Issue 16 as a user meets it: the daemon run as the systemd unit runs it (an unprivileged
user, /proc showing only its own processes), a writer of another user pausing mid-write
for longer than twice ``quiet_seconds``. With CAP_LEASE the lease probe sees that writer;
without it the daemon says so once and falls back to the quiet window."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.shares import daemon_process, samba_share
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    sandbox_server,
    sha256,
    wait_for,
    write_config_file,
)
from tests.test_shares import paid, slow_put, split

AS_DEPLOYED = "/work/shared/tools/as-deployed"
USER = "nobody"
PAUSE = 8.0  # the writer's pause: more than twice QUIET
QUIET = 3.0

pytestmark = pytest.mark.slow


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A folder the daemon's user can reach (tmp_path's parents are root's alone), with
    the spool in it owned by that user."""
    if os.geteuid() != 0 or not os.access(AS_DEPLOYED, os.X_OK) or not shutil.which("setpriv"):
        pytest.skip("needs root, setpriv and the as-deployed tool")
    folder = Path("/tmp") / f"ipqs-deployed-{os.getpid()}-{tmp_path.name}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "spool").mkdir()
    shutil.chown(folder / "spool", USER, "nogroup")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def deployed_config(base: Path, sandbox: Sandbox, **watch: Any) -> Path:
    config = daemon_config(base / "spool", sandbox.api_base, spool={"types": ("email",)},
                           watch={"writer_check": "auto", "settle_seconds": 0.05,
                                  "quiet_seconds": QUIET, "rescan_seconds": 1.0, **watch},
                           log={"level": "info", "format": "json"})
    path = write_config_file(base / "config.toml", config)
    path.chmod(0o644)  # the key in it is a fake one
    return path


def events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == name:
            found.append(json.loads(line))
    return found


@asynccontextmanager
async def deployed(base: Path, config: Path, lease: bool) -> AsyncIterator[Path]:
    """The daemon as the unit runs it, as ``nobody`` (with CAP_LEASE if ``lease``); yields
    its log once it is ready."""
    log = base / "daemon.log"
    wrap = (AS_DEPLOYED, "--user", USER, *(["--lease"] if lease else []), "--")
    async with daemon_process(config, log, wrap=wrap) as proc:
        await wait_for(lambda: "daemon_ready" in log.read_text() or proc.returncode is not None,
                       what="daemon_ready")
        assert proc.returncode is None, log.read_text()
        yield log
        assert proc.returncode is None, log.read_text()  # alive to the end


async def pausing_writer(target: Path, data: bytes, sandbox: Sandbox,
                         wrap: tuple[str, ...] = ()) -> float:
    """Root writes half of ``data`` into ``target`` in place, pauses PAUSE seconds (checking
    that nothing was uploaded), writes the rest and closes; returns when it closed."""
    half = len(data) // 2
    staged = target.parent.parent.parent / ".parts"
    staged.mkdir(exist_ok=True)
    (staged / "a").write_bytes(data[:half])
    (staged / "b").write_bytes(data[half:])
    script = 'exec 3>"$1"; cat "$2" >&3; echo half; read go; cat "$3" >&3; exec 3>&-; echo done'
    proc = await asyncio.create_subprocess_exec(
        *wrap, "sh", "-c", script, "sh", str(target), str(staged / "a"), str(staged / "b"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert await proc.stdout.readline() == b"half\n"
    paused = time.monotonic()
    while time.monotonic() - paused < PAUSE:  # the writer is slow: that is the scenario
        await asyncio.sleep(0.5)
        assert sandbox.uploads() == [], f"uploaded {time.monotonic() - paused:.1f} s into the pause"
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    assert await proc.stdout.readline() == b"done\n"
    closed = time.monotonic()
    assert sandbox.uploads() == []
    await proc.wait()
    return closed


@pytest.mark.parametrize("namespace", [False, True], ids=["root", "other-pid-mount-ns"])
async def test_a_paused_writer_of_another_user_is_waited_for_with_cap_lease(
        tmp_path: Path, base: Path, namespace: bool) -> None:
    data = emails(4000, "-paused")
    wrap = ("unshare", "-p", "-f", "-m", "--mount-proc") if namespace else ()
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = deployed_config(base, sandbox)
        async with deployed(base, config, lease=True) as log:
            target = base / "spool" / "inbox" / "email" / "paused.csv"
            closed = await pausing_writer(target, data, sandbox, wrap)
            await wait_for(lambda: "paused.csv" in records(base / "spool", "done"),
                           what="paused.csv done")
            taken = time.monotonic() - closed
    assert paid(sandbox) == {sha256(data): 1}  # exactly one upload, of the whole file
    assert (base / "spool" / "done" / "email" / "paused.csv").read_bytes() == data
    [mode] = events(log, "writer_check_mode")
    assert (mode["check"], mode["writers_visible"]) == ("lease", False)  # /proc sees nobody
    assert [e["check"] for e in events(log, "writer_check_chosen")] == ["lease"]
    assert len(events(log, "file_held_by_writer")) == 1
    assert events(log, "lease_probe_unavailable") == []
    print(f"\nwriter ({'namespace' if namespace else 'root'}): paused {PAUSE} s, "
          f"done {taken:.2f} s after it closed, uploads={len(sandbox.uploads())}")


async def test_without_cap_lease_the_quiet_window_decides_and_says_so_once(
        tmp_path: Path, base: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = deployed_config(base, sandbox)
        async with deployed(base, config, lease=False) as log:
            started = time.monotonic()
            drop(base / "spool", "email", "first.csv", emails(10, "-1"))
            await wait_for(lambda: "first.csv" in records(base / "spool", "done"),
                           what="first.csv done")
            waited = time.monotonic() - started
            drop(base / "spool", "email", "second.csv", emails(10, "-2"))
            await wait_for(lambda: "second.csv" in records(base / "spool", "done"),
                           what="second.csv done")
    [refused] = events(log, "lease_probe_unavailable")  # said once, at start
    assert "CAP_LEASE" in refused["reason"] and refused["fallback"] == "quiet"
    [mode] = events(log, "writer_check_mode")
    assert (mode["check"], mode["window"]) == ("quiet", QUIET)
    assert [e["check"] for e in events(log, "writer_check_chosen")] == ["quiet"]
    assert waited >= QUIET - 0.5  # by the quiet window (less the mtime credit of a fresh file)
    assert len(sandbox.uploads()) == 2


async def test_a_slow_smb_put_to_a_daemon_with_cap_lease_is_uploaded_once_complete(
        tmp_path: Path, base: Path) -> None:
    # smbd (as root) holds the file open while smbclient trickles it in. /proc shows the
    # daemon nothing, and its quiet window (1 s) passes three times; the lease sees smbd.
    data = emails(12000, "-smb")
    root = base / "spool"
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = deployed_config(base, sandbox, quiet_seconds=1.0)
        with samba_share(tmp_path / "smb", root) as share:
            async with deployed(base, config, lease=True) as log:
                started = time.monotonic()
                await slow_put(share, "slow.csv", split(data, 11), 0.3, sandbox)
                written = time.monotonic() - started
                await wait_for(lambda: "slow.csv" in records(root, "done"), what="slow.csv done")
    assert written >= 3.0
    assert paid(sandbox) == {sha256(data): 1}
    assert (root / "done" / "email" / "slow.csv").read_bytes() == data
    assert len(events(log, "file_held_by_writer")) == 1
