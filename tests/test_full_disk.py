"""A full disk (issue 19 item 5): one line per condition, files counted as pending,
readiness degraded with the reason, and a prompt retry once space returns."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.claims import ClaimTrouble
from tests.deployed import daemon_as_deployed, deployed_spool
from tests.support import (
    Sandbox,
    daemon_config,
    emails,
    free_port,
    get_metrics,
    get_readyz,
    is_ready,
    records,
    until,
    write_config_file,
)

FILES = 20


async def test_held_claims_wait_on_a_backoff_that_a_working_claim_cuts_short() -> None:
    trouble, stop = ClaimTrouble(initial_seconds=30.0, max_seconds=60.0), asyncio.Event()
    full = OSError(errno.ENOSPC, "No space left on device")
    assert trouble.spool_wide(full) and not trouble.spool_wide(PermissionError(errno.EACCES,
                                                                               "denied"))
    for n in range(3):
        trouble.held(Path(f"/inbox/{n}.csv"), full)
    assert trouble.count() == 3
    assert trouble.reason() == ("files cannot be claimed: No space left on device "
                                "(3 waiting in the inboxes)")
    waiter = asyncio.create_task(trouble.wait_retry(stop))
    await asyncio.sleep(0)
    assert not waiter.done()  # 30 s backoff
    trouble.released(Path("/inbox/0.csv"))
    trouble.claimed()  # space is back: the others try again now, not in 30 s
    assert await asyncio.wait_for(waiter, timeout=5) is True
    assert trouble.reason() is None and trouble.count() == 2


def test_a_file_of_its_own_trouble_is_said_once_per_error_without_a_traceback() -> None:
    trouble = ClaimTrouble()
    with capture_logs() as logs:
        for _ in range(3):  # three rescans
            trouble.say_once(Path("/inbox/a.csv"), PermissionError(errno.EACCES, "denied"))
        trouble.say_once(Path("/inbox/b.csv"), PermissionError(errno.EACCES, "denied"))
    assert [(e["event"], e["path"], e["log_level"]) for e in logs] == [
        ("claim_failed", "/inbox/a.csv", "warning"), ("claim_failed", "/inbox/b.csv", "warning")]
    assert not any("exc_info" in e for e in logs)


def _mount_tmpfs(path: Path, size: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("needs mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with path.open("wb", buffering=0) as fh:
        for chunk in (65536, 4096, 512):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    assert shutil.disk_usage(path.parent).free == 0


@pytest.mark.slow
async def test_a_full_spool_waits_said_once_and_resumes_promptly_as_deployed(
        sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        root = spool.root
        _mount_tmpfs(root, "1m")
        try:
            os.chown(root, spool.uid, spool.gid)
            port = free_port()
            # Rescans are far apart: a delivery within seconds of space returning is the
            # claim's own retry, not the next rescan.
            config = daemon_config(root, sandbox.api_base,
                                   health={"enabled": True, "port": port},
                                   watch={"rescan_seconds": 600.0})
            # A 1 MiB spool is "low disk" under any threshold: this test is about claims
            # (which do degrade readiness), so that warning is off.
            config = dataclasses.replace(config, spool=dataclasses.replace(
                config.spool, types=("email",), min_free_mb=0))
            config_file = write_config_file(spool.base / "config.toml", config)
            async with daemon_as_deployed(spool, config_file):
                await until(lambda: is_ready(port), "the daemon ready")
                inbox = root / "inbox" / "email"
                for n in range(FILES):  # hidden names are ignored until renamed
                    (inbox / f".list-{n:02}.csv").write_bytes(emails(3, seed=f"-{n}"))
                _fill(root / "filler")
                for n in range(FILES):
                    os.rename(inbox / f".list-{n:02}.csv", inbox / f"list-{n:02}.csv")

                async def blocked() -> bool:
                    return "cannot be claimed" in str((await get_readyz(port))[1]["reason"])
                await until(blocked, "readiness degraded")
                status, body = await get_readyz(port)
                assert status == 503
                assert str(body["reason"]).startswith("degraded: files cannot be claimed: "
                                                      "No space left on device")
                await asyncio.sleep(3)  # held claims retry every few seconds meanwhile
                text = await get_metrics(port)
                assert f"ipqs_bulkd_inbox_pending {FILES:.1f}" in text
                oldest = [line for line in text.splitlines()
                          if line.startswith("ipqs_bulkd_inbox_oldest_seconds ")]
                assert oldest and float(oldest[0].split()[1]) > 0
                assert sorted(p.name for p in inbox.iterdir()) == [
                    f"list-{n:02}.csv" for n in range(FILES)]
                assert list((root / "processing").iterdir()) == [root / "processing" /
                                                                 ".owners"]
                (root / "filler").unlink()  # space is back
                loop = asyncio.get_running_loop()
                freed = loop.time()

                async def delivered() -> bool:
                    return len(records(root, "done")) == FILES
                await until(delivered, "every file delivered", timeout=60)
                took = loop.time() - freed
                await until(lambda: is_ready(port), "readiness back")
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
        assert took < 30, took
        assert len(spool.events("claim_blocked")) == 1, spool.events("claim_blocked")
        assert len(spool.events("claim_unblocked")) == 1
        assert not spool.events("claim_failed") and not spool.events("claim_error")
        assert "Traceback" not in spool.log_file.read_text()
        assert not [e for e in spool.events() if e.get("level") == "error"]
    assert len(sandbox.uploads()) == FILES
