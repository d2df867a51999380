"""One read of each file (issue 15): a multipart file is hashed, checked and counted while
its body goes out; the cap, the money and the duplicate marker are settled before its last
chunk, and anything that says no stops the body there, so IPQS gets no whole file.

The real sandbox over loopback, real files; the crash test kills a real daemon process."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from daemon.inputs import FileFacts
from daemon.spool import Job, Spool, fs
from tests.support import (
    daemon_config,
    drop,
    emails,
    job_state,
    quick_settings,
    records,
    run_once,
    sandbox_server,
    sha256,
    start_daemon,
    wait_for,
    write_config_file,
)


@pytest.fixture
def no_separate_pass(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the spool reads in a pass of its own (before sending) is noted here."""
    passes: list[Path] = []
    real = fs.inspect_file

    def noted(path: Path) -> FileFacts:
        passes.append(path)
        return real(path)

    monkeypatch.setattr("daemon.spool.store.inspect_file", noted)
    return passes


async def test_a_file_is_read_once_and_its_facts_come_from_the_body(
        tmp_path: Path, no_separate_pass: list[Path]) -> None:
    data = b"\xef\xbb\xbf" + emails(30_000) + b"\n  \nlast@example.com"  # BOM, blank, no EOL
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "list.csv", data)
        assert await run_once(daemon_config(root, sandbox.api_base)) == 0
        [upload] = sandbox.uploads()
    record = records(root, "done")["list.csv"]
    assert no_separate_pass == []
    assert record["sha256"] == sha256(data) == upload["sha256"]
    assert record["bytes"] == len(data) and record["rows"] == 30_001 == upload["rows"]


async def test_a_duplicate_is_stopped_before_its_last_chunk(
        tmp_path: Path, no_separate_pass: list[Path]) -> None:
    data = emails(50_000)  # several chunks: the body is well under way when it stops
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base)
        drop(root, "email", "first.csv", data)
        assert await run_once(config) == 0
        drop(root, "email", "again.csv", data)
        assert await run_once(config) == 1  # a file failed
        assert len(sandbox.uploads()) == 1  # one job at IPQS, one payment
        assert sandbox.state.stats.requests["upload"] == 2  # the second body was started
        assert list(sandbox.state.incoming_path().parent.glob("*.part")) == []
    failed = records(root, "failed")["again.csv"]
    assert failed["reason"] == "duplicate" and failed["sha256"] == sha256(data)
    assert failed.get("id") is None and failed["rows"] == 50_000
    assert no_separate_pass == []
    assert (root / "failed" / "email" / "again.csv").read_bytes() == data


@pytest.mark.parametrize(("data", "problem"), [
    (b"a@example.com\n\0\0binary\n" * 40_000, "binary"),
    (b"caf\xe9@example.com\n" * 40_000, "not UTF-8"),
    (b" \n\n  \r\n" * 1000, "holds no rows"),
])
async def test_a_file_that_is_not_csv_text_is_stopped_and_fails(
        tmp_path: Path, data: bytes, problem: str) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "bad.csv", data)
        assert await run_once(daemon_config(root, sandbox.api_base)) == 1  # a file failed
        assert sandbox.uploads() == []
        assert sandbox.state.jobs == {}
    failed = records(root, "failed")["bad.csv"]
    assert failed["reason"] == "invalid-input" and problem in failed["error"]
    assert list((root / "markers").glob("*")) == []  # nothing taken: nothing was sent


async def test_a_file_over_the_cap_is_stopped_and_fails_too_large(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base, budget={"max_rows_per_file": 1000})
        drop(root, "email", "big.csv", emails(40_000))
        drop(root, "email", "small.csv", emails(1000, seed="s"))
        assert await run_once(config) == 1  # a file failed
        uploads = sandbox.uploads()
    assert [u["rows"] for u in uploads] == [1000]
    failed = records(root, "failed")["big.csv"]
    assert failed["reason"] == "too-large" and "40000 rows" in failed["error"]
    assert records(root, "done")["small.csv"]["rows"] == 1000
    # Its marker was never taken: the same content may go once the cap is raised.
    assert not (root / "markers" / sha256(emails(40_000))).exists()


async def test_a_daily_budget_spent_at_the_last_chunk_sends_the_file_back(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base, budget={"max_rows_per_day": 1500},
                               upload={"concurrency": 1})
        drop(root, "email", "a.csv", emails(1000, seed="a"))
        drop(root, "email", "b.csv", emails(1000, seed="b"))
        assert await run_once(config) == 1  # a file left waiting has no outcome yet
        assert len(sandbox.uploads()) == 1
        # A row still fit when the second body started; its 1000 did not at its last chunk.
        assert sandbox.state.stats.requests["upload"] == 2
    assert len(records(root, "done")) == 1 and records(root, "failed") == {}
    left = sorted(p.name for p in (root / "inbox" / "email").iterdir())
    assert len(left) == 1 and left[0] in ("a.csv", "b.csv")  # waits, unchanged, for tomorrow
    assert list((root / "processing").glob("[!.]*")) == []  # no job left behind



async def test_a_file_written_to_during_the_last_chunk_checks_is_not_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The producer writes again while the checks before the last chunk run (the marker is
    # being set to "sending"): what was read is no longer the file, so nothing goes.
    real = Spool.update_mark

    def producer_writes_meanwhile(self: Spool, job: Job, *, sending: bool = False) -> None:
        real(self, job, sending=sending)
        if sending:
            with self.input_path(job).open("ab") as fh:
                fh.write(b"late@example.com\n")

    monkeypatch.setattr(Spool, "update_mark", producer_writes_meanwhile)
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "list.csv", emails(20_000))
        assert await run_once(daemon_config(root, sandbox.api_base)) == 1  # it failed
        assert sandbox.uploads() == []
    failed = records(root, "failed")["list.csv"]
    assert failed["reason"] == "invalid-input" and "changed" in failed["error"]
    assert list((root / "markers").glob("*")) == []  # given back: nothing was sent
    assert (root / "failed" / "email" / "list.csv").read_bytes().endswith(b"late@example.com\n")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("written_after", [False, True])
async def test_a_daemon_killed_mid_body_sends_the_file_once_without_a_lookup(
        tmp_path: Path, written_after: bool) -> None:
    """Killed mid-body, the job is resumed as claimed and sent once; if its producer wrote
    to it meanwhile, it is not the file claimed any more and is not sent at all."""
    settings = quick_settings(tmp_path)
    settings.faults.receive_kib_per_second = 8 * 1024  # a 24 MB body takes ~3 s
    data = emails(1_000_000)
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        config = write_config_file(tmp_path / "config.toml", daemon_config(
            root, sandbox.api_base, log={"level": "info", "format": "json"}))
        incoming = sandbox.state.incoming_path().parent
        first_log = tmp_path / "first.log"
        with first_log.open("wb") as err:
            first = await start_daemon(config, stderr=err)
            drop(root, "email", "big.csv", data)
            await wait_for(lambda: any(p.stat().st_size > 4_000_000
                                       for p in incoming.glob("*.part")),
                           timeout=60, what="the body under way")
            # Until the last chunk, nothing of it can be a job at IPQS: the record says so.
            assert job_state(root) == "claimed"
            first.send_signal(signal.SIGKILL)
            await first.wait()
        await wait_for(lambda: not list(incoming.glob("*.part")), what="the cut body dropped")
        assert sandbox.uploads() == []
        if written_after:
            [taken] = (root / "processing").glob("*/big.csv")
            with taken.open("ab") as fh:
                fh.write(b"late@example.com\n")
        second_log = tmp_path / "second.log"
        with second_log.open("wb") as err:
            second = await start_daemon(config, stderr=err)
            outcome = "failed" if written_after else "done"
            try:
                await wait_for(lambda: "big.csv" in records(root, outcome), timeout=90,
                               what=f"the file {outcome} after the restart")
            finally:
                second.send_signal(signal.SIGTERM)
                await asyncio.wait_for(second.wait(), timeout=30)
        uploaded = [u["sha256"] for u in sandbox.uploads()]
    said = [json.loads(line)["event"] for line in second_log.read_text().splitlines()
            if line.startswith("{")]
    assert "job_resumed" in said
    assert "upload_not_found" not in said and "upload_adopted" not in said  # no lookup
    if written_after:
        assert uploaded == []
        assert "changed after it was claimed" in records(root, "failed")["big.csv"]["error"]
    else:
        assert uploaded == [sha256(data)]
        assert records(root, "done")["big.csv"]["sha256"] == sha256(data)
