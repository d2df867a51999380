"""A job whose upload may be at IPQS is never paid for again: not when its lookup is
refused, not when the account is refused meanwhile, not when its duplicate marker is
judged by another drop (review findings 1-3)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.api import CsvPage, IpqsClient
from daemon.cli import main
from daemon.errors import (
    LookupIncompleteError,
    LostAnswerError,
    RejectedError,
    TransientError,
)
from daemon.job.conversation import Conversation
from daemon.job.state import JobState, advance
from daemon.pipeline import Pipeline
from daemon.sandbox import SandboxSettings
from daemon.spool import Job, Spool, markers
from daemon.spool.leases import Owner
from tests.conftest import StartSandbox
from tests.support import (
    FAKE_KEY,
    Sandbox,
    daemon_config,
    drop,
    emails,
    records,
    run_once,
    running,
    wait_for,
    write_config_file,
)


def _age(job_dir: Path) -> None:
    then = time.time() - 3600
    os.utime(job_dir, (then, then))


async def _lost_upload_then(sandbox_fault: str, tmp_path: Path, start_sandbox: StartSandbox,
                            sandbox_settings: SandboxSettings,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The first POST reaches IPQS but its answer is lost; the lookup that follows meets
    ``sandbox_fault``. A second run, with IPQS well again, must adopt the first upload."""
    sandbox = await start_sandbox(sandbox_settings)
    faults = sandbox.state.faults
    faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})
    real_find = Conversation._find

    async def find(self: Conversation, job: Job) -> object:
        if sandbox_fault == "invalid_key":
            faults.invalid_key = True  # 401 to the list call: an AccountError
        return await real_find(self, job)

    monkeypatch.setattr(Conversation, "_find", find)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    drop(root, "email", "a.csv", emails(5))
    await run_once(config)
    assert len(sandbox.uploads()) == 1
    # Still ours, still uploading, still marked: nothing back in the inbox.
    assert not (root / "inbox" / "email" / "a.csv").exists()
    [record] = (root / "processing").glob("*/job.json")
    assert json.loads(record.read_text())["state"] == "uploading"
    assert list((root / "markers").iterdir())

    _age(record.parent)  # its owner (this process's earlier daemon) is gone
    monkeypatch.setattr(Conversation, "_find", real_find)
    faults.invalid_key, faults.lost_answer_rate = False, 0.0
    assert await run_once(config) == 0
    assert len(sandbox.uploads()) == 1
    assert records(root, "done")["a.csv"]["id"] == sandbox.uploads()[0]["id"]


async def test_an_account_error_during_the_lookup_keeps_the_maybe_paid_job(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await _lost_upload_then("invalid_key", tmp_path, start_sandbox, sandbox_settings,
                            monkeypatch)


async def test_a_refused_lookup_is_asked_again_and_the_maybe_paid_job_adopted(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox = await start_sandbox(sandbox_settings)
    faults = sandbox.state.faults
    faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})
    real_find, refusals = IpqsClient.find, [1]

    async def find(self: IpqsClient, *args: Any, **kwargs: Any) -> Any:
        if refusals:  # the list call refused once, as IPQS answers success: false
            refusals.pop()
            raise RejectedError("Invalid page requested.")
        faults.lost_answer_rate = 0.0
        return await real_find(self, *args, **kwargs)

    monkeypatch.setattr(IpqsClient, "find", find)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    drop(root, "email", "a.csv", emails(5))
    assert await run_once(config) == 0
    drop(root, "email", "again.csv", emails(5))  # the same content, dropped again
    assert await run_once(config) == 1  # one file failed (as a duplicate)
    assert len(sandbox.uploads()) == 1 and not refusals
    assert records(root, "done")["a.csv"]["id"] == sandbox.uploads()[0]["id"]
    assert records(root, "failed")["again.csv"]["reason"] == "duplicate"


async def test_a_refused_post_after_a_lost_one_keeps_the_content_taken(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first POST's answer is lost and the lookup does not see it (yet); the second POST
    is refused. The first may still show up at IPQS: a re-drop must not be paid."""
    sandbox = await start_sandbox(sandbox_settings)
    posts: list[str] = []

    async def upload_file(self: IpqsClient, file_type: str, path: Path, file_name: str, *,
                          before_last: Any = None, inspection: Any = None,
                          **kwargs: Any) -> Any:
        # The whole body goes out, as the real client's does: read once, fenced, then the
        # answer (lost, or a refusal).
        if inspection is not None:
            inspection.feed(path.read_bytes())
        if before_last is not None:
            await before_last()
        posts.append("post")
        if len(posts) == 1:
            raise LostAnswerError("upload: connection lost", cause="dropped")
        raise RejectedError("The file could not be processed.")

    monkeypatch.setattr(IpqsClient, "upload_file", upload_file)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    drop(root, "email", "a.csv", emails(5))
    assert await run_once(config) == 1
    assert records(root, "failed")["a.csv"]["reason"] == "rejected" and len(posts) == 2
    [marker] = (root / "markers").iterdir()
    assert json.loads(marker.read_text())["sending"] is True
    drop(root, "email", "again.csv", emails(5))
    assert await run_once(config) == 1
    assert len(posts) == 2
    assert records(root, "failed")["again.csv"]["reason"] == "duplicate"


def test_two_takers_of_a_stale_marker_let_only_one_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A and B both read the same stale marker; A replaces it with its own; only then does
    B move "the stale marker" aside: what it moved is A's, which must stay and win."""
    spool = Spool(tmp_path / "spool", ("email",))
    spool.prepare()
    sha = "ab" * 32
    spool.marker(sha).write_text(json.dumps({"job": "old", "id": 5,
                                             "created": time.time() - 10 * 86400}))
    both_read, a_done = threading.Barrier(2, timeout=10), threading.Event()
    first: set[str] = set()
    real_read = markers.read_json

    def read_json(path: Path) -> Any:
        data = real_read(path)
        name = threading.current_thread().name
        if name not in first:  # both read the stale marker before either moves it
            first.add(name)
            both_read.wait()
            if name == "B":
                assert a_done.wait(10)
        return data

    monkeypatch.setattr(markers, "read_json", read_json)
    earlier: dict[str, Any] = {}

    def take(name: str) -> None:
        job = Job(job=name, type="email", source=f"{name}.csv", file_name=name,
                  method="multipart", sha256=sha)
        earlier[name] = spool.mark(job, 86400)
        if name == "A":
            a_done.set()

    threads = [threading.Thread(target=take, args=(n,), name=n) for n in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert earlier["A"] is None  # A took the content
    assert earlier["B"] is not None and earlier["B"]["job"] == "A"
    assert json.loads(spool.marker(sha).read_text())["job"] == "A"


async def test_a_malformed_job_record_is_left_alone_and_the_daemon_goes_on(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings) -> None:
    """A record without its fields, or with a state no daemon writes, neither crashes the
    start nor loses the job's input or results (review finding 5)."""
    sandbox = await start_sandbox(sandbox_settings)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    spool = Spool(root, ("email",))
    spool.prepare()
    fields = {"job": "20260101T000000-00000001", "type": "email", "source": "odd.csv",
              "file_name": "odd-00000001", "method": "multipart", "state": "teleported"}
    odd = root / "processing" / fields["job"]
    (odd / "results").mkdir(parents=True)
    (odd / "odd.csv").write_bytes(emails(2))
    (odd / "results" / "all.csv").write_text("paid results\n")
    (odd / "job.json").write_text(json.dumps(fields))
    partial = root / "processing" / "20260101T000000-00000002"
    (partial / "results").mkdir(parents=True)
    (partial / "results" / "all").write_text("paid results too\n")
    (partial / "partial.csv").write_bytes(emails(3))
    (partial / "job.json").write_text(json.dumps({"job": partial.name, "state": "uploading"}))
    _age(partial)
    drop(root, "email", "fine.csv", emails(4))
    await run_once(config)
    assert set(records(root, "done")) == {"fine.csv"}
    assert (odd / "results" / "all.csv").read_text() == "paid results\n"
    assert (odd / "odd.csv").exists()
    # The record without its fields is a job folder without a record: never sent, and failed
    # (with its paid results) once it has stayed unchanged for a lease by our own clock.
    assert (partial / "partial.csv").exists() and len(sandbox.uploads()) == 1
    quick = daemon_config(root, sandbox.api_base, spool={"types": ("email",)},
                          upload={"lease_seconds": 1.0})
    async with running(quick):
        await wait_for(lambda: "partial.csv" in records(root, "failed"),
                       what="the record-less folder failed after a quiet lease")
    assert records(root, "failed")["partial.csv"]["reason"] == "invalid-input"
    assert (root / "failed" / "email" / "partial.csv").read_bytes() == emails(3)
    assert (root / "failed" / "email" / "partial.csv.all.csv").read_text() == \
        "paid results too\n"
    assert len(sandbox.uploads()) == 1


async def test_a_resend_after_absent_is_admitted_like_a_first_send(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings) -> None:
    """A job resumed in ``uploading`` whose lookup says absent is sent again only if the
    money checks allow it, as a freshly claimed one (review finding 6)."""
    sandbox_settings.faults.credits = 2
    sandbox = await start_sandbox(sandbox_settings)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    spool = Spool(root, ("email",))
    spool.prepare()
    inbox = spool.inbox("email")
    (inbox / "a.csv").write_bytes(emails(4))
    job = spool.claim("email", inbox / "a.csv", "multipart")
    assert job is not None and spool.inspect(job) is None
    advance(job, JobState.UPLOADING)  # a daemon died right after saving it
    job.uploads = 1
    job.owner = Owner(spool.owner.host, _reaped_pid(), "00000000").name
    spool.save(job)
    await run_once(config)
    assert sandbox.state.stats.faults["credits"] == 0  # no POST IPQS had to refuse
    assert sandbox.uploads() == []
    assert json.loads((spool.job_dir(job) / "job.json").read_text())["state"] == "uploading"


async def test_a_list_without_total_pages_is_paged_while_full(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer without ``total_pages`` is not the end of the list: a full page leads on,
    and a short one that does not reach the floor leaves the lookup incomplete, never
    "absent" (review finding 4)."""
    async with IpqsClient(sandbox.api_base, FAKE_KEY) as client:
        for n in range(60):
            await client.upload_rows("email", [[f"u{n}@example.com"]], f"job-{n}")
        real_list = IpqsClient.list

        async def without_total(self: IpqsClient, *args: Any, **kwargs: Any) -> CsvPage:
            page = await real_list(self, *args, **kwargs)
            return dataclasses.replace(page, total_pages=0)

        monkeypatch.setattr(IpqsClient, "list", without_total)
        found = await client.find("job-3", "email")  # on page 2 of 2
        assert found is not None and found.file_name == "job-3"
        with pytest.raises(LookupIncompleteError, match="without total_pages"):
            await client.find("never-sent", "email")
        newest = await client.newest_id()
        assert newest is not None  # a floor reached is a sure "absent"
        assert await client.find("never-sent", "email", floor_id=newest - 5) is None


async def test_forgetting_a_job_does_not_look_at_the_disk(
        tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline.forget runs on the event loop: whether the job stays behind in processing/
    is known without a stat, which may hang on a stuck mount (review, minor)."""
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    spool = Spool(root, ("email",))
    spool.prepare()
    async with IpqsClient(sandbox.api_base, FAKE_KEY) as client:
        pipe = Pipeline(config, spool, client, asyncio.Event())
        jobs = []
        for name in ("back.csv", "left.csv"):
            (spool.inbox("email") / name).write_bytes(emails(2))
            job = spool.claim("email", spool.inbox("email") / name, "multipart")
            assert job is not None
            pipe.started(job)
            jobs.append(job)
        await pipe.unclaim(jobs[0])

        def no_stat(self: Path, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"a stat on the event loop: {self}")

        monkeypatch.setattr(Path, "exists", no_stat)
        try:
            for job in jobs:
                pipe.forget(job)
        finally:
            monkeypatch.undo()
    assert pipe.jobs.left_count() == 1  # left.csv, still in processing/
    assert (spool.inbox("email") / "back.csv").exists()


def test_an_unsent_marker_lives_while_its_daemon_does(tmp_path: Path) -> None:
    """A marker without an id is judged by its daemon's lease, not by whether its job
    folder shows: through a second SSHFS mount a fresh folder may not show yet, and the
    same content went through both mounts (tests/test_shares.py, 1 run in 7)."""
    spool = Spool(tmp_path / "spool", ("email",))
    spool.prepare()
    spool.heartbeat()
    gone = Owner(spool.owner.host, _reaped_pid(), "00000000").name
    living = Owner(spool.owner.host, os.getppid(), "11111111").name  # another daemon
    for owner, stale in ((living, False), (gone, True)):
        job = Job(job=f"20260101T000000-{owner[-8:]}", type="email", source="a.csv",
                  file_name="a", method="multipart", sha256=("cd" if stale else "ab") * 32,
                  owner=owner)
        assert spool.mark(job, 86400) is None
        mark = json.loads(spool.marker(job.sha256 or "").read_text())
        mark["owner"] = owner  # as that daemon would have written it
        # Its job folder does not show (not made here at all).
        assert not (spool.processing / job.job).exists()
        assert spool.marks.stale(mark, 86400) is stale


def _bare_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line as a user runs it: configured by --config alone, logging untouched."""
    for name in list(os.environ):
        if name == "IPQS_API_KEY" or name.startswith("IPQS_BULKD_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr("daemon.cli.configure", lambda *args, **kwargs: None)


def _reaped_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_a_submit_whose_answers_were_lost_keeps_the_content_taken(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``submit`` gives up (``--timeout``) on an upload whose answer was lost and whose
    lookup never got an answer: "the duplicate guard keeps the content marked", so a later
    drop of the content must not be paid again (review finding 2, the submit side: its
    marker had no job folder, so it was stale at once)."""
    sandbox = await start_sandbox(sandbox_settings)
    faults = sandbox.state.faults
    faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})

    async def find(self: IpqsClient, *args: Any, **kwargs: Any) -> None:
        raise TransientError("list: connection lost", cause="dropped")

    monkeypatch.setattr(IpqsClient, "find", find)
    _bare_cli(monkeypatch)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    mine = tmp_path / "mine.csv"
    mine.write_bytes(emails(5))
    path = write_config_file(tmp_path / "config.toml", config)
    code = await asyncio.to_thread(
        main, ["submit", str(mine), "--type", "email", "--config", str(path),
               "--timeout", "1"])
    assert code != 0
    sent = len(sandbox.uploads())
    assert sent == 1
    monkeypatch.undo()
    [marker] = (root / "markers").iterdir()
    assert json.loads(marker.read_text())["sending"] is True
    faults.lost_answer_rate = 0.0
    drop(root, "email", "again.csv", emails(5))
    await run_once(config)
    assert len(sandbox.uploads()) == sent
    assert records(root, "failed")["again.csv"]["reason"] == "duplicate"


async def test_a_submit_whose_file_changes_before_a_resend_keeps_the_content_taken(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first POST's answer is lost and the lookups do not see it (IPQS's list lags);
    before the re-send the file changes, so submit stops. The first POST may still show up
    at IPQS: its marker must stay, and a later drop of that content must not be paid."""
    sandbox = await start_sandbox(sandbox_settings)
    faults = sandbox.state.faults
    faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})
    mine = tmp_path / "mine.csv"
    original = emails(5)
    mine.write_bytes(original)

    async def find(self: IpqsClient, *args: Any, **kwargs: Any) -> None:
        mine.write_bytes(original + b"late@example.com\n")  # written to meanwhile
        return None  # not in the list (yet)

    monkeypatch.setattr(IpqsClient, "find", find)
    _bare_cli(monkeypatch)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    path = write_config_file(tmp_path / "config.toml", config)
    code = await asyncio.to_thread(
        main, ["submit", str(mine), "--type", "email", "--config", str(path),
               "--timeout", "30"])
    assert code != 0
    assert len(sandbox.uploads()) == 1
    monkeypatch.undo()
    [marker] = (root / "markers").iterdir()
    assert json.loads(marker.read_text())["sending"] is True
    faults.lost_answer_rate = 0.0
    drop(root, "email", "again.csv", original)
    await run_once(config)
    assert len(sandbox.uploads()) == 1
    assert records(root, "failed")["again.csv"]["reason"] == "duplicate"
