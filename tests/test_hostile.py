"""Untrusted input: secrets stay secret, links and odd files stay harmless, and every bad
file gets a clear outcome without stopping the daemon."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.api import IpqsClient
from daemon.errors import AccountError
from daemon.service import Service
from daemon.spool import open_regular
from daemon.watcher import is_ignored
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


def outcome_of(root: Path, name: str, file_type: str = "email") -> tuple[str, dict[str, object]]:
    for outcome in ("done", "failed"):
        found = records(root, outcome, file_type).get(name)
        if found is not None:
            return outcome, found
    raise AssertionError(f"{name} has no record")


BAD_FILES: dict[str, tuple[bytes, str, str | None]] = {
    # name: (content, outcome, reason)
    "empty.csv": (b"", "failed", "invalid-input"),
    "blank.csv": (b"\n\r\n  \n", "failed", "invalid-input"),
    "binary.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "failed", "invalid-input"),
    "latin1.csv": (b"caf\xe9@example.com\n", "failed", "invalid-input"),
    "header-only.csv": (b"email\n", "done", None),
    "crlf.csv": (b"a@example.com\r\nb@example.com\r\n", "done", None),
    "bom.csv": (b"\xef\xbb\xbfa@example.com\n", "done", None),
    "long-line.csv": (b"a@example.com," + b"x" * 2_000_000 + b"\n", "done", None),
    "no-newline.csv": (b"a@example.com", "done", None),
    "two.url": (b"https://a.example/x.csv\nhttps://b.example/y.csv\n", "failed",
                "invalid-input"),
    "file.url": (b"file:///etc/passwd\n", "failed", "invalid-input"),
    "js.url": (b"javascript:alert(1)\n", "failed", "invalid-input"),
    "empty.url": (b"", "failed", "invalid-input"),
    "fine.url": (b"ftp://files.example.com/list.csv\n", "done", None),
}

ODD_NAMES = ["with space.csv", "ünïcödé-名前.csv", "new\nline.csv", "quote\"'.csv",
             "x" * 251 + ".csv", "-leading-dash.csv", "semi;colon&amp.csv"]


async def test_bad_files_get_a_clear_outcome(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        for name, (data, _, _) in BAD_FILES.items():
            drop(root, "email", name, data)
        for n, name in enumerate(ODD_NAMES):
            drop(root, "email", name, emails(2, f"odd{n}"))
        # A name that is not valid UTF-8 at all.
        raw = os.fsencode(root / "inbox" / "email") + b"/bad-\xff\xfe.csv"
        with open(raw, "wb") as fh:
            fh.write(emails(2, "raw"))
        assert await run_once(daemon_config(root, sandbox.api_base)) == 1
        uploaded = {u["sha256"] for u in sandbox.uploads()}
    for name, (data, outcome, reason) in BAD_FILES.items():
        got, record = outcome_of(root, name)
        assert (got, record.get("reason")) == (outcome, reason), (name, record)
        if outcome == "failed":
            assert record["error"]
            assert sha256(data) not in uploaded or name.endswith(".url")
    sources = {r["source"] for r in records(root, "done").values()}
    assert set(ODD_NAMES) | {os.fsdecode(b"bad-\xff\xfe.csv")} <= sources
    assert all(len(os.fsencode(p.name)) <= 255 for p in (root / "done" / "email").iterdir())
    assert b"bad-\xff\xfe.csv" in os.listdir(os.fsencode(root / "done" / "email"))
    assert not any((root / "inbox" / "email").iterdir())


async def test_links_fifos_sockets_and_folders_never_leave_the_machine(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n")
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        inbox = root / "inbox" / "email"
        inbox.mkdir(parents=True)
        (inbox / "shadow.csv").symlink_to(secret)
        (inbox / "dangling.csv").symlink_to(tmp_path / "nowhere")
        (inbox / "dir.csv").mkdir()
        os.mkfifo(inbox / "fifo.csv")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(inbox / "sock.csv"))
            async with running(daemon_config(root, sandbox.api_base)):
                drop(root, "email", "real.csv", emails(3))
                await wait_for(lambda: "real.csv" in records(root, "done"), what="real.csv")
                await asyncio.sleep(0.3)
        uploads = sandbox.uploads()
    assert [u["sha256"] for u in uploads] == [sha256(emails(3))]
    for name in ("shadow.csv", "dangling.csv", "dir.csv", "fifo.csv", "sock.csv"):
        assert os.path.lexists(inbox / name), name  # left alone, not moved or followed
    assert records(root, "failed") == {}


def test_open_regular_refuses_symlinks_and_fifos(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    target.write_text("a@example.com\n")
    (tmp_path / "link.csv").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(OSError):
        open_regular(tmp_path / "link.csv")
    with pytest.raises(OSError, match="not a regular file"):
        open_regular(tmp_path / "fifo.csv")  # returns at once: O_NONBLOCK, then refused
    with open_regular(target) as fh:
        assert fh.read() == b"a@example.com\n"


async def test_a_symlink_swapped_in_after_settling_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"top-secret@example.com\n")
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        service = Service(daemon_config(root, sandbox.api_base))
        spool = service.spool
        spool.prepare()
        link = spool.inbox("email") / "swapped.csv"
        link.symlink_to(secret)
        job = spool.claim("email", link, "multipart")  # as if it was swapped at claim time
        assert job is not None
        await service.recover()
        await wait_for(lambda: "swapped.csv" in records(root, "failed"), what="refused")
        await service.pipe.client.close()
    record = records(root, "failed")["swapped.csv"]
    assert record["reason"] == "invalid-input" and "regular file" in str(record["error"])
    assert sandbox.uploads() == []
    assert secret.read_bytes() == b"top-secret@example.com\n"


async def test_a_file_changed_after_its_claim_is_not_sent(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        service = Service(daemon_config(root, sandbox.api_base))
        spool = service.spool
        spool.prepare()
        spool.heartbeat()  # as the daemon does before it touches a job: its lease is fresh
        job = spool.claim("email", drop(root, "email", "moving.csv", emails(5)), "multipart")
        assert job is not None
        assert spool.inspect(job) is None
        spool.save(job)  # claimed and hashed; then someone rewrites it in place
        spool.input_path(job).write_bytes(emails(5, "other"))
        os.utime(spool.input_path(job), ns=(1, 1))
        await service.recover()
        await wait_for(lambda: "moving.csv" in records(root, "failed"), what="refused")
        await service.pipe.client.close()
    record = records(root, "failed")["moving.csv"]
    assert record["reason"] == "invalid-input" and "changed" in str(record["error"])
    assert sandbox.uploads() == []


async def test_records_and_results_are_not_world_readable(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "perm.csv", emails(3))
        old = os.umask(0)
        try:
            assert await run_once(daemon_config(root, sandbox.api_base)) == 0
        finally:
            os.umask(old)
    for name in ("perm.csv.json", "perm.csv.all.csv"):
        mode = stat.S_IMODE((root / "done" / "email" / name).stat().st_mode)
        assert mode == 0o640, (name, oct(mode))


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_tls_is_verified_and_a_ca_bundle_can_be_given(tmp_path: Path) -> None:
    import ssl

    from aiohttp.test_utils import TestServer

    from daemon.sandbox import create_app

    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl not installed")
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = TestServer(create_app(quick_settings(tmp_path)), host="127.0.0.1", port=0,
                        scheme="https")
    await server.start_server(ssl=context)
    try:
        base = str(server.make_url("/api"))
        assert base.startswith("https://")
        async with IpqsClient(base, FAKE_KEY) as client:
            with pytest.raises(AccountError, match="TLS"):
                await client.list()
        async with IpqsClient(base, FAKE_KEY, ca_bundle=str(cert)) as client:
            assert (await client.list()).total_csvs == 0
    finally:
        await server.close()


LEAKY_RUN = """
import sys
from daemon.cli import main
sys.exit(main(["run", "--once"]))
"""


async def test_the_key_appears_in_nothing_the_daemon_writes(tmp_path: Path) -> None:
    settings = quick_settings(tmp_path, fetch_urls=True)
    faults = settings.faults
    faults.error_5xx_rate, faults.lost_answer_rate, faults.rate_limit_429_rate = 0.2, 0.2, 0.1
    faults.retry_after_seconds, faults.seed = 0.05, 3
    async with sandbox_server(settings) as sandbox:
        root = tmp_path / "spool"
        for n in range(8):
            drop(root, "email", f"ok-{n}.csv", emails(4, f"k{n}"))
        drop(root, "email", "rejected.url", b"https://unreachable.example/x.csv\n")
        drop(root, "email", "invalid.csv", b"")
        config = tmp_path / "config.toml"
        config.write_text(f"""
[api]
base_url = "{sandbox.api_base}"
read_timeout = 3.0
[spool]
root = "{root}"
[watch]
settle_seconds = 0.05
writer_check = "proc"
[upload]
retry_initial_seconds = 0.01
retry_max_seconds = 0.1
lookup_delay_seconds = 0.05
[poll]
initial_seconds = 0.02
max_seconds = 0.1
[health]
enabled = false
[log]
level = "debug"
format = "json"
""")
        env = {**os.environ, "IPQS_BULKD_CONFIG": str(config), "IPQS_API_KEY": FAKE_KEY}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LEAKY_RUN, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        # Now an account error, which echoes nothing but must not leak either. Alone: a 5xx
        # to the upload would make it a lost answer, met by the bad key in the lookup.
        sandbox.state.faults.invalid_key = True
        sandbox.state.faults.operations = frozenset()
        drop(root, "email", "paused.csv", emails(2, "p"))
        proc2 = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LEAKY_RUN, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out2, err2 = await proc2.communicate()
    assert proc.returncode == 1 and proc2.returncode == 1
    logs = out + err + out2 + err2
    assert b"file_finished" in logs and b"uploads_paused" in logs
    # Retry paths ran (a 5xx to a sent upload is a lost answer now, not an api_retry).
    assert any(event in logs for event in (b"api_retry", b"status_retry",
                                           b"upload_answer_lost"))
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) > 20
    leaks = [str(p) for p in written if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert FAKE_KEY.encode() not in logs
    assert b"/csv/" + FAKE_KEY.encode() not in logs
    assert b"download=" not in logs.replace(b"download=***", b"")


@pytest.mark.slow  # ~6 s: 20 examples, each a daemon run
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(
    st.tuples(
        st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0"),
                min_size=1, max_size=40),
        st.one_of(st.binary(max_size=300),
                  st.text(max_size=300).map(lambda t: t.encode("utf-8")),
                  st.lists(st.emails(), max_size=5).map(lambda e: "\n".join(e).encode()))),
    min_size=1, max_size=6, unique_by=lambda f: f[0]))
def test_any_dropped_file_ends_in_done_or_failed_with_a_record(
        tmp_path_factory: pytest.TempPathFactory, files: list[tuple[str, bytes]]) -> None:
    tmp_path = tmp_path_factory.mktemp("prop")

    async def scenario() -> None:
        async with sandbox_server(quick_settings(tmp_path)) as sandbox:
            root = tmp_path / "spool"
            inbox = root / "inbox" / "email"
            inbox.mkdir(parents=True)
            taken = []
            for name, data in files:
                if name in (".", "..") or is_ignored(name):
                    continue
                (tmp_path / "staging").write_bytes(data)
                try:
                    (tmp_path / "staging").rename(inbox / name)
                except OSError:  # a name the filesystem refuses (too long): not dropped
                    continue
                taken.append(name)
            status = await run_once(daemon_config(root, sandbox.api_base))
            assert status in (0, 1)
            ended = {**records(root, "done"), **records(root, "failed")}
            assert sorted(r["source"] for r in ended.values()) == sorted(taken)
            assert not any(inbox.iterdir())
            assert [p.name for p in (root / "processing").iterdir()] == [".owners"]

    asyncio.run(scenario())
