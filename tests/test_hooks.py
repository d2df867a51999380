"""The ``on_finish`` hook (issue 14, item 15): run for every finished file, at least once,
retried when it fails, never given the API key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, HooksConfig, load_config
from daemon.hooks import HookRunner, hook_environment
from daemon.metrics import Metrics
from daemon.spool import Job, Spool, new_job_id
from tests.conftest import StartSandbox
from tests.support import (
    FAKE_KEY,
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    running,
    start_daemon,
    wait_for,
    write_config_file,
)

#: A hook that records each call (argv and environment) as one JSON line in ``calls``.
#: While ``block`` exists it records the call as blocked and waits (a hook that hangs);
#: while ``fails`` holds a number above 0 it counts it down and exits 3.
HOOK = """\
import json, os, sys, time
from pathlib import Path
here = Path(sys.argv[1])
entry = {"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid()}
def say(**more):
    with open(here / "calls", "a") as fh:
        fh.write(json.dumps({**entry, **more}) + "\\n")
if (here / "block").exists():
    say(blocked=True)
    while (here / "block").exists():
        time.sleep(0.02)
    sys.exit(1)
fails = here / "fails"
if fails.exists() and int(fails.read_text()) > 0:
    fails.write_text(str(int(fails.read_text()) - 1))
    say(failed=True)
    print("the hook refuses", file=sys.stderr)
    sys.exit(3)
say()
"""


def hook_argv(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    (tmp_path / "hookdir").mkdir(exist_ok=True)
    return (sys.executable, str(script), str(tmp_path / "hookdir"))


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "hookdir" / "calls"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def succeeded(tmp_path: Path) -> list[dict[str, Any]]:
    return [c for c in calls(tmp_path) if not c.get("blocked") and not c.get("failed")]


def notices(root: Path) -> list[str]:
    folder = root / "hooks"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


async def test_each_finished_file_runs_the_hook_once(
        tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon's own environment holds the key, under its name and inside another
    # variable: the hook must see neither.
    monkeypatch.setenv("IPQS_API_KEY", FAKE_KEY)
    monkeypatch.setenv("SOME_URL", f"https://example.invalid/?key={FAKE_KEY}")
    monkeypatch.setenv("HOOK_CAN_SEE", "this")
    root = tmp_path / "spool"
    argv = hook_argv(tmp_path)
    config = daemon_config(root, sandbox.api_base, hooks={"on_finish": argv})
    async with running(config):
        for i in range(3):
            drop(root, "email", f"list{i}.csv", emails(2, seed=str(i)))
        drop(root, "email", "empty.csv", b"")  # a failed file runs it too
        await wait_for(lambda: len(succeeded(tmp_path)) == 4 and not notices(root),
                       what="four hook runs")
    done, failed = records(root, "done"), records(root, "failed")
    assert len(done) == 3 and len(failed) == 1
    expected = {str((root / "done/email" / f"{n}.json").absolute()): "done" for n in done}
    expected |= {str((root / "failed/email" / f"{n}.json").absolute()): "failed"
                 for n in failed}
    seen = succeeded(tmp_path)
    assert sorted(c["argv"][-1] for c in seen) == sorted(expected)  # each once
    for call in seen:
        record = call["argv"][-1]
        env = call["env"]
        assert call["argv"] == [str(tmp_path / "hookdir"), record]  # configured args first
        assert env["IPQS_BULKD_RECORD"] == record
        assert env["IPQS_BULKD_OUTCOME"] == expected[record]
        assert env["IPQS_BULKD_TYPE"] == "email"
        assert env["HOOK_CAN_SEE"] == "this"
        assert "IPQS_API_KEY" not in env and "SOME_URL" not in env
        assert not any(FAKE_KEY in value for value in [*env.values(), *call["argv"]])
    assert calls(tmp_path) == seen  # nothing failed, nothing ran twice


async def test_failing_hooks_never_hold_uploads_and_show_in_status_and_metrics(
        tmp_path: Path, sandbox: Sandbox) -> None:
    root = tmp_path / "spool"
    argv = hook_argv(tmp_path)
    (tmp_path / "hookdir" / "fails").write_text("1000")  # every run fails
    config = daemon_config(root, sandbox.api_base, hooks={"on_finish": argv})
    async with running(config) as service:
        for i in range(3):
            drop(root, "email", f"list{i}.csv", emails(2, seed=str(i)))
        await wait_for(lambda: len(records(root, "done")) == 3, what="three files done")
        await wait_for(lambda: service.pipe.hooks.failing() == 3, what="three failing hooks")
        assert "hooks pending 3 (3 failing)" in service.refresh_gauges()
        metrics = service.pipe.metrics.render()
        assert b"ipqs_bulkd_hooks_pending 3.0" in metrics
        assert b"ipqs_bulkd_hooks_failing 3.0" in metrics
        assert service.health.ready() == (True, "ready")  # the daemon itself is fine
    assert len(notices(root)) == 3  # still owed: the next start tries again
    assert len(records(root, "done")) == 3 and not list((root / "inbox/email").iterdir())


def test_the_environment_loses_the_key_wherever_it_is() -> None:
    env = hook_environment({"IPQS_API_KEY": "k" * 32, "A": "x", "B": f"y{'k' * 32}y",
                            "IPQS_BULKD_API_KEY": "other", "NOTIFY_SOCKET": "/run/n",
                            "IPQS_BULKD_SPOOL_ROOT": "/spool"}, "k" * 32)
    assert env == {"A": "x", "IPQS_BULKD_SPOOL_ROOT": "/spool"}


def test_the_key_in_the_hook_arguments_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[hooks]\non_finish = ["/bin/notify", "--token={FAKE_KEY}"]\n')
    with pytest.raises(ConfigError, match=r"hooks\.on_finish") as caught:
        load_config(config, {"IPQS_API_KEY": FAKE_KEY})
    assert FAKE_KEY not in str(caught.value)


def test_the_hook_variables_are_not_read_as_config_keys() -> None:
    # A hook may run an ipqs-bulkd command: its own variables must not be "unknown keys".
    config = load_config(None, {"IPQS_BULKD_OUTCOME": "done", "IPQS_BULKD_TYPE": "email",
                                "IPQS_BULKD_RECORD": "/spool/done/email/a.csv.json"})
    assert config.hooks.on_finish == ()


# -- the runner on a real spool ----------------------------------------------------------


def finished_job(spool: Spool, name: str = "a.csv", outcome: str = "done") -> Job:
    """A job finished through the spool (notice first, then the move), as the daemon does."""
    job_id = new_job_id()
    path = spool.inbox("email") / name
    path.write_bytes(emails(1))
    job = spool.claim("email", path, "multipart", job_id)
    assert job is not None
    job.outcome = outcome
    spool.finish(job)
    return job


def make_spool(root: Path) -> Spool:
    spool = Spool(root, ("email",), hook_notices=True)
    spool.prepare()
    return spool


def attempts_on_disk(spool: Spool, job: Job) -> int:
    notice = spool.notices.load(job.job)
    return 0 if notice is None else notice.attempts


async def test_a_failing_hook_is_retried_with_backoff_and_shows_as_failing(
        tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    job = finished_job(spool)
    (tmp_path / "hookdir").mkdir()
    (tmp_path / "hookdir" / "fails").write_text("2")
    metrics, stop = Metrics(), asyncio.Event()
    runner = HookRunner(HooksConfig(on_finish=hook_argv(tmp_path)), spool, metrics, stop,
                        secret=FAKE_KEY, initial_seconds=0.05, max_seconds=0.2)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: len(calls(tmp_path)) >= 1, what="first attempt")
        await wait_for(lambda: runner.failing() == 1, what="counted as failing")
        assert runner.pending() == 1
        # The notice says so on disk, for `status` to show without the daemon.
        await wait_for(lambda: attempts_on_disk(spool, job) >= 1, what="attempts on disk")
        notice = spool.notices.load(job.job)
        assert notice is not None and "exit status 3: the hook refuses" in str(
            notice.last_error)
        await wait_for(lambda: not notices(spool.root), what="the hook to succeed")
    finally:
        stop.set()
        await task
    assert [bool(c.get("failed")) for c in calls(tmp_path)] == [True, True, False]
    assert runner.pending() == 0 and runner.failing() == 0
    assert metrics.hook_runs.labels("failed")._value.get() == 2
    assert metrics.hook_runs.labels("ok")._value.get() == 1
    # It never moves a file back.
    assert (spool.done("email") / "a.csv").exists()


async def test_a_slow_hook_is_killed_at_its_timeout_and_retried(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    job = finished_job(spool)
    (tmp_path / "hookdir").mkdir()
    (tmp_path / "hookdir" / "block").touch()
    metrics, stop = Metrics(), asyncio.Event()
    runner = HookRunner(HooksConfig(on_finish=hook_argv(tmp_path), timeout_seconds=0.5),
                        spool, metrics, stop, secret=FAKE_KEY, initial_seconds=0.05)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: metrics.hook_runs.labels("timeout")._value.get() >= 1,
                       what="a timeout")
        first = calls(tmp_path)[0]
        assert not _alive(first["pid"])  # killed, not left running
        notice = spool.notices.load(job.job)
        assert notice is not None and "timed out" in str(notice.last_error)
        (tmp_path / "hookdir" / "block").unlink()
        await wait_for(lambda: not notices(spool.root), what="the retried hook to succeed")
    finally:
        stop.set()
        await task
    assert succeeded(tmp_path)[-1]["argv"][-1] == str(
        (spool.done("email") / "a.csv.json").absolute())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits to be reaped by whoever started it.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_notice_is_written_before_the_move(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path / "spool")
    path = spool.inbox("email") / "a.csv"
    path.write_bytes(emails(1))
    job = spool.claim("email", path, "multipart")
    assert job is not None
    job.outcome = "done"

    def crash(*_args: object) -> bool:
        raise OSError("killed during the move")

    monkeypatch.setattr(spool, "_place", crash)
    with pytest.raises(OSError):
        spool.finish(job)
    notice = spool.notices.load(job.job)
    assert notice is not None and notice.record == "done/email/a.csv.json"
    assert not (spool.done("email") / "a.csv").exists()  # not moved yet, already owed
    monkeypatch.undo()
    record = spool.finish(job)  # what recovery does after the crash
    assert record == spool.root / notice.record


async def test_leftover_notices_run_at_start_and_a_vanished_record_is_dropped(
        tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    kept = finished_job(spool, "a.csv")
    gone = finished_job(spool, "b.csv")
    (spool.done("email") / "b.csv.json").unlink()  # e.g. moved away by an operator
    stop = asyncio.Event()
    runner = HookRunner(HooksConfig(on_finish=hook_argv(tmp_path)), spool, Metrics(), stop,
                        secret=FAKE_KEY)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: not notices(spool.root), what="leftovers handled")
    finally:
        stop.set()
        await task
    assert [c["argv"][-1] for c in calls(tmp_path)] == [
        str((spool.done("email") / "a.csv.json").absolute())]
    assert spool.notices.load(kept.job) is None and spool.notices.load(gone.job) is None


# -- kill -9 -------------------------------------------------------------------------------


async def test_the_hook_runs_after_a_kill_9_between_finish_and_hook(
        tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = await start_sandbox(quick_settings(tmp_path))
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)},
                           hooks={"on_finish": hook_argv(tmp_path)},
                           log={"level": "info", "format": "json"})
    config_file = write_config_file(tmp_path / "config.toml", config)
    (tmp_path / "hookdir" / "block").touch()  # the first daemon's hooks hang...
    for i in range(3):
        drop(root, "email", f"list{i}.csv", emails(2, seed=str(i)))
    with (tmp_path / "daemon1.log").open("wb") as log1:
        first = await start_daemon(config_file, stderr=log1)
        try:
            await wait_for(lambda: len(records(root, "done")) == 3
                           and len(calls(tmp_path)) >= 1, what="files finished, a hook on")
        finally:
            first.send_signal(signal.SIGKILL)  # ...and the daemon dies under them
            await first.wait()
    for call in calls(tmp_path):  # hooks live in their own session: end them as kill -9 would
        os.kill(call["pid"], signal.SIGKILL)
    assert len(notices(root)) == 3, (tmp_path / "daemon1.log").read_text()[-2000:]
    (tmp_path / "hookdir" / "block").unlink()
    second = await start_daemon(config_file, "--once")
    _, err = await second.communicate()
    assert second.returncode == 0, err.decode()[-2000:]
    expected = sorted(str((root / "done/email" / f"{n}.json").absolute())
                      for n in records(root, "done"))
    assert sorted({c["argv"][-1] for c in succeeded(tmp_path)}) == expected
    assert notices(root) == []
    assert len(sandbox.uploads()) == 3  # and nothing was paid twice
