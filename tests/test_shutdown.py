"""Shutdown with real signals to a real daemon process: bounded, forced by a second
signal, and an upload cut short is finished on the next start without a second upload."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    sandbox_server,
    start_daemon,
    wait_for,
    write_config_file,
)


@dataclass
class Uploading:
    """A daemon process whose one upload is under way at a sandbox that holds it."""

    sandbox: Sandbox
    root: Path
    config: Path
    proc: asyncio.subprocess.Process

    async def restart(self, *args: str) -> asyncio.subprocess.Process:
        self.proc = await start_daemon(self.config, *args)
        return self.proc


@asynccontextmanager
async def upload_under_way(tmp_path: Path, name: str, *, latency_ms: int,
                           grace: float) -> AsyncIterator[Uploading]:
    """Drop ``name``, start the daemon with a shutdown ``grace``, and return once its
    upload has reached the sandbox, which answers it ``latency_ms`` later."""
    settings = quick_settings(tmp_path)
    settings.faults.latency_ms = latency_ms
    settings.faults.operations = frozenset({"upload"})
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", name, emails(3))
        config = write_config_file(tmp_path / "config.toml", daemon_config(
            root, sandbox.api_base, api={"read_timeout": 30.0},
            spool={"types": ("email",)}, upload={"lookup_delay_seconds": 0.1},
            service={"shutdown_seconds": grace}, log={"format": "json"}))
        run = Uploading(sandbox, root, config, await start_daemon(config))
        try:
            await wait_for(lambda: upload_requests(sandbox) == 1, what="upload under way")
            yield run
        finally:
            if run.proc.returncode is None:
                run.proc.kill()
                await run.proc.communicate()


def upload_requests(sandbox: Sandbox) -> int:
    stats = sandbox.state.stats.as_json()
    requests = stats.get("requests", {})
    assert isinstance(requests, dict)
    return int(requests.get("upload", 0))


async def test_sigterm_waits_for_the_upload_under_way_within_the_grace(
        tmp_path: Path) -> None:
    async with upload_under_way(tmp_path, "slow.csv", latency_ms=1500, grace=8.0) as run:
        sandbox, root, proc = run.sandbox, run.root, run.proc
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
        proc = await run.restart("--once")
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-1500:]
        assert "slow.csv" in records(root, "done")
        assert len(sandbox.uploads()) == 1


async def test_grace_runs_out_and_the_cut_upload_is_looked_up_before_resending(
        tmp_path: Path) -> None:
    # The answer would come long after the grace.
    async with upload_under_way(tmp_path, "cut.csv", latency_ms=20000, grace=1.0) as run:
        sandbox, root, proc = run.sandbox, run.root, run.proc
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
        assert time.monotonic() - started < 5.0  # bounded by the 1 s grace
        jobs = list((root / "processing").glob("*/job.json"))
        assert len(jobs) == 1 and '"state": "uploading"' in jobs[0].read_text()
        # Whether IPQS got it is unknown to the daemon: the next start asks the list API
        # first, finds nothing (the sandbox dropped the abandoned request), sends it once.
        sandbox.state.faults.latency_ms = 0
        proc = await run.restart("--once")
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-1500:]
        assert "cut.csv" in records(root, "done")
        assert len(sandbox.uploads()) == 1
        assert b"upload_not_found" in err


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with upload_under_way(tmp_path, "stuck.csv", latency_ms=20000, grace=60.0) as run:
        root, proc = run.root, run.proc
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
