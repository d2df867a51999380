"""Jobs that cannot be finished wait aside (issue 19 item 1): they never hold the poller or
the default thread pool, and status, a metric and readiness name the folder and the count."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import stat
import sys
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.finishing import Finishing
from daemon.spool import Job
from tests.deployed import Deployed, daemon_as_deployed, deployed_spool
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    free_port,
    get_metrics,
    get_readyz,
    is_ready,
    records,
    running,
    until,
    wait_for,
    write_config_file,
)


def _job(n: int, file_type: str = "email") -> Job:
    return Job(job=f"job-{n}", type=file_type, source=f"f{n}.csv", file_name=f"f{n}",
               method="multipart", outcome="done")


class _Folders:
    """A fake move: folders in ``refusing`` raise EACCES; every attempt is counted."""

    def __init__(self) -> None:
        self.refusing = {"done/email"}
        self.attempts: list[str] = []
        self.moved: list[str] = []

    async def move(self, job: Job) -> Path:
        folder = f"done/{job.type}"
        self.attempts.append(job.job)
        if folder in self.refusing:
            raise PermissionError(errno.EACCES, "Permission denied", folder)
        return Path(folder) / f"{job.source}.json"

    def finished(self, job: Job, record: Path) -> None:
        self.moved.append(job.job)


async def test_a_blocked_folder_is_probed_by_one_job_with_backoff_then_all_follow() -> None:
    folders, stop, now = _Folders(), asyncio.Event(), [0.0]
    finishing = Finishing(folders.move, folders.finished, stop, initial_seconds=1.0,
                          max_seconds=4.0, clock=lambda: now[0])
    finishing.remind_seconds = 5.0
    with capture_logs() as logs:
        await _probe_then_clear(finishing, folders, stop, now)
    said = [(e["event"], e.get("waiting"), e.get("moved")) for e in logs
            if e["event"].startswith("finish_") and e["log_level"] != "debug"]
    # Said when it blocks, again once remind_seconds passed (at t=7), and when it clears.
    assert said == [("finish_blocked", 1, None), ("finish_blocked", 24, None),
                    ("finish_unblocked", None, 24)]


async def _probe_then_clear(finishing: Finishing, folders: _Folders, stop: asyncio.Event,
                            now: list[float]) -> None:
    for n in range(24):
        finishing.hold(_job(n), "done/email", PermissionError(errno.EACCES, "Permission denied"))
    assert finishing.blocked() == {"done/email": 24}
    reason = finishing.reason()
    assert reason is not None and "24" in reason and "done/email" in reason
    assert "Permission denied" in reason
    task = asyncio.create_task(finishing.run())
    try:
        delays = []
        for _ in range(4):  # each due time: one probe, which fails, and the delay doubles
            tried = len(folders.attempts)
            due = min(b.due for b in finishing._blocked.values())
            delays.append(due - now[0])
            now[0] = due
            finishing._wake.set()
            await wait_for(lambda n=tried + 1: len(folders.attempts) == n,  # type: ignore[misc]
                           timeout=5)
        assert delays == [1.0, 2.0, 4.0, 4.0]
        folders.refusing.clear()
        now[0] += 4.0
        finishing._wake.set()
        await wait_for(lambda: finishing.count() == 0, timeout=5)
        assert sorted(folders.moved) == sorted(f"job-{n}" for n in range(24))
        assert finishing.reason() is None and finishing.blocked() == {}
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_final_moves_run_in_threads_of_their_own(tmp_path: Path,
                                                       sandbox: Sandbox) -> None:
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base)
    threads: list[str] = []
    async with running(config) as service:
        real = service.spool.finish

        def finish(job: Job) -> Path:
            threads.append(threading.current_thread().name)
            return real(job)

        service.spool.finish = finish  # type: ignore[method-assign]
        drop(root, "email", "a.csv", emails(3))
        await wait_for(lambda: "a.csv" in records(root, "done"), what="a.csv done")
    assert threads and all(name.startswith("finish") for name in threads), threads


async def test_a_missing_outcome_folder_is_recreated_as_its_siblings_are(
        tmp_path: Path, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base)
    async with running(config):
        for folder in (root / "done").iterdir():
            folder.chmod(0o2750)
        (root / "done" / "email").rename(root / "done" / "email.2026-11")
        drop(root, "email", "a.csv", emails(3))
        await wait_for(lambda: "a.csv" in records(root, "done"), what="a.csv done")
    mode = stat.S_IMODE((root / "done" / "email").stat().st_mode)
    assert f"{mode:o}" == "2750"
    out = capsys.readouterr()
    assert "folder_recreated" in out.out + out.err and "done/email" in out.out + out.err


# -- the reproduction, as deployed ----------------------------------------------------------


async def _status(config_file: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "status", "--config", str(config_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/")
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.slow
async def test_an_unwritable_done_folder_blocks_only_its_own_jobs_as_deployed(
        sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        await _reproduce(spool, sandbox)


async def _reproduce(spool: Deployed, sandbox: Sandbox) -> None:
    root, port = spool.root, free_port()
    config = daemon_config(root, sandbox.api_base, health={"enabled": True, "port": port},
                           poll={"max_seconds": 0.5})
    config = dataclasses.replace(config, spool=dataclasses.replace(
        config.spool, types=("email", "phone")))
    config_file = write_config_file(spool.base / "config.toml", config)
    async with daemon_as_deployed(spool, config_file) as proc:
        await until(lambda: is_ready(port), "the daemon ready")
        # An operator rotates done/email; the new folder is root's, 0755.
        (root / "done" / "email").rename(root / "done" / "email.2026-11")
        (root / "done" / "email").mkdir(mode=0o755)
        for n in range(24):
            drop(root, "email", f"list-{n:02}.csv", emails(2, seed=f"-{n}"))
        drop(root, "phone", "numbers.csv", b"+15555550100\n")

        async def phone_done() -> bool:
            return "numbers.csv" in records(root, "done", "phone")
        await until(phone_done, "the phone file delivered")

        async def all_blocked() -> bool:
            return "24 finished job(s)" in str((await get_readyz(port))[1].get("reason"))
        await until(all_blocked, "the 24 email jobs waiting for done/email")
        status, body = await get_readyz(port)
        assert status == 503 and "done/email" in str(body["reason"])
        assert str(body["reason"]).startswith("degraded: ")
        assert 'ipqs_bulkd_finish_blocked{folder="done/email"} 24.0' in await get_metrics(port)
        shown = await _status(config_file)
        assert "waiting to be moved (finishing): done/email 24" in shown
        assert "DEGRADED" in shown and "done/email" in shown
        assert proc.returncode is None

        os.chown(root / "done" / "email", spool.uid, spool.gid)  # the operator's fix

        async def all_done() -> bool:
            return len(records(root, "done", "email")) == 24
        await until(all_done, "the 24 email files delivered")
        await until(lambda: is_ready(port), "readiness back")

        # Rotated by a move alone: the daemon makes done/email again, as done/phone is.
        (root / "done" / "phone").chmod(0o2750)
        (root / "done" / "email").rename(root / "done" / "email.2026-12")
        drop(root, "email", "after.csv", emails(2, seed="-after"))

        async def after_done() -> bool:
            return "after.csv" in records(root, "done", "email")
        await until(after_done, "a file delivered into a re-created done/email")
    made = (root / "done" / "email").stat()
    assert (f"{stat.S_IMODE(made.st_mode):o}", made.st_uid) == ("2750", spool.uid)
    assert [e["folder"] for e in spool.events("folder_recreated")] == ["done/email"]
    blocked = spool.events("finish_blocked")
    assert [e["folder"] for e in blocked] == ["done/email"], blocked  # one line, not 24
    assert "writable" in blocked[0]["fix"]
    assert [e["folder"] for e in spool.events("finish_unblocked")] == ["done/email"]
    assert not spool.events("finish_failed")
    assert len(sandbox.uploads()) == 26  # nothing paid twice
