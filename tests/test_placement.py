"""Where the spool's files are: misplaced drops are reported, an inbox on another file system
is refused at start, and a spool on a network or FUSE file system is recognised."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.spool import Spool
from daemon.spool.mounts import MisplacedFiles, foreign_inboxes, fs_type, network_fs
from tests.support import (
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    running,
    sandbox_server,
    start_daemon,
    wait_for,
    write_config_file,
)

TYPES = ("email", "phone")


def misplace(root: Path) -> list[Path]:
    """Two misplaced files, and entries that are not misplaced."""
    paths = [root / "inbox" / "emails" / "x.csv", root / "inbox" / "x.csv",
             root / "inbox" / ".hidden.csv", root / "inbox" / "emails" / "~$x.csv"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(emails(2))
    return paths[:2]


def test_misplaced_files_get_one_warning_per_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path, TYPES)
    spool.prepare()
    stray = misplace(tmp_path)
    drop(tmp_path, "email", "fine.csv", emails(1))
    misplaced = MisplacedFiles(spool, TYPES)
    with capture_logs() as logs:
        counts = [misplaced.sweep() for _ in range(3)]
        late = tmp_path / "inbox" / "phones" / "y.csv"
        late.parent.mkdir()
        late.write_bytes(emails(1))
        counts.append(misplaced.sweep())
        stray[1].unlink()
        counts.append(misplaced.sweep())
    assert counts == [2, 2, 2, 3, 2]
    warned = [e["path"] for e in logs if e["event"] == "file_misplaced"]
    assert warned == [str(p) for p in sorted(stray)] + [str(late)]
    assert all(e["log_level"] == "warning" and "inbox/<type>/" in e["hint"]
               for e in logs if e["event"] == "file_misplaced")


async def test_misplaced_count_in_metrics_and_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "spool"
    stray = misplace(root)
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = daemon_config(root, sandbox.api_base, spool={"types": TYPES},
                               upload={"lease_seconds": 0.3})
        drop(root, "email", "fine.csv", emails(3))
        async with running(config) as service:
            await wait_for(lambda: "fine.csv" in records(root, "done"), what="fine.csv done")
            await wait_for(lambda: b"ipqs_bulkd_misplaced_files 2.0"
                           in service.pipe.metrics.render(), what="misplaced gauge")
    assert all(path.exists() for path in stray)  # reported, never taken or moved
    assert len(sandbox.uploads()) == 1
    path = write_config_file(tmp_path / "config.toml", config)
    # The command runs its own event loop: not in this test's.
    assert await asyncio.to_thread(main, ["status", "--config", str(path)]) == 0
    assert ("misplaced: 2 (never taken; move into inbox/<type>/): inbox/emails/x.csv, "
            "inbox/x.csv") in capsys.readouterr().out


# -- file systems ------------------------------------------------------------------------------


@pytest.fixture
def tmpfs_inbox(tmp_path: Path) -> Iterator[Path]:
    """A spool whose inbox/email is a tmpfs mounted inside it (not a symlink)."""
    root = tmp_path / "spool"
    inbox = root / "inbox" / "email"
    inbox.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs on an inbox needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(inbox)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", str(inbox)], check=True)


async def test_an_inbox_on_another_file_system_is_refused_at_start(
        tmp_path: Path, tmpfs_inbox: Path) -> None:
    root = tmpfs_inbox
    waiting = root / "inbox" / "email" / "a.csv"  # a rename in would fail with EXDEV
    waiting.write_bytes(emails(3))
    config = write_config_file(tmp_path / "config.toml", daemon_config(
        root, "http://127.0.0.1:9/api", spool={"types": TYPES}))
    done = await start_daemon(config, "--once")
    _, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 2
    [line] = err.decode().strip().splitlines()
    assert line.startswith("ipqs-bulkd: config key spool.root: ")
    assert str(root / "inbox" / "email") in line and str(root / "processing") in line
    assert "mount the shared folder at spool.root" in line
    assert waiting.read_bytes() == emails(3)  # untouched
    assert list((root / "processing" / ".owners").iterdir()) == []  # not even a lease
    assert fs_type(root / "inbox" / "email") == "tmpfs"
    assert foreign_inboxes(Spool(root, TYPES), TYPES) == [root / "inbox" / "email"]


def test_a_local_spool_is_neither_foreign_nor_network(tmp_path: Path) -> None:
    spool = Spool(tmp_path, TYPES)
    spool.prepare()
    assert foreign_inboxes(spool, TYPES) == []
    assert fs_type(tmp_path) is not None


def test_fs_type_reads_the_mount_of_the_path(tmp_path: Path) -> None:
    dev = os.stat(tmp_path).st_dev
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"90 27 {os.major(dev)}:{os.minor(dev)} / /srv/spool rw - fuse.sshfs root@h:/x rw\n")
    assert fs_type(tmp_path, str(info)) == network_fs(tmp_path, str(info)) == "fuse.sshfs"
    for kind, network in (("nfs4", True), ("cifs", True), ("ext4", False), ("tmpfs", False)):
        info.write_text(f"90 27 {os.major(dev)}:{os.minor(dev)} / /srv rw - {kind} x rw\n")
        assert fs_type(tmp_path, str(info)) == kind
        assert network_fs(tmp_path, str(info)) == (kind if network else None)
