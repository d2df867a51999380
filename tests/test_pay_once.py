"""Pay once everywhere (issue 18, items 1-3): ``submit`` beside the daemon and other submits,
interrupted or left without an answer; hosts whose clocks disagree.

Each test is the issue's reproduction: real spool, real sandbox on loopback, ``submit`` and
(where the issue says so) daemons as real subprocesses. The check is IPQS's own job count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    running,
    sandbox_server,
    sha256,
    start_daemon,
    wait_for,
    write_config_file,
)

ROOT_DIR = Path(__file__).resolve().parent.parent
#: How long IPQS takes to answer an upload in the reproductions (it has the job at once).
ANSWER_SECONDS = 6.0

pytestmark = pytest.mark.slow


@asynccontextmanager
async def ipqs(tmp_path: Path, *, answer_seconds: float = 0.0) -> AsyncIterator[Sandbox]:
    """The sandbox on loopback; IPQS makes each job at once, answers ``answer_seconds``
    later."""
    async with sandbox_server(quick_settings(tmp_path),
                              answer_seconds=answer_seconds) as sandbox:
        yield sandbox


def config_file(tmp_path: Path, api_base: str, name: str = "config.toml",
                **sections: dict[str, Any]) -> Path:
    """A config file for ``tmp_path / "spool"`` (every process of a test shares it)."""
    return write_config_file(tmp_path / name,
                             daemon_config(tmp_path / "spool", api_base, **sections))


@asynccontextmanager
async def daemon(config: Path, log: Path, *wrap: str) -> AsyncIterator[None]:
    """``ipqs-bulkd run`` as a process of its own (under ``wrap``: faketime, unshare);
    SIGTERM to its session at the end."""
    with open(log, "ab") as out:
        proc = await start_daemon(config, stderr=out, wrap=wrap)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def submit(config: Path, file: Path, *extra: str,
                 env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """``ipqs-bulkd submit FILE --type email`` as a person runs it, in a process of its own."""
    clean = {k: v for k, v in os.environ.items()
             if k != "IPQS_API_KEY" and not k.startswith("IPQS_BULKD_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "submit", str(file), "--type", "email",
        "--config", str(config), *extra, cwd=ROOT_DIR, env={**clean, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def fetch(config: Path, ipqs_id: int, out: Path) -> asyncio.subprocess.Process:
    """``ipqs-bulkd fetch ID --out DIR``, in a process of its own."""
    clean = {k: v for k, v in os.environ.items()
             if k != "IPQS_API_KEY" and not k.startswith("IPQS_BULKD_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "fetch", str(ipqs_id), "--out", str(out),
        "--name", "x1", "--config", str(config), cwd=ROOT_DIR, env=clean,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def finished(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Exit status and stderr of a submit (it must end within a minute)."""
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    assert "Traceback" not in err.decode()
    return proc.returncode, err.decode()


def marker(root: Path, data: bytes) -> dict[str, Any]:
    path = root / "markers" / sha256(data)
    try:
        loaded = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def sending(root: Path, data: bytes) -> Callable[[], bool]:
    """The submit's marker says its upload may be under way (written before the POST)."""
    return lambda: bool(marker(root, data).get("sending"))


def content_file(tmp_path: Path, name: str = "x1.csv") -> tuple[Path, bytes]:
    data = emails(20, "pay-once")
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


async def test_submit_racing_the_daemon_pays_once(tmp_path: Path) -> None:
    """18.1: answers take 6 s; a copy is renamed into the inbox while submit uploads."""
    x1, data = content_file(tmp_path)
    async with ipqs(tmp_path, answer_seconds=ANSWER_SECONDS) as sandbox:
        root = tmp_path / "spool"
        config = config_file(tmp_path, sandbox.api_base)
        async with running(daemon_config(root, sandbox.api_base)):
            proc = await submit(config, x1)
            await wait_for(sending(root, data), what="submit uploading")
            drop(root, "email", "x1-copy.csv", data)
            await wait_for(lambda: "x1-copy.csv" in records(root, "failed"),
                           what="the daemon's verdict on the copy")
            code, err = await finished(proc)
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        assert code == 0, err
        assert records(root, "failed")["x1-copy.csv"]["reason"] == "duplicate"
        assert marker(root, data)["id"] == sandbox.uploads()[0]["id"]


async def test_two_submits_half_a_second_apart_pay_once(tmp_path: Path) -> None:
    """18.1: the same content submitted twice while the first upload is under way."""
    first_file, data = content_file(tmp_path, "a.csv")
    second_file = tmp_path / "b.csv"
    second_file.write_bytes(data)
    async with ipqs(tmp_path, answer_seconds=ANSWER_SECONDS) as sandbox:
        root = tmp_path / "spool"
        config = config_file(tmp_path, sandbox.api_base)
        first = await submit(config, first_file)
        await wait_for(sending(root, data), what="the first submit uploading")
        second_code, second_err = await finished(await submit(config, second_file))
        first_code, first_err = await finished(first)
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        assert first_code == 0, first_err
        assert second_code == 5, second_err
        assert "another submit is sending the same content right now" in second_err


async def test_lost_answer_then_a_plain_rerun_pays_once(tmp_path: Path) -> None:
    """18.1: the first run's answer is lost and it gives up (IPQS did create the job); a
    plain re-run looks the upload up instead of sending it again."""
    x1, data = content_file(tmp_path)
    async with ipqs(tmp_path) as sandbox:
        root = tmp_path / "spool"
        config = config_file(tmp_path, sandbox.api_base, upload={"lookup_delay_seconds": 1.0})
        faults = sandbox.state.faults
        faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})
        proc = await submit(config, x1, "--timeout", "2")
        await wait_for(lambda: len(sandbox.uploads()) == 1, what="IPQS has the job")
        faults.outage = True  # its lookups go unanswered until --timeout
        code, err = await finished(proc)
        assert code == 4, err
        assert "--no-duplicate-check" not in err and "ipqs-bulkd fetch" in err
        assert marker(root, data)["id"] is None
        faults.outage, faults.lost_answer_rate = False, 0.0
        code, err = await finished(await submit(config, x1))
        ipqs_id = sandbox.uploads()[0]["id"]
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        assert code == 5, err
        assert f"IPQS id {ipqs_id}" in err and f"ipqs-bulkd fetch {ipqs_id}" in err
        assert marker(root, data)["id"] == ipqs_id


@pytest.mark.parametrize("when", ["ipqs-has-it", "before-ipqs-has-it"])
async def test_ctrl_c_during_the_upload_then_a_rerun_pays_once(tmp_path: Path,
                                                               when: str) -> None:
    """18.1: SIGINT while the upload is under way; the re-run looks it up first, and sends
    only when IPQS surely does not have it."""
    x1, data = content_file(tmp_path)
    async with ipqs(tmp_path, answer_seconds=ANSWER_SECONDS) as sandbox:
        root = tmp_path / "spool"
        config = config_file(tmp_path, sandbox.api_base)
        if when == "before-ipqs-has-it":
            faults = sandbox.state.faults
            faults.latency_ms, faults.operations = 60_000, frozenset({"upload"})
        proc = await submit(config, x1)
        await wait_for(sending(root, data), what="submit uploading")
        if when == "ipqs-has-it":
            await wait_for(lambda: len(sandbox.uploads()) == 1, what="IPQS has the job")
        proc.send_signal(signal.SIGINT)
        code, err = await finished(proc)
        assert code == 130, err
        assert marker(root, data)["id"] is None and marker(root, data)["sending"]
        sandbox.state.faults.latency_ms = 0
        code, err = await finished(await submit(config, x1))
        [upload] = sandbox.uploads()
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        if when == "ipqs-has-it":
            assert code == 5, err
            assert f"ipqs-bulkd fetch {upload['id']}" in err
            # ...and it does: the results of the job paid for, with nothing sent again.
            code, err = await finished(await fetch(config, upload["id"], tmp_path / "out"))
            assert code == 0, err
            assert (tmp_path / "out" / "x1.all.csv").read_bytes().count(b"\n") == 21
            assert len(sandbox.uploads()) == 1
        else:
            assert code == 0, err
        assert marker(root, data)["id"] == upload["id"]


def jobs_in_processing(root: Path) -> list[dict[str, Any]]:
    found = []
    for path in (root / "processing").glob("*/job.json"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            found.append(json.loads(path.read_text()))
    return found


@pytest.mark.skipif(shutil.which("faketime") is None or shutil.which("unshare") is None
                    or os.geteuid() != 0, reason="needs faketime, and unshare (as root) to "
                                                 "stand for another host")
async def test_a_daemon_whose_clock_is_ahead_never_takes_a_live_job(tmp_path: Path) -> None:
    """18.2: daemon A (its own pid namespace: "another host") uploads slowly; daemon B on
    the same spool runs 180 s ahead (libfaketime). B must not take A's job over."""
    _, data = content_file(tmp_path, "x.csv")
    async with ipqs(tmp_path) as sandbox:
        faults = sandbox.state.faults
        # IPQS takes 8 s to accept the upload (over two leases): the job is not there
        # to be found by a lookup meanwhile.
        faults.latency_ms, faults.operations = 8_000, frozenset({"upload"})
        root = tmp_path / "spool"
        a = config_file(tmp_path, sandbox.api_base, "a.toml", upload={"lease_seconds": 3.0})
        b = config_file(tmp_path, sandbox.api_base, "b.toml", upload={"lease_seconds": 3.0})
        owners: set[str] = set()

        def a_done() -> bool:
            owners.update(str(job.get("owner")) for job in jobs_in_processing(root))
            return "x.csv" in records(root, "done")

        async with daemon(a, tmp_path / "a.log", "unshare", "--pid", "--fork"):
            await wait_for(lambda: (root / "inbox" / "email").is_dir(), what="A started")
            drop(root, "email", "x.csv", data)
            await wait_for(lambda: any(job["state"] == "uploading"
                                       for job in jobs_in_processing(root)),
                           what="A uploading")
            async with daemon(b, tmp_path / "b.log", "faketime", "-f", "+180s"):
                await wait_for(a_done, timeout=40, what="A's upload accepted and done")
        b_log = (tmp_path / "b.log").read_text()
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        assert "daemon_ready" in b_log  # B was up, sweeping for orphans all along
        assert len(owners) == 1, owners  # the job never changed hands


async def test_the_daemon_looks_up_an_interrupted_submit_before_sending(
        tmp_path: Path) -> None:
    """18.1: SIGINT to submit after IPQS made the job; a copy then dropped into the inbox
    is looked up by the daemon and filed as a duplicate of that job, not paid again."""
    x1, data = content_file(tmp_path)
    async with ipqs(tmp_path, answer_seconds=ANSWER_SECONDS) as sandbox:
        root = tmp_path / "spool"
        config = config_file(tmp_path, sandbox.api_base)
        proc = await submit(config, x1)
        await wait_for(lambda: len(sandbox.uploads()) == 1, what="IPQS has the job")
        proc.send_signal(signal.SIGINT)
        code, err = await finished(proc)
        assert code == 130, err
        [upload] = sandbox.uploads()
        async with running(daemon_config(root, sandbox.api_base)):
            drop(root, "email", "x1-copy.csv", data)
            await wait_for(lambda: "x1-copy.csv" in records(root, "failed"),
                           what="the daemon's verdict on the copy")
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        record = records(root, "failed")["x1-copy.csv"]
        assert record["reason"] == "duplicate" and f"IPQS id {upload['id']}" in record["error"]
        assert marker(root, data)["id"] == upload["id"]
