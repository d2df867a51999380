"""Trying hard to make the daemon lose a file or pay twice: kills, lost answers, faults,
outages, account errors, duplicates and a second daemon on the same spool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.service import Service
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    run_once,
    running,
    sandbox_server,
    sha256,
    start_daemon,
    wait_for,
    write_config_file,
)


def drop_many(root: Path, count: int, rows: int = 50, tag: str = "") -> dict[str, str]:
    """Drop ``count`` files of distinct content; returns name -> sha256."""
    expected = {}
    for n in range(count):
        data = emails(rows, f"-{tag}{n}")
        drop(root, "email", f"batch{tag}-{n:03d}.csv", data)
        expected[f"batch{tag}-{n:03d}.csv"] = sha256(data)
    return expected


def assert_each_done_once(root: Path, sandbox: Sandbox, expected: dict[str, str]) -> None:
    done = records(root, "done")
    assert set(done) == set(expected), f"missing: {set(expected) - set(done)}"
    assert records(root, "failed") == {}
    paid = Counter(u["sha256"] for u in sandbox.uploads())
    assert {sha: paid[sha] for sha in expected.values()} == dict.fromkeys(expected.values(), 1)
    for name, sha in expected.items():
        assert sha256((root / "done" / "email" / name).read_bytes()) == sha
        assert done[name]["id"] in {u["id"] for u in sandbox.uploads() if u["sha256"] == sha}
    assert [p.name for p in (root / "processing").iterdir() if p.name != ".owners"] == []


def subprocess_config(path: Path, root: Path, api_base: str) -> None:
    config = daemon_config(root, api_base, spool={"types": ("email",)},
                           upload={"retry_initial_seconds": 0.02, "retry_max_seconds": 0.2,
                                   "lookup_delay_seconds": 0.1},
                           poll={"initial_seconds": 0.05, "max_seconds": 0.2},
                           log={"level": "warning", "format": "json"})
    write_config_file(path, config)


@pytest.mark.slow  # ~12 s: up to 20 daemon processes, killed at random
async def test_kill_9_at_random_moments_loses_nothing_and_pays_once(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    settings = quick_settings(tmp_path, new_seconds=0.05, processing_seconds=0.1,
                              per_row_seconds=0.001)
    settings.faults.latency_ms = 20
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        config = tmp_path / "config.toml"
        subprocess_config(config, root, sandbox.api_base)
        expected = drop_many(root, 40, rows=400)
        kills = 0
        states: Counter[str] = Counter()
        for _ in range(20):
            proc = await start_daemon(config, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            await proc.wait()
            states.update(job_states(root))
            if len(records(root, "done")) == len(expected) and kills >= 8:
                break
        final = await start_daemon(config, "--once")
        _, err = await final.communicate()
        assert final.returncode == 0, err.decode()[-2000:]
        assert_each_done_once(root, sandbox, expected)
    # The kills landed in the middle of the work, not only before or after it.
    assert kills >= 8
    assert states["uploading"] + states["submitted"] + states["fetched"] > 0, states
    print(f"\nkill-9 torture: files={len(expected)} kills={kills} "
          f"uploads={len(sandbox.uploads())} states_at_kill={dict(states)}")


def job_states(root: Path) -> Counter[str]:
    """States of the jobs left in processing/ (what a kill interrupted)."""
    found: Counter[str] = Counter()
    for record in (root / "processing").glob("*/job.json"):
        found[json.loads(record.read_text())["state"]] += 1
    return found


async def test_lost_answers_never_cost_a_second_upload(tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    settings.faults.lost_answer_rate = 0.3
    settings.faults.seed = 7
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        expected = drop_many(root, 30)
        service = Service(daemon_config(root, sandbox.api_base))
        assert await service.run(once=True) == 0
        assert sandbox.state.stats.as_json()["faults"].get("lost_answer", 0) > 0  # type: ignore[union-attr]
        assert service.pipe.metrics.adopted._value.get() > 0
        assert_each_done_once(root, sandbox, expected)
        print(f"\nlost answers: files=30 uploads={len(sandbox.uploads())} "
              f"adopted={service.pipe.metrics.adopted._value.get():g} "
              f"faults_fired={sandbox.state.stats.as_json()['faults']}")


async def test_injected_faults_are_retried_and_nothing_fails(tmp_path: Path) -> None:
    settings = quick_settings(tmp_path)
    faults = settings.faults
    faults.error_5xx_rate, faults.rate_limit_403_rate, faults.rate_limit_429_rate = 0.3, 0.1, 0.1
    faults.drop_rate, faults.latency_ms, faults.retry_after_seconds = 0.05, 10, 0.05
    faults.seed = 11
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        expected = drop_many(root, 30)
        service = Service(daemon_config(root, sandbox.api_base))
        assert await service.run(once=True) == 0
        assert_each_done_once(root, sandbox, expected)
        retries = {(s.labels["operation"], s.labels["cause"]): s.value
                   for metric in service.pipe.metrics.retries.collect()
                   for s in metric.samples if s.name.endswith("_total")}
    assert sum(retries.values()) > 10
    assert {cause for _, cause in retries} >= {"http_5xx", "rate_limit"}
    print(f"\ninjected faults: files=30 uploads={len(sandbox.uploads())} retries={retries} "
          f"faults_fired={sandbox.state.stats.as_json()['faults']}")


async def test_outage_then_recovery_fails_nothing(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        sandbox.state.faults.outage = True
        async with running(daemon_config(root, sandbox.api_base)) as service:
            expected = drop_many(root, 10)
            await wait_for(lambda: sum(s.value for m in service.pipe.metrics.retries.collect()
                                       for s in m.samples if s.name.endswith("_total")) >= 8,
                           what="retries during the outage")
            assert records(root, "failed") == {}
            sandbox.state.faults.outage = False
            await wait_for(lambda: len(records(root, "done")) == len(expected),
                           what="all done after the outage")
        assert_each_done_once(root, sandbox, expected)


async def test_bad_key_pauses_uploads_then_drains_when_fixed(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        sandbox.state.faults.invalid_key = True
        config = daemon_config(root, sandbox.api_base,
                               upload={"pause_initial_seconds": 0.2, "pause_max_seconds": 0.5})
        async with running(config) as service:
            expected = drop_many(root, 6)
            await wait_for(lambda: service.pipe.breaker.paused, what="uploads paused")
            def uploads_tried() -> int:
                requests = sandbox.state.stats.as_json()["requests"]
                assert isinstance(requests, dict)
                return int(requests.get("upload", 0))

            before = uploads_tried()
            with structlog.testing.capture_logs() as logs:
                await wait_for(lambda: uploads_tried() >= before + 3, what="a few probes")
            # Probes go on, but the pause is announced once, not once per file or probe.
            events = [e["event"] for e in logs]
            assert events.count("file_returned_to_inbox") >= 2  # the probes, seen
            assert events.count("uploads_paused") == 0
            ready, why = service.health.ready()
            assert not ready and "key" in why.lower()
            # Files stay in the inbox; nothing is failed, nothing uploaded.
            assert records(root, "failed") == {} and sandbox.uploads() == []
            def in_inbox_or_probed() -> bool:
                # Two listings cannot be atomic: a probe may move a file between them, so
                # the check holds once a pair of listings sees a still moment.
                probing = {p.name for p in (root / "processing").glob("*/*.csv")}
                inbox = {p.name for p in (root / "inbox" / "email").iterdir()}
                return inbox | probing == set(expected) and len(probing) <= 1
            await wait_for(in_inbox_or_probed, what="every file in its inbox or the one probe")
            sandbox.state.faults.invalid_key = False
            await wait_for(lambda: len(records(root, "done")) == len(expected),
                           what="queue drained after the key was fixed")
            assert not service.pipe.breaker.paused
        assert_each_done_once(root, sandbox, expected)


async def test_same_content_twice_is_a_duplicate_with_the_earlier_id(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base)
        drop(root, "email", "first.csv", emails(5))
        assert await run_once(config) == 0
        drop(root, "email", "again.csv", emails(5))
        assert await run_once(config) == 1
        first = records(root, "done")["first.csv"]
        dup = records(root, "failed")["again.csv"]
        assert dup["reason"] == "duplicate" and str(first["id"]) in dup["error"]
        assert len(sandbox.uploads()) == 1
        # Window 0 turns the guard off.
        drop(root, "email", "third.csv", emails(5))
        off = daemon_config(root, sandbox.api_base, upload={"duplicate_window_hours": 0})
        assert await run_once(off) == 0
        assert len(sandbox.uploads()) == 2


async def test_a_rejected_file_is_no_duplicate_when_dropped_again(tmp_path: Path) -> None:
    # Nothing was paid for a rejected file, so its duplicate marker goes with it.
    async with sandbox_server(quick_settings(tmp_path, fetch_urls=True)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base)
        drop(root, "email", "a.url", b"https://unreachable.example/x.csv\n")
        assert await run_once(config) == 1
        drop(root, "email", "a.url", b"https://unreachable.example/x.csv\n")
        assert await run_once(config) == 1
        failed = records(root, "failed")
        assert len(failed) == 2
        assert [r["reason"] for r in failed.values()] == ["rejected", "rejected"]
        assert not any((root / "markers").iterdir())


async def test_two_daemons_on_one_spool_take_each_file_once(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base)
        async with running(config) as one, running(config) as two:
            assert one.spool.owner != two.spool.owner
            expected = drop_many(root, 40)
            await wait_for(lambda: len(records(root, "done")) == len(expected),
                           what="40 files done by two daemons")
        # Each file finished by exactly one of them (how they share is up to timing).
        assert one.pipe.outcomes["done"] + two.pipe.outcomes["done"] == 40
        assert_each_done_once(root, sandbox, expected)


async def test_a_dead_daemons_job_is_taken_over_only_after_its_lease(tmp_path: Path) -> None:
    from daemon.spool import Owner, Spool

    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base, upload={"lease_seconds": 1.0})
        other = Spool(root, config.spool.types, owner=Owner("another-host", 1, "x"))
        other.prepare()
        other.heartbeat()
        job = other.claim("email", drop(root, "email", "theirs.csv", emails(3)), "multipart")
        assert job is not None
        async with running(config):
            await asyncio.sleep(0.3)
            # Their heartbeat is fresh: the job is not ours to take.
            assert records(root, "done") == {}
            await wait_for(lambda: "theirs.csv" in records(root, "done"), timeout=20,
                           what="takeover after the lease expired")
        assert len(sandbox.uploads()) == 1


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path``, for disk-full tests (root only)."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_disk_full_keeps_the_input_and_finishes_once_space_returns(
        tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "spool", "4m") as root:
        async with sandbox_server(quick_settings(tmp_path)) as sandbox:
            config = daemon_config(root, sandbox.api_base)
            data = emails(20000)  # ~430 KB in; the results are several times larger
            async with running(config) as service:
                filler = root / "filler"
                # Leave room for the input and its record, not for the results.
                with filler.open("wb") as fh, contextlib.suppress(OSError):
                    fh.write(b"\0" * (shutil.disk_usage(root).free - 2 * len(data)))
                drop(root, "email", "stuck.csv", data)
                await wait_for(lambda: sandbox.uploads() != [], what="uploaded")
                await asyncio.sleep(0.5)
                jobs = list(service.spool.jobs())
                assert records(root, "done") == {} and records(root, "failed") == {}
                assert jobs and (jobs[0] / "stuck.csv").read_bytes() == data
                filler.unlink()
                await wait_for(lambda: "stuck.csv" in records(root, "done"), timeout=30,
                               what="finished once space returned")
            assert len(sandbox.uploads()) == 1
            assert (root / "done" / "email" / "stuck.csv").read_bytes() == data


CRASH_IN_UNCLAIM = """
import asyncio, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.support import daemon_config
from daemon import spool
from daemon.service import Service

def crash(self, job_dir):  # kill -9 between linking the input back and removing the job
    os._exit(137)

spool.Spool._remove_job_dir = crash
asyncio.run(Service(daemon_config(Path(sys.argv[1]), sys.argv[2])).run(once=True))
"""


async def test_a_crash_while_returning_a_file_to_its_inbox_pays_once(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        sandbox.state.faults.credits = 0  # "insufficient credits": back to the inbox
        drop(root, "email", "list.csv", emails(5))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CRASH_IN_UNCLAIM, str(root), sandbox.api_base,
            str(Path(__file__).parent.parent), stderr=asyncio.subprocess.PIPE)
        _, err = await child.communicate()
        assert child.returncode == 137, err.decode()[-1500:]
        # The crash left the file back in its inbox and its job folder, marked returning.
        assert (root / "inbox" / "email" / "list.csv").exists()
        [record] = (root / "processing").glob("*/job.json")
        assert json.loads(record.read_text())["state"] == "returning"
        sandbox.state.faults.credits = None
        assert await run_once(daemon_config(root, sandbox.api_base)) == 0
        assert len(sandbox.uploads()) == 1
        assert set(records(root, "done")) == {"list.csv"} and records(root, "failed") == {}
