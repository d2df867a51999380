"""A daemon frozen mid-upload is replaced; on waking it must not complete its upload
(issue 17.1). Real subprocesses, the real sandbox over loopback, SIGSTOP/SIGCONT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import structlog

from daemon.spool.record import load_record, write_record
from tests.support import (
    daemon_config,
    drop,
    emails,
    job_state,
    quick_settings,
    running,
    sandbox_server,
    sha256,
    wait_for,
    write_config_file,
)

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                   reason="needs unshare --pid (root)")



def _received(incoming: Path) -> int:
    return max((p.stat().st_size for p in incoming.glob("*.part")), default=0)


@needs_unshare
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_daemon_frozen_mid_upload_is_replaced_and_ipqs_gets_one_job(
        tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    settings.faults.receive_kib_per_second = 20 * 1024  # a 60 MB body takes ~3 s
    async with sandbox_server(settings) as sandbox, contextlib.AsyncExitStack() as stack:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)},
                               api={"read_timeout": 5.0, "total_timeout_seconds": 5.0},
                               upload={"lease_seconds": 3.0, "lookup_delay_seconds": 2.0},
                               log={"level": "info", "format": "json"})
        path = write_config_file(tmp_path / "config.toml", config)
        env = {**os.environ, "IPQS_BULKD_CONFIG": str(path)}
        env.pop("IPQS_API_KEY", None)
        logs = {name: tmp_path / f"{name}.log" for name in "AB"}
        # A stands for another host: its own pid namespace, so B judges it by its lease.
        a = await asyncio.create_subprocess_exec(
            "unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "daemon", "run",
            env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=stack.enter_context(logs["A"].open("wb")),
            start_new_session=True)
        b = None
        try:
            data = emails(2_400_000)  # ~60 MB
            assert len(data) > 55_000_000
            drop(root, "email", "big.csv", data)
            incoming = sandbox.state.incoming_path().parent
            # (A's record says "claimed" until the last chunk: the body is the one read.)
            await wait_for(lambda: job_state(root) == "claimed"
                           and _received(incoming) > 8_000_000, timeout=60,
                           what="A half-way through the body")
            os.killpg(a.pid, signal.SIGSTOP)
            frozen_at = _received(incoming)
            b = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon", "run", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=stack.enter_context(logs["B"].open("wb")),
                start_new_session=True)
            await wait_for(lambda: _told(logs["B"], "file_submitted") is not None, timeout=90,
                           what="B adopts, looks up and uploads")
            os.killpg(a.pid, signal.SIGCONT)
            # A wakes up with its body half sent: it must stop it (or, had it completed,
            # record the second payment as an orphan). Either way its log says so.
            await wait_for(lambda: _told(logs["A"], *A_ENDS) or len(sandbox.uploads()) > 1,
                           timeout=60, what="A's half-sent upload to end one way or another")
            await wait_for(lambda: not list(incoming.glob("*.part")), timeout=30,
                           what="the sandbox done with A's connection")
        finally:
            for proc in (a, b):  # each leads its own process group (A: unshare and child)
                if proc is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGCONT)
                        os.killpg(proc.pid, signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), timeout=30)
        paid = [u for u in sandbox.uploads() if u["sha256"] == sha256(data)]
        a_said = _told(logs["A"], *A_ENDS)
        print(f"\nfrozen mid-upload: A frozen after {frozen_at} bytes received; "
              f"IPQS jobs for the file: {len(paid)}; A's log: {a_said}")
        assert len(paid) == 1, f"IPQS has {len(paid)} jobs for one file"
        assert _told(logs["B"], "file_submitted") is not None
        assert a_said == "upload_fenced"
        assert not (root / "orphans").exists()


#: What A logs when it wakes with its body half sent: stopped, or paid and recorded.
A_ENDS = ("upload_fenced", "upload_orphaned")


def _told(log: Path, *events: str) -> str | None:
    """The first of ``events`` that the JSON log at ``log`` names, if any yet."""
    for line in log.read_text(errors="replace").splitlines():
        for event in events:
            if f'"event": "{event}"' in line:
                return event
    return None


async def test_an_answer_for_a_job_taken_over_meanwhile_is_recorded_as_an_orphan(
        tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    # The job is made, then its answer comes out a byte every 10 ms: time to take it over.
    settings.faults.trickle_ms = 10
    settings.faults.operations = frozenset({"upload"})
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
        with structlog.testing.capture_logs() as logs:
            async with running(config) as service:
                drop(root, "email", "late.csv", emails(20))
                # The whole body is in (so it was past its fence) and the job made at
                # IPQS, whose answer is still on its way.
                await wait_for(lambda: len(sandbox.uploads()) == 1, what="the job at IPQS")
                [record] = list((root / "processing").glob("*/job.json"))
                job = load_record(record)
                assert job is not None and job.state == "uploading"
                job.owner = "another-host:1:cafe"  # as an adopter would write it
                write_record(record, job, 0o640)
                orphans = root / "orphans" / "email"
                await wait_for(lambda: any(orphans.glob("*.json")), what="an orphan record")
                metric = service.pipe.metrics.registry.get_sample_value(
                    "ipqs_bulkd_orphaned_uploads_total")
        [upload] = sandbox.uploads()
        [orphan] = [json.loads(p.read_text()) for p in orphans.glob("*.json")]
        assert (orphan["id"], orphan["file_name"]) == (upload["id"], job.file_name)
        assert orphan["sha256"] == sha256(emails(20)) and orphan["source"] == "late.csv"
        assert metric == 1.0
        errors = [e for e in logs if e["event"] == "upload_orphaned"]
        assert len(errors) == 1 and errors[0]["log_level"] == "error"
        assert errors[0]["id"] == upload["id"]
        # The new owner's record was not written over.
        assert load_record(record) is not None and load_record(record).owner == job.owner

