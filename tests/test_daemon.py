"""The daemon end to end against the real sandbox on loopback, over real folders."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest

from daemon import ALL_TYPES
from daemon.api import IpqsClient
from daemon.spool import SUBMITTED, UPLOADING, Owner, Spool
from tests.support import (
    FAKE_KEY,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    run_once,
    running,
    sandbox_server,
    sha256,
    wait_for,
)

DEAD_PID = 2**22 + 12345  # above any pid_max: never a live process

SAMPLES = {
    "email": b"a@example.com\nnot-an-email\nb@example.org\n",
    "proxy": b"8.8.8.8\n1.1.1.1\nnot-an-ip\n",
    "phone": b"+14155550100\n12\n",
    "url": b"https://example.com\nexample.org/path\n",
    "leaked_email": b"a@example.com\n",
    "leaked_password": b"hunter2\n",
    "leaked_username": b"alice\n",
}


async def test_every_type_goes_to_done_with_record_and_results(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        for file_type in ALL_TYPES:
            drop(root, file_type, f"{file_type}-list.csv", SAMPLES[file_type])
        assert await run_once(daemon_config(root, sandbox.api_base)) == 0
        uploads = sandbox.uploads()
    assert sorted(u["sha256"] for u in uploads) == sorted(sha256(d) for d in SAMPLES.values())
    for file_type in ALL_TYPES:
        name = f"{file_type}-list.csv"
        record = records(root, "done", file_type)[name]
        upload = next(u for u in uploads if u["file_name"] == record["file_name"])
        assert (root / "done" / file_type / name).read_bytes() == SAMPLES[file_type]
        assert record["id"] == upload["id"] and record["type"] == file_type
        assert record["source"] == name and record["method"] == "multipart"
        assert record["sha256"] == sha256(SAMPLES[file_type])
        assert record["bytes"] == len(SAMPLES[file_type])
        assert record["status"] == "FINISHED"
        assert record["results"] == {"all": f"{name}.all.csv"}
        assert record["submitted_at"].endswith("Z") and record["finished_at"].endswith("Z")
        assert isinstance(record["invalid_records"], int)
        assert (root / "done" / file_type / f"{name}.all.csv").stat().st_size > 0
    assert list((root / "processing").iterdir()) == [root / "processing" / ".owners"]
    assert not any((root / "inbox").rglob("*.csv"))


async def test_json_rows_and_url_drop(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "rows.csv", b"\xef\xbb\xbfa@example.com,extra\r\nb@example.com\r\n")
        drop(root, "url", "remote.url", b"https://files.example.com/list.csv\n")
        config = daemon_config(root, sandbox.api_base, upload={"method": "json"})
        assert await run_once(config) == 0
        uploads = {u["method"]: u for u in sandbox.uploads()}
    assert set(uploads) == {"json", "url"}
    assert uploads["json"]["rows"] == 2
    assert uploads["url"]["url"] == "https://files.example.com/list.csv"
    assert records(root, "done", "email")["rows.csv"]["method"] == "json"
    assert records(root, "done", "url")["remote.url"]["method"] == "url"


async def test_rejected_file_goes_to_failed_with_ipqs_message(tmp_path: Path) -> None:
    # With real fetching on, the sandbox (like IPQS) refuses a link it cannot fetch.
    async with sandbox_server(quick_settings(tmp_path, fetch_urls=True)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "remote.url", b"https://unreachable.example/list.csv\n")
        drop(root, "email", "fine.csv", b"a@example.com\n")
        assert await run_once(daemon_config(root, sandbox.api_base)) == 1
    failed = records(root, "failed")["remote.url"]
    assert failed["reason"] == "rejected" and failed["error"]
    assert "id" not in failed
    assert (root / "failed" / "email" / "remote.url").exists()
    assert "fine.csv" in records(root, "done")


async def test_every_result_set_that_is_not_empty(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "mixed.csv", emails(40) + b"broken\n")
        config = daemon_config(root, sandbox.api_base,
                               results={"sets": ("all", "clean", "bad", "pristine")})
        assert await run_once(config) == 0
    record = records(root, "done")["mixed.csv"]
    assert {"all", "bad"} <= set(record["results"])
    for name in record["results"].values():
        assert (root / "done" / "email" / name).exists()
    all_rows = (root / "done" / "email" / "mixed.csv.all.csv").read_text().splitlines()
    assert len(all_rows) == 42  # a header row and one row per input line


async def test_name_clash_gets_a_suffix_and_nothing_is_overwritten(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        earlier = root / "done" / "email"
        earlier.mkdir(parents=True)
        (earlier / "list.csv").write_bytes(b"earlier input\n")
        (earlier / "list.csv.json").write_text("{}")
        drop(root, "email", "list.csv", b"new@example.com\n")
        assert await run_once(daemon_config(root, sandbox.api_base)) == 0
    assert (earlier / "list.csv").read_bytes() == b"earlier input\n"
    assert (earlier / "list.csv.json").read_text() == "{}"
    [placed] = [name for name in records(root, "done") if name != "list.csv"]
    assert re.fullmatch(r"list\.\d{8}T\d{6}-[0-9a-f]{8}\.csv", placed)
    assert (earlier / placed).read_bytes() == b"new@example.com\n"
    assert records(root, "done")[placed]["results"] == {"all": f"{placed}.all.csv"}


async def test_restart_resumes_inbox_and_processing_without_second_upload(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base)
        # The jobs of an earlier daemon process, now dead.
        spool = Spool(root, config.spool.types,
                      owner=dataclasses.replace(Owner.current(), pid=DEAD_PID))
        spool.prepare()
        # 1: claimed, nothing sent yet.
        claimed = spool.claim("email", drop(root, "email", "claimed.csv", emails(3, "c")),
                              "multipart")
        # 2: "uploading" saved, the POST never happened (crash right before it).
        half = spool.claim("email", drop(root, "email", "half.csv", emails(3, "h")),
                           "multipart")
        # 3: uploaded and accepted, crash before anything else.
        sent = spool.claim("email", drop(root, "email", "sent.csv", emails(3, "s")),
                           "multipart")
        assert claimed and half and sent
        for job in (claimed, half, sent):
            spool.inspect(job)
        half.state = UPLOADING
        spool.save(half)
        async with IpqsClient(sandbox.api_base, FAKE_KEY) as client:
            answer = await client.upload_file("email", spool.input_path(sent), sent.file_name)
        sent.id, sent.state = answer.id, SUBMITTED
        spool.save(sent)
        drop(root, "email", "waiting.csv", emails(3, "w"))
        assert await run_once(config) == 0
        uploads = sandbox.uploads()
    names = sorted(u["file_name"] for u in uploads)
    assert names == sorted([claimed.file_name, half.file_name, sent.file_name,
                            records(root, "done")["waiting.csv"]["file_name"]])
    assert set(records(root, "done")) == {"claimed.csv", "half.csv", "sent.csv", "waiting.csv"}
    assert records(root, "done")["sent.csv"]["id"] == answer.id


WRITER = """
import sys, time
path, chunks = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as fh:
    for n in range(chunks):
        fh.write(("".join(f"w{n}-{i}@example.com\\n" for i in range(500))).encode())
        fh.flush()
        if n < chunks - 1:
            time.sleep(1.0)
"""


async def test_slow_writer_holding_the_file_open_is_never_uploaded_partially(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        target = root / "inbox" / "email" / "slow.csv"
        async with running(daemon_config(root, sandbox.api_base)):
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER,
                                                        str(target), "3")
            assert await proc.wait() == 0
            data = target.read_bytes() if target.exists() else None
            await wait_for(lambda: "slow.csv" in records(root, "done"), what="slow.csv done")
        uploads = sandbox.uploads()
    final = (root / "done" / "email" / "slow.csv").read_bytes()
    assert data in (None, final)
    assert len(final.splitlines()) == 1500
    assert [u["sha256"] for u in uploads] == [sha256(final)]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
async def test_rsync_dot_temp_file_is_taken_once_after_rename(tmp_path: Path) -> None:
    source = tmp_path / "src.csv"
    source.write_bytes(emails(20000))
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        async with running(daemon_config(root, sandbox.api_base)):
            proc = await asyncio.create_subprocess_exec(
                "rsync", "--bwlimit=2000", str(source), str(root / "inbox" / "email" / "r.csv"))
            assert await proc.wait() == 0
            await wait_for(lambda: "r.csv" in records(root, "done"), what="r.csv done")
        uploads = sandbox.uploads()
    assert [u["sha256"] for u in uploads] == [sha256(source.read_bytes())]


@pytest.mark.slow  # ~35 s: 200 MB through a real cp and the sandbox
async def test_cp_of_a_200_mb_file_is_uploaded_once_and_complete(tmp_path: Path) -> None:
    source = tmp_path / "big.csv"
    # Long rows keep the sandbox's result generation short; the bytes are what matter here.
    line = b"someone@example.com," + b"x" * 4075 + b"\n"
    with source.open("wb") as fh:
        for _ in range(200):
            fh.write(line * 256)
    expected = sha256(source.read_bytes())
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        async with running(daemon_config(root, sandbox.api_base)):
            proc = await asyncio.create_subprocess_exec(
                "cp", str(source), str(root / "inbox" / "email" / "big.csv"))
            assert await proc.wait() == 0
            await wait_for(lambda: "big.csv" in records(root, "done"), timeout=90,
                           what="big.csv done")
        uploads = sandbox.uploads()
    assert [(u["sha256"], u["bytes"]) for u in uploads] == [(expected, source.stat().st_size)]
