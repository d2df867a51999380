"""Shutdown with real signals to a real daemon process: bounded, forced by a second
signal, and an upload cut short is finished on the next start without a second upload."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from tests.support import (
    FAKE_KEY,
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    sandbox_server,
    wait_for,
    write_config_file,
)


async def start_daemon(tmp_path: Path, sandbox: Sandbox, grace: float,
                       *args: str) -> asyncio.subprocess.Process:
    config = write_config_file(tmp_path / "config.toml", daemon_config(
        tmp_path / "spool", sandbox.api_base, api={"read_timeout": 30.0},
        spool={"types": ("email",)}, upload={"lookup_delay_seconds": 0.1},
        service={"shutdown_seconds": grace}, log={"format": "json"}))
    env = {**os.environ, "IPQS_BULKD_CONFIG": str(config), "IPQS_API_KEY": FAKE_KEY}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", *args, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


def upload_requests(sandbox: Sandbox) -> int:
    stats = sandbox.state.stats.as_json()
    requests = stats.get("requests", {})
    assert isinstance(requests, dict)
    return int(requests.get("upload", 0))


async def test_sigterm_waits_for_the_upload_under_way_within_the_grace(
        tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    settings.faults.latency_ms = 1500
    settings.faults.operations = frozenset({"upload"})
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "slow.csv", emails(3))
        proc = await start_daemon(tmp_path, sandbox, 8.0)
        await wait_for(lambda: upload_requests(sandbox) == 1, what="upload under way")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
        elapsed = time.monotonic() - started
        # The upload in flight was allowed to finish: IPQS has it, the job has its id.
        assert proc.returncode == 0, err.decode()[-1500:]
        assert elapsed < 8.0
        assert [u["file_name"] for u in sandbox.uploads()] != []
        jobs = list((root / "processing").glob("*/job.json"))
        assert len(jobs) == 1 and '"state": "submitted"' in jobs[0].read_text()
        # The next start follows it to the end without sending it again.
        sandbox.state.faults.latency_ms = 0
        proc = await start_daemon(tmp_path, sandbox, 8.0, "--once")
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-1500:]
        assert "slow.csv" in records(root, "done")
        assert len(sandbox.uploads()) == 1


async def test_grace_runs_out_and_the_cut_upload_is_looked_up_before_resending(
        tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    settings.faults.latency_ms = 20000  # the answer would come long after the grace
    settings.faults.operations = frozenset({"upload"})
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "cut.csv", emails(3))
        proc = await start_daemon(tmp_path, sandbox, 1.0)
        await wait_for(lambda: upload_requests(sandbox) == 1, what="upload under way")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
        assert time.monotonic() - started < 5.0  # bounded by the 1 s grace
        jobs = list((root / "processing").glob("*/job.json"))
        assert len(jobs) == 1 and '"state": "uploading"' in jobs[0].read_text()
        # Whether IPQS got it is unknown to the daemon: the next start asks the list API
        # first, finds nothing (the sandbox dropped the abandoned request), sends it once.
        sandbox.state.faults.latency_ms = 0
        proc = await start_daemon(tmp_path, sandbox, 1.0, "--once")
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-1500:]
        assert "cut.csv" in records(root, "done")
        assert len(sandbox.uploads()) == 1
        assert b"upload_not_found" in err


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    settings.faults.latency_ms = 20000
    settings.faults.operations = frozenset({"upload"})
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "stuck.csv", emails(3))
        proc = await start_daemon(tmp_path, sandbox, 60.0)
        await wait_for(lambda: upload_requests(sandbox) == 1, what="upload under way")
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert proc.returncode is None  # draining: the grace is a minute
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert time.monotonic() - started < 3.0
        assert proc.returncode == 143
        assert b"shutdown_forced" in err
        # Nothing was lost: the job waits in processing/ for the next start.
        assert len(list((root / "processing").glob("*/stuck.csv"))) == 1
