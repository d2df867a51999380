"""Shared folders for real: files written through a Samba share and through SSHFS mounts,
taken by daemons run as subprocesses, checked against what the sandbox was paid for."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import WatchConfig
from daemon.spool.mounts import advise_on_network
from tests.shares import (
    daemon_process,
    kill_session,
    paid,
    require,
    samba_share,
    slow_put,
    split,
    ssh_server,
    sshfs_mount,
)
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


def share_config(tmp_path: Path, name: str, root: Path, sandbox: Sandbox,
                 upload: dict[str, Any] | None = None, **watch: Any) -> Path:
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)},
                           watch={"settle_seconds": 0.05, "rescan_seconds": 1.0, **watch},
                           upload=upload or {}, log={"level": "info", "format": "json"})
    return write_config_file(tmp_path / f"{name}.toml", config)


async def ready(log: Path) -> None:
    await wait_for(lambda: log.exists() and "daemon_ready" in log.read_text(),
                   what=f"daemon_ready in {log.name}")


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


# -- SSHFS: several daemons on several mounts of one spool ---------------------------------


@pytest.fixture
def sshfs_pair(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """One spool folder and two SSHFS mounts of it: ``(local, mount1, mount2)``."""
    local = tmp_path / "spool"
    local.mkdir()
    with (ssh_server(tmp_path / "ssh") as server,
          sshfs_mount(server, local, tmp_path / "m1") as m1,
          sshfs_mount(server, local, tmp_path / "m2") as m2):
        yield local, m1, m2


def mount_config(tmp_path: Path, name: str, root: Path, sandbox: Sandbox,
                 **upload: Any) -> Path:
    # inotify on one mount sees nothing made through the other: poll. The writers are
    # remote: no /proc can see them, so the quiet window decides (short: files are renamed
    # in complete).
    return share_config(tmp_path, name, root, sandbox, upload, force_polling=True,
                        poll_delay_ms=200, writer_check="quiet", quiet_seconds=0.5)


async def drop_through(pairs: list[tuple[Path, str, bytes]]) -> None:
    """Drop files (write aside, rename in) through their mounts, off the event loop: the
    sandbox serves the daemons from this loop meanwhile."""
    def work() -> None:
        for root, name, data in pairs:
            drop(root, "email", name, data)
    await asyncio.to_thread(work)


def submitted_by(log: Path) -> int:
    return log.read_text().count('"file_submitted"')


def assert_all_done_once(local: Path, sandbox: Sandbox, expected: dict[str, bytes]) -> None:
    done = records(local, "done")
    assert set(done) == set(expected)
    assert records(local, "failed") == {}
    assert paid(sandbox) == {sha256(data): 1 for data in expected.values()}
    for name, data in expected.items():
        assert (local / "done" / "email" / name).read_bytes() == data
    assert [p.name for p in (local / "processing").iterdir() if p.name != ".owners"] == []


@pytest.mark.slow
async def test_two_daemons_on_two_sshfs_mounts_take_200_files_once(
        tmp_path: Path, sshfs_pair: tuple[Path, Path, Path]) -> None:
    local, m1, m2 = sshfs_pair
    expected = {f"f{n:03d}.csv": emails(30, f"-{n}") for n in range(200)}
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        logs = [tmp_path / "d1.log", tmp_path / "d2.log"]
        async with (daemon_process(mount_config(tmp_path, "d1", m1, sandbox), logs[0]),
                    daemon_process(mount_config(tmp_path, "d2", m2, sandbox), logs[1])):
            await ready(logs[0])
            await ready(logs[1])
            started = time.monotonic()
            await drop_through([(m1 if n % 2 else m2, name, data)
                                for n, (name, data) in enumerate(expected.items())])
            await wait_for(lambda: len(records(local, "done")) == 200, timeout=90,
                           what="200 files done")
            took = time.monotonic() - started
    assert_all_done_once(local, sandbox, expected)
    shares = [submitted_by(log) for log in logs]
    assert sum(shares) == 200
    print(f"\nsshfs 2 daemons: dropped=200 uploads={len(sandbox.uploads())} "
          f"distinct={len(paid(sandbox))} per daemon={shares} in {took:.1f} s")


@pytest.mark.slow
async def test_same_content_through_both_mounts_is_paid_once(
        tmp_path: Path, sshfs_pair: tuple[Path, Path, Path]) -> None:
    # Both daemons race for the claims and for each duplicate marker through different
    # mounts: the loser of an exclusive create there hears EPERM, not EEXIST.
    local, m1, m2 = sshfs_pair
    contents = [emails(10, f"-dup{n}") for n in range(30)]
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        logs = [tmp_path / "d1.log", tmp_path / "d2.log"]
        async with (daemon_process(mount_config(tmp_path, "d1", m1, sandbox), logs[0]),
                    daemon_process(mount_config(tmp_path, "d2", m2, sandbox), logs[1])):
            await ready(logs[0])
            await ready(logs[1])
            await asyncio.gather(
                drop_through([(m1, f"a{n:02d}.csv", data) for n, data in enumerate(contents)]),
                drop_through([(m2, f"b{n:02d}.csv", data) for n, data in enumerate(contents)]))
            await wait_for(lambda: len(records(local, "done")) + len(records(local, "failed"))
                           == 60, timeout=60, what="60 files finished")
    done, failed = records(local, "done"), records(local, "failed")
    assert paid(sandbox) == {sha256(data): 1 for data in contents}
    assert len(done) == 30 and len(failed) == 30
    assert {r["reason"] for r in failed.values()} == {"duplicate"}
    assert sorted(r["sha256"] for r in done.values()) == sorted(map(sha256, contents))
    for log in logs:
        text = log.read_text()
        assert '"level": "error"' not in text and "Traceback" not in text, text[-2000:]
    print(f"\nsshfs duplicates: dropped=60 (30 pairs) uploads={len(sandbox.uploads())} "
          f"done={len(done)} failed-duplicate={len(failed)}")


@pytest.mark.slow
async def test_a_daemon_on_a_mount_and_one_on_the_local_folder(
        tmp_path: Path, sshfs_pair: tuple[Path, Path, Path]) -> None:
    local, m1, _ = sshfs_pair
    expected = {f"g{n:02d}.csv": emails(20, f"-g{n}") for n in range(60)}
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        logs = [tmp_path / "mount.log", tmp_path / "local.log"]
        on_local = share_config(tmp_path, "local", local, sandbox, writer_check="auto")
        async with (daemon_process(mount_config(tmp_path, "mount", m1, sandbox), logs[0]),
                    daemon_process(on_local, logs[1])):
            await ready(logs[0])
            await ready(logs[1])
            await drop_through([(m1 if n % 2 else local, name, data)
                                for n, (name, data) in enumerate(expected.items())])
            await wait_for(lambda: len(records(local, "done")) == 60, timeout=60,
                           what="60 files done")
    assert_all_done_once(local, sandbox, expected)
    shares = [submitted_by(log) for log in logs]
    assert sum(shares) == 60
    # The spool on FUSE is recognised, once; these settings already fit it.
    [advice] = [json.loads(line) for line in logs[0].read_text().splitlines()
                if "spool_on_network_fs" in line]
    assert (advice["fs_type"], advice["advice"]) == ("fuse.sshfs", "settings fit")
    assert "spool_on_network_fs" not in logs[1].read_text()
    with capture_logs() as seen:
        assert advise_on_network(m1, WatchConfig()) == "fuse.sshfs"
    [event] = seen
    assert "watch.force_polling = true" in event["advice"]
    assert 'watch.writer_check = "quiet"' in event["advice"]
    print(f"\nsshfs + local: dropped=60 uploads={len(sandbox.uploads())} "
          f"distinct={len(paid(sandbox))} mount/local={shares}")


@pytest.mark.slow
async def test_a_daemon_killed_on_one_mount_is_taken_over_after_its_lease(
        tmp_path: Path, sshfs_pair: tuple[Path, Path, Path]) -> None:
    # The first daemon runs in a pid namespace of its own: to the second it is "another
    # host", so only its lease (heartbeat age), not its pid, can say that it died.
    require("unshare", root=True)
    local, m1, m2 = sshfs_pair
    lease = 3.0
    expected = {f"k{n:02d}.csv": emails(20, f"-k{n}") for n in range(10)}
    settings = quick_settings(tmp_path, processing_seconds=lease + 4)  # outlives the lease
    async with sandbox_server(settings) as sandbox:
        logs = [tmp_path / "first.log", tmp_path / "second.log"]
        first = mount_config(tmp_path, "first", m1, sandbox, lease_seconds=lease)
        second = mount_config(tmp_path, "second", m2, sandbox, lease_seconds=lease)
        async with daemon_process(first, logs[0], wrap=("unshare", "--pid", "--fork")) as proc:
            await ready(logs[0])
            await drop_through([(m1, name, data) for name, data in expected.items()])
            await wait_for(lambda: len(sandbox.uploads()) == 10, what="10 uploads by the first")
            async with daemon_process(second, logs[1]):
                await ready(logs[1])
                kill_session(proc)
                killed = time.monotonic()
                await proc.wait()
                await wait_for(lambda: "job_resumed" in logs[1].read_text(), what="takeover")
                taken = time.monotonic() - killed
                await wait_for(lambda: len(records(local, "done")) == 10, timeout=60,
                               what="10 files done")
    assert_all_done_once(local, sandbox, expected)
    assert logs[1].read_text().count('"job_resumed"') == 10
    assert submitted_by(logs[1]) == 0  # followed, never sent again
    # Its last heartbeat was at most lease/3 before the kill; the takeover waited for it
    # to be older than the lease.
    assert taken >= lease * 2 / 3 - 0.2
    print(f"\nsshfs kill -9: dropped=10 uploads={len(sandbox.uploads())} taken over after "
          f"{taken:.1f} s (lease {lease} s)")
