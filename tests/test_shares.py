"""Shared folders for real: files written through a Samba share and through SSHFS mounts,
taken by daemons run as subprocesses, checked against what the sandbox was paid for."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.shares import SambaShare, daemon_process, samba_share
from tests.support import (
    Sandbox,
    daemon_config,
    emails,
    quick_settings,
    records,
    sandbox_server,
    sha256,
    wait_for,
    write_config_file,
)


def share_config(tmp_path: Path, name: str, root: Path, sandbox: Sandbox,
                 **watch: Any) -> Path:
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)},
                           watch={"settle_seconds": 0.05, "rescan_seconds": 1.0, **watch},
                           log={"level": "info", "format": "json"})
    return write_config_file(tmp_path / f"{name}.toml", config)


async def ready(log: Path) -> None:
    await wait_for(lambda: log.exists() and "daemon_ready" in log.read_text(),
                   what=f"daemon_ready in {log.name}")


def paid(sandbox: Sandbox) -> Counter[str]:
    """Uploads the sandbox accepted, by sha256."""
    return Counter(str(u["sha256"]) for u in sandbox.uploads())


async def slow_put(share: SambaShare, name: str, chunks: list[bytes], every: float,
                   sandbox: Sandbox) -> None:
    """``smbclient put /dev/stdin`` fed from a throttled pipe, checking after each chunk that
    nothing was uploaded yet.

    smbclient sends the first 64 KiB (``smb2 max write``) at once, then holds the rest until
    the pipe ends: the file sits on the share, open O_RDWR in an smbd child, unchanged for
    the whole write. The hardest case for a quiet window.
    """
    proc = await asyncio.create_subprocess_exec(
        *share.command(f"put /dev/stdin inbox/email/{name}"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdin is not None
    target = share.folder / "inbox" / "email" / name
    total = sum(map(len, chunks))
    for n, chunk in enumerate(chunks, 1):
        proc.stdin.write(chunk)
        await proc.stdin.drain()
        if n == 1:
            await wait_for(lambda: target.exists() and target.stat().st_size > 0, timeout=10,
                           what="the write under way on the share")
        await asyncio.sleep(every)  # the writer is slow: that is the scenario
        assert sandbox.uploads() == [], f"uploaded after {n} of {len(chunks)} chunks"
    assert 0 < target.stat().st_size < total  # it really was incomplete all along
    proc.stdin.close()
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


def split(data: bytes, parts: int) -> list[bytes]:
    """The first 64 KiB (what smbclient sends at once), then the rest in ``parts`` pieces."""
    first, rest = data[:65536], data[65536:]
    step = -(-len(rest) // parts)
    return [first] + [rest[i:i + step] for i in range(0, len(rest), step)]


@pytest.mark.slow
@pytest.mark.parametrize("check", ["auto", "quiet"])
async def test_a_slow_smb_write_is_uploaded_once_after_it_completed(
        tmp_path: Path, check: str) -> None:
    # The file stays unchanged on the share for over 3 s while smbd holds it open. "auto"
    # (root sees that fd in /proc) must wait although its quiet_seconds (1 s) passes three
    # times; "quiet" sees no writer and relies on a window longer than the writer's silence.
    quiet = 1.0 if check == "auto" else 5.0
    data = emails(12000, "-slow")
    root = tmp_path / "spool"
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = share_config(tmp_path, "d", root, sandbox, writer_check=check,
                              quiet_seconds=quiet)
        with samba_share(tmp_path / "smb", root) as share:
            async with daemon_process(config, tmp_path / "d.log"):
                await ready(tmp_path / "d.log")
                started = time.monotonic()
                await slow_put(share, "slow.csv", split(data, 11), 0.3, sandbox)
                written = time.monotonic() - started
                await wait_for(lambda: "slow.csv" in records(root, "done"), what="slow.csv done")
    assert written >= 3.0
    assert paid(sandbox) == {sha256(data): 1}
    assert (root / "done" / "email" / "slow.csv").read_bytes() == data
    print(f"\nsmb slow put ({check}): {written:.1f} s, uploads={len(sandbox.uploads())}")


@pytest.mark.slow
async def test_a_file_renamed_in_over_smb_is_taken_promptly_and_temp_names_wait(
        tmp_path: Path) -> None:
    root = tmp_path / "spool"
    local = tmp_path / "local"
    local.mkdir()
    temps = ["~$x.csv", "x.csv.tmp", "~x.tmp"]  # Office lock file, Windows temporaries
    files = {name: emails(20, f"-{n}") for n, name in
             enumerate(["staged.csv", "after.csv", *temps])}
    for name, data in files.items():
        (local / name.replace("$", "S")).write_bytes(data)
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        # A quiet window far beyond the test's waits: "promptly" means the writer check
        # (nobody has the file open) decided, not the window.
        config = share_config(tmp_path, "d", root, sandbox, writer_check="auto",
                              quiet_seconds=60.0)
        with samba_share(tmp_path / "smb", root) as share:
            async with daemon_process(config, tmp_path / "d.log"):
                await ready(tmp_path / "d.log")
                share.run(f"put {local}/staged.csv staged.csv")
                started = time.monotonic()
                share.run("rename staged.csv inbox/email/staged.csv")
                await wait_for(lambda: "staged.csv" in records(root, "done"), timeout=10,
                               what="staged.csv done")
                prompt = time.monotonic() - started
                for name in temps:
                    share.run(f'put "{local}/{name.replace("$", "S")}" "inbox/email/{name}"')
                # A file dropped after them is done: the daemon saw the temporary names
                # (events, a rescan) and left them alone, unpaid.
                share.run(f"put {local}/after.csv after.csv")
                share.run("rename after.csv inbox/email/after.csv")
                await wait_for(lambda: "after.csv" in records(root, "done"), what="after.csv")
                assert sorted(p.name for p in (root / "inbox" / "email").iterdir()) == sorted(temps)
                assert len(sandbox.uploads()) == 2
                for n, name in enumerate(temps):
                    share.run(f'rename "inbox/email/{name}" "inbox/email/final{n}.csv"')
                await wait_for(lambda: len(records(root, "done")) == 5, what="renamed files done")
    assert prompt < 5.0
    assert paid(sandbox) == {sha256(data): 1 for data in files.values()}
    assert records(root, "failed") == {}
    print(f"\nsmb rename-in: taken in {prompt:.2f} s; uploads={len(sandbox.uploads())}")
