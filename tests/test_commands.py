"""The commands for people (submit, status, jobs, retry) against the real sandbox.

The sandbox runs on loopback in a thread of its own, so each command runs exactly as a
person runs it: ``daemon.cli.main(argv)`` with its own event loop (and once as a real
subprocess), reading a real config file and a real spool.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon.api import IpqsClient
from daemon.cli import main
from daemon.commands.common import table
from daemon.health import HealthState
from daemon.health import create_app as health_app
from daemon.inputs import billed_rows
from daemon.metrics import Metrics
from daemon.sandbox import SANDBOX, SandboxState, create_app
from daemon.spool import SUBMITTED, Spool
from daemon.spool.notices import Notice
from tests.support import (
    FAKE_KEY,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    run_once,
    sha256,
)

T = TypeVar("T")
ROOT_DIR = Path(__file__).resolve().parent.parent


# -- a sandbox in a thread of its own ---------------------------------------------------------


class ThreadedSandbox:
    """The sandbox served on 127.0.0.1 by an event loop in another thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sandbox",
                                       daemon=True)
        self.thread.start()
        self._servers: list[TestServer] = []

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def serve(self, app: web.Application) -> TestServer:
        async def start() -> TestServer:
            server = TestServer(app, host="127.0.0.1", port=0)
            await server.start_server()
            return server

        server = self.call(start())
        self._servers.append(server)
        return server

    def close(self) -> None:
        for server in self._servers:
            self.call(server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@dataclass
class Sandbox:
    runner: ThreadedSandbox
    server: TestServer
    state: SandboxState

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/api"

    def uploads(self) -> list[dict[str, Any]]:
        return list(self.state.uploads)


@pytest.fixture
def threads() -> Iterator[ThreadedSandbox]:
    runner = ThreadedSandbox()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def start_sandbox(threads: ThreadedSandbox, tmp_path: Path) -> Callable[..., Sandbox]:
    def start(**settings: Any) -> Sandbox:
        app = create_app(quick_settings(tmp_path / f"s{len(threads._servers)}", **settings))
        server = threads.serve(app)
        return Sandbox(threads, server, app[SANDBOX])

    return start


@pytest.fixture
def sandbox(start_sandbox: Callable[..., Sandbox]) -> Sandbox:
    return start_sandbox()


# -- config, environment, running the CLI -----------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key or config from the developer's environment, and logging left alone.

    ``main()`` configures logging for these commands; structlog then caches loggers for
    good, which would blind ``capture_logs()`` in later test modules. The real set-up is
    exercised by the subprocess test.
    """
    for name in list(os.environ):
        if name == "IPQS_API_KEY" or name.startswith("IPQS_BULKD_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr("daemon.cli.configure", lambda *args, **kwargs: None)


def write_config(tmp_path: Path, api_base: str, *, key: str = FAKE_KEY,
                 health: str = "enabled = false", extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    key_line = f'key = "{key}"' if key else ""
    path.write_text(f"""
[api]
base_url = "{api_base}"
{key_line}
read_timeout = 10.0
[spool]
root = "{tmp_path / 'spool'}"
types = ["email", "phone"]
[upload]
retry_initial_seconds = 0.01
retry_max_seconds = 0.05
lookup_delay_seconds = 0.01
[poll]
initial_seconds = 0.01
max_seconds = 0.05
[health]
{health}
{extra}
""")
    return path


@pytest.fixture
def config(tmp_path: Path, sandbox: Sandbox) -> Path:
    return write_config(tmp_path, sandbox.api_base)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_err(self) -> str:
        return self.err.strip().splitlines()[-1]


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Result:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    result = Result(code, captured.out, captured.err)
    assert FAKE_KEY not in result.out + result.err
    assert "Traceback" not in result.err
    return result


def csv_file(tmp_path: Path, name: str = "list.csv", data: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(emails(3, name) if data is None else data)
    return path


def markers(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "spool" / "markers"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) \
        if folder.exists() else []


# -- help and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["submit", "fetch", "status", "jobs", "retry"])
def test_every_command_has_help_with_examples_and_exit_codes(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert f"ipqs-bulkd {command}" in out and "examples:" in out
    assert "exit status:" in out and "--config PATH" in out
    # status and retry talk to no IPQS: they list only the codes they can return (below).
    assert ("3    account error" in out) is (command in ("submit", "fetch", "jobs"))


@pytest.mark.parametrize(("command", "codes"), [
    ("status", ["0", "1", "2", "130"]),
    ("retry", ["0", "1", "2", "6", "130"]),
    ("jobs", ["0", "1", "2", "3", "4", "130"]),
    ("fetch", ["0", "1", "2", "3", "4", "130"]),
    ("submit", ["0", "1", "2", "3", "4", "5", "6", "130"]),
])
def test_help_lists_only_the_exit_codes_the_command_returns(
        command: str, codes: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    listed = capsys.readouterr().out.split("exit status:\n")[1].splitlines()
    assert [line.split()[0] for line in listed if line[:3].strip().isdigit()] == codes


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("submit", "fetch", "status", "jobs", "retry"):
        assert command in out


def test_missing_config_file_is_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["jobs"], ["retry", "--all-failed"],
                 ["submit", "x.csv", "--type", "email"], ["fetch", "1"]):
        result = cli(capsys, *argv, "--config", tmp_path / "nope.toml")
        assert result.code == 2
        assert result.err == f"ipqs-bulkd: config file {tmp_path / 'nope.toml'} does not exist\n"


def test_missing_key_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox.api_base, key="")
    result = cli(capsys, "jobs", "--config", config)
    assert result.code == 2 and "api.key is empty" in result.err
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--config", config)
    assert result.code == 2 and sandbox.uploads() == []


def test_submit_usage_errors(tmp_path: Path, config: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    file = csv_file(tmp_path)
    both = cli(capsys, "submit", file, "--url", "https://example.com/a.csv", "--type", "email",
               "--config", config)
    neither = cli(capsys, "submit", "--type", "email", "--config", config)
    bad_url = cli(capsys, "submit", "--url", "file:///etc/passwd", "--type", "email",
                  "--config", config)
    assert (both.code, neither.code, bad_url.code) == (2, 2, 2)
    assert both.last_err == "ipqs-bulkd: give FILE or --url, not both"
    assert "name the FILE" in neither.last_err and "http, https or ftp" in bad_url.last_err
    with pytest.raises(SystemExit) as exited:
        main(["submit", str(file), "--type", "nonsense", "--config", str(config)])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- submit -----------------------------------------------------------------------------------


def test_submit_sends_once_and_records_the_duplicate_marker(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    file = csv_file(tmp_path)
    result = cli(capsys, "submit", file, "--type", "email", "--config", config)
    [upload] = sandbox.uploads()
    assert result.code == 0
    assert result.out == (f"submitted list.csv (email) as IPQS job {upload['id']}, file_name "
                          f"{upload['file_name']}, status NEW\n")
    assert upload["sha256"] == sha256(file.read_bytes()) and upload["method"] == "multipart"
    assert upload["file_name"].startswith("list-")
    [marker] = markers(tmp_path)
    assert marker.name == upload["sha256"]
    assert json.loads(marker.read_text())["id"] == upload["id"]


def test_submit_wait_downloads_results_without_replacing_files(
        tmp_path: Path, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, sandbox.api_base,
                          extra='[results]\nsets = ["all", "bad", "pristine"]')
    file = csv_file(tmp_path, data=b"good@example.com\nnot-an-email\n")
    out = tmp_path / "results"
    first = cli(capsys, "submit", file, "--type", "email", "--wait", "--out", out,
                "--config", config)
    assert first.code == 0, first.err
    job_id = sandbox.uploads()[0]["id"]
    assert f"job {job_id} FINISHED: invalid records " in first.out
    saved = sorted(p.name for p in out.iterdir())
    assert "list.csv.all.csv" in saved and "list.csv.bad.csv" in saved
    assert f"  all: {out / 'list.csv.all.csv'}" in first.out
    all_rows = (out / "list.csv.all.csv").read_text()
    assert "good@example.com" in all_rows and "not-an-email" in all_rows
    assert f"job {job_id}: FINISHED" in first.err
    before = (out / "list.csv.all.csv").read_bytes()

    second = cli(capsys, "submit", file, "--type", "email", "--wait", "--out", out,
                 "--config", config, "--no-duplicate-check")
    assert second.code == 0, second.err
    assert (out / "list.csv.all.csv").read_bytes() == before
    assert (out / "list-1.csv.all.csv").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_submit_json_rows_and_url(tmp_path: Path, config: Path, sandbox: Sandbox,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rows = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--json",
               "--config", config)
    url = cli(capsys, "submit", "--url", "https://files.example.com/leads.csv", "--type",
              "email", "--wait", "--out", tmp_path / "out", "--config", config)
    url_file = csv_file(tmp_path, "remote.url", b"https://files.example.com/other.csv\n")
    from_file = cli(capsys, "submit", url_file, "--type", "email", "--config", config)
    assert (rows.code, url.code, from_file.code) == (0, 0, 0)
    methods = [(u["method"], u.get("url")) for u in sandbox.uploads()]
    assert methods == [("json", None), ("url", "https://files.example.com/leads.csv"),
                       ("url", "https://files.example.com/other.csv")]
    assert (tmp_path / "out" / "leads.csv.all.csv").exists()
    assert from_file.out.startswith("submitted remote.url (email) as IPQS job ")
    assert (tmp_path / "spool" / "markers" / sha256(url_file.read_bytes())).exists()


def test_rejected_url_exits_1_and_releases_the_marker(
        tmp_path: Path, start_sandbox: Callable[..., Sandbox],
        capsys: pytest.CaptureFixture[str]) -> None:
    sandbox = start_sandbox(fetch_urls=True)
    config = write_config(tmp_path, sandbox.api_base)
    result = cli(capsys, "submit", "--url", "https://files.example.com/list.csv", "--type",
                 "email", "--config", config)
    assert result.code == 1
    assert result.last_err == ("ipqs-bulkd: list.csv not accepted: IPQS refused it: Unable to "
                               "download the file from the url provided.")
    assert markers(tmp_path) == [] and sandbox.uploads() == []


def test_invalid_file_is_not_sent(tmp_path: Path, config: Path, sandbox: Sandbox,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    binary = cli(capsys, "submit", csv_file(tmp_path, "x.csv", b"\x00\x01"), "--type", "email",
                 "--config", config)
    missing = cli(capsys, "submit", tmp_path / "absent.csv", "--type", "email",
                  "--config", config)
    assert binary.code == 1 and "contains NUL bytes" in binary.last_err
    assert missing.code == 6
    assert missing.last_err == f"ipqs-bulkd: {tmp_path / 'absent.csv'} does not exist"
    assert sandbox.uploads() == [] and markers(tmp_path) == []


@pytest.mark.parametrize("fault", [{"invalid_key": True}, {"credits": 0}])
def test_account_errors_exit_3(fault: dict[str, Any], tmp_path: Path, config: Path,
                               sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in fault.items():
        setattr(sandbox.state.faults, name, value)
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--config", config)
    assert result.code == 3
    if "credits" in fault:  # the credit guard sees it first, and nothing is sent at all
        assert result.last_err == ("ipqs-bulkd: list.csv: not sent: paused: credits 0, next "
                                   "file needs 3 + reserve 0")
    else:
        assert result.last_err.startswith(
            "ipqs-bulkd: list.csv not sent: IPQS refused the account: ")
        assert "check api.key" in result.last_err
    assert markers(tmp_path) == [] and sandbox.uploads() == []
    assert "submitted" not in result.out  # (log lines, which go to stderr when run for real)


def test_jobs_with_an_invalid_key_exits_3(config: Path, sandbox: Sandbox,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sandbox.state.faults.invalid_key = True
    result = cli(capsys, "jobs", "--config", config)
    assert result.code == 3 and "Invalid or unauthorized key" in result.last_err


def test_outage_exits_4_after_the_timeout(tmp_path: Path, config: Path, sandbox: Sandbox,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sandbox.state.faults.outage = True
    started = time.monotonic()
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--timeout", "0.3",
                 "--config", config)
    assert result.code == 4
    assert time.monotonic() - started < 10
    assert "IPQS unreachable, gave up after retrying for 0.3 s (--timeout)" in result.last_err
    assert "retrying in" in result.err
    assert sandbox.uploads() == []
    jobs = cli(capsys, "jobs", "--timeout", "0.2", "--config", config)
    assert jobs.code == 4 and jobs.last_err.startswith("ipqs-bulkd: listing jobs: IPQS unreach")


def test_unreachable_host_exits_4_and_leaves_no_marker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, f"http://127.0.0.1:{port}/api")
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--timeout", "0.2",
                 "--config", config)
    assert result.code == 4 and "cannot connect to IPQS" in result.last_err
    assert markers(tmp_path) == []  # nothing was sent: a later submit may send it


def test_5xx_to_a_sent_upload_is_looked_up_then_retried(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    faults = sandbox.state.faults
    faults.error_5xx_rate, faults.seed, faults.operations = 0.5, 1, frozenset({"upload"})
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--wait",
                 "--out", tmp_path, "--config", config)
    assert result.code == 0, result.err
    assert sandbox.state.stats.faults["error_5xx"] >= 1
    # A gateway's 5xx may hide a job the origin made: look it up before sending again.
    assert "upload: HTTP 50" in result.err and "looking it up before sending" in result.err
    assert len(sandbox.uploads()) == 1


def test_lost_answer_is_looked_up_not_sent_twice(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    faults = sandbox.state.faults
    faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--config", config)
    [upload] = sandbox.uploads()
    assert result.code == 0, result.err
    assert "looking it up before sending again" in result.err
    assert f"found the upload at IPQS as job {upload['id']}" in result.err
    assert f"as IPQS job {upload['id']}" in result.out


def test_duplicate_of_an_earlier_submit_exits_5(tmp_path: Path, config: Path, sandbox: Sandbox,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    file = csv_file(tmp_path)
    assert cli(capsys, "submit", file, "--type", "email", "--config", config).code == 0
    again = cli(capsys, "submit", csv_file(tmp_path, "copy.csv", file.read_bytes()), "--type",
                "email", "--config", config)
    assert again.code == 5
    assert "not sent: the same content was already taken as job " in again.last_err
    assert f"(email/list.csv, IPQS id {sandbox.uploads()[0]['id']})" in again.last_err
    assert len(sandbox.uploads()) == 1


def test_duplicate_of_a_file_the_daemon_took_exits_5(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = emails(4, "daemon")
    root = tmp_path / "spool"
    drop(root, "email", "daemon.csv", data)
    assert asyncio.run(run_once(daemon_config(root, sandbox.api_base))) == 0
    daemon_id = records(root, "done")["daemon.csv"]["id"]
    result = cli(capsys, "submit", csv_file(tmp_path, "mine.csv", data), "--type", "email",
                 "--config", config)
    assert result.code == 5
    assert f"(email/daemon.csv, IPQS id {daemon_id})" in result.last_err
    assert len(sandbox.uploads()) == 1


def test_unwritable_spool_needs_no_duplicate_check(
        tmp_path: Path, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = write_config(tmp_path, sandbox.api_base)
    config.write_text(config.read_text().replace(str(tmp_path / "spool"), str(blocker / "sp")))
    file = csv_file(tmp_path)
    refused = cli(capsys, "submit", file, "--type", "email", "--config", config)
    assert refused.code == 2
    assert refused.last_err.startswith(f"ipqs-bulkd: cannot record duplicates under {blocker}")
    assert "--no-duplicate-check" in refused.last_err and sandbox.uploads() == []
    sent = cli(capsys, "submit", file, "--type", "email", "--no-duplicate-check",
               "--config", config)
    assert sent.code == 0 and len(sandbox.uploads()) == 1
    assert "duplicate check off" in sent.err


class _Terminal(StringIO):
    def isatty(self) -> bool:
        return True


def test_submit_on_a_terminal_shows_a_progress_bar(
        tmp_path: Path, config: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    file = csv_file(tmp_path, data=emails(2000))
    result = cli(capsys, "submit", file, "--type", "email", "--wait", "--out", tmp_path / "o",
                 "--config", config)
    shown = terminal.getvalue()
    assert result.code == 0
    assert "uploading list.csv: 100%" in shown and "B/s" in shown and "\r" in shown
    assert f"job {sandbox.uploads()[0]['id']}: FINISHED [" in shown


def test_submit_off_a_terminal_prints_plain_lines(tmp_path: Path, config: Path,
                                                  sandbox: Sandbox) -> None:
    file = csv_file(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k != "IPQS_API_KEY" and not k.startswith("IPQS_BULKD_")}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "submit", str(file), "--type", "email", "--wait",
         "--out", str(tmp_path / "out"), "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=ROOT_DIR, env=env, check=False)
    job_id = sandbox.uploads()[0]["id"]
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"uploading list.csv ({len(file.read_bytes())} B)"
    assert f"job {job_id}: FINISHED" in lines
    assert lines[-1].startswith("result set all: ") and lines[-1].endswith("list.csv.all.csv")
    assert done.stdout.splitlines()[-2] == f"job {job_id} FINISHED: invalid records 0"


# -- status -----------------------------------------------------------------------------------


def _finished(spool: Spool, file_type: str, name: str, data: bytes, outcome: str,
              mtime: float, **fields: Any) -> None:
    """Put a file through the spool's own claim and finish, as the daemon does."""
    job = spool.claim(file_type, drop(spool.root, file_type, name, data), "multipart")
    assert job is not None
    spool.inspect(job)
    job.outcome, job.status, job.id = outcome, fields.pop("status", "FINISHED"), fields.pop(
        "id", None)
    for key, value in fields.items():
        setattr(job, key, value)
    record = spool.finish(job)
    os.utime(record, (mtime, mtime))


@pytest.fixture
def busy_spool(tmp_path: Path) -> Spool:
    """A spool with a file in each state, made through the daemon's own spool protocol."""
    spool = Spool(tmp_path / "spool", ("email", "phone"))
    spool.prepare()
    now = time.time()
    _finished(spool, "email", "old.csv", b"a@example.com\n", "done", now - 300, id=11,
              invalid_records=0)
    _finished(spool, "email", "bad.csv", b"b@example.com\n", "failed", now - 100,
              status="PROCESSING", id=12, reason="aborted", error="IPQS reported status 'X'")
    _finished(spool, "phone", "data.json", b"+14155550100\n", "done", now - 200, id=13,
              invalid_records=1)
    drop(spool.root, "email", "waiting.csv", b"c@example.com\n")
    drop(spool.root, "email", "half.csv.part", b"d@exa")
    job = spool.claim("phone", drop(spool.root, "phone", "busy.csv", b"+1\n"), "multipart")
    assert job is not None
    job.state, job.id, job.status = SUBMITTED, 14, "PROCESSING"
    spool.save(job)
    return spool


def test_status_json_on_a_spool_with_files_in_each_state(
        tmp_path: Path, sandbox: Sandbox, busy_spool: Spool,
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, sandbox.api_base, health=f"port = {port}")
    result = cli(capsys, "status", "--json", "--config", config)
    report = json.loads(result.out)
    assert result.code == 0
    assert set(report) == {"root", "types", "processing", "finishing", "misplaced", "recent",
                           "hooks", "disk", "daemon", "daemons", "budget",
                           "clock_synchronised"}
    assert report["hooks"] == {"pending": 0, "failing": 0, "last_error": None}
    assert report["disk"]["min_free_bytes"] == 1024 * 1024**2  # spool.min_free_mb
    assert report["misplaced"] == [] and report["finishing"] == {}
    assert report["budget"]["used"] == {} and report["budget"]["left"] == {}
    assert report["daemons"] == []  # none published its address in this spool
    assert report["types"] == {"email": {"inbox": 1, "processing": 0, "done": 1, "failed": 1},
                               "phone": {"inbox": 0, "processing": 1, "done": 1, "failed": 0}}
    [job] = report["processing"]
    assert (job["type"], job["source"], job["state"], job["id"], job["status"]) == (
        "phone", "busy.csv", "submitted", 14, "PROCESSING")
    assert 0 <= job["age_seconds"] < 60
    assert [(r["name"], r["outcome"], r["reason"], r["id"]) for r in report["recent"]] == [
        ("bad.csv", "failed", "aborted", 12), ("data.json", "done", None, 13),
        ("old.csv", "done", None, 11)]
    assert report["recent"][0]["record"] == "failed/email/bad.csv.json"
    assert report["daemon"] == {
        "reachable": False, "ready": None, "paused": None, "degraded": None,
        "reason": f"unknown (daemon not reachable at http://127.0.0.1:{port}/readyz)"}


def test_status_recent_keeps_the_newest_n(tmp_path: Path, sandbox: Sandbox, busy_spool: Spool,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, sandbox.api_base)
    result = cli(capsys, "status", "--json", "--recent", "2", "--config", config)
    assert [r["name"] for r in json.loads(result.out)["recent"]] == ["bad.csv", "data.json"]
    assert json.loads(result.out)["daemon"]["reason"] == (
        "unknown (health endpoint off: health.enabled = false)")


def test_status_table_shows_uploads_paused_by_the_daemon(
        tmp_path: Path, sandbox: Sandbox, busy_spool: Spool,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = HealthState(recovered=True, watching=True,
                        paused_reason=lambda: "Invalid or unauthorized key.")
    health = sandbox.runner.serve(health_app(state, Metrics()))
    config = write_config(tmp_path, sandbox.api_base, health=f"port = {health.port}")
    result = cli(capsys, "status", "--config", config)
    lines = result.out.splitlines()
    assert result.code == 0
    assert lines[:4] == [f"spool {tmp_path / 'spool'}",
                         "TYPE   INBOX  PROCESSING  DONE  FAILED",
                         "email      1           0     1       1",
                         "phone      0           1     1       0"]
    assert "uploads: PAUSED: Invalid or unauthorized key." in lines
    assert "in processing: 1" in lines and "recently finished: 3" in lines
    busy = next(line for line in lines if "busy.csv" in line)
    assert busy.split()[1:6] == ["phone", "busy.csv", "submitted", "14", "PROCESSING"]
    failed = next(line for line in lines if "bad.csv" in line)
    assert "failed (aborted)" in failed and "IPQS reported status 'X'" in failed

    state.paused_reason = lambda: None
    running = cli(capsys, "status", "--config", config)
    assert "uploads: running" in running.out.splitlines()


def test_status_shows_hooks_owed_and_failing(tmp_path: Path, sandbox: Sandbox,
                                            busy_spool: Spool,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for job, attempts in (("20261130T101500-00000001", 0), ("20261130T101501-00000002", 2)):
        busy_spool.notices.write(Notice(job=job, type="email", outcome="done",
                                        record="done/email/old.csv.json", owner="h:1:t",
                                        created=0.0, attempts=attempts,
                                        last_error="exit status 3" if attempts else None))
    config = write_config(tmp_path, sandbox.api_base)
    report = json.loads(cli(capsys, "status", "--json", "--config", config).out)
    assert report["hooks"] == {"pending": 2, "failing": 1, "last_error": "exit status 3"}
    lines = cli(capsys, "status", "--config", config).out.splitlines()
    assert ("on_finish hooks pending: 2, 1 failing (last error: exit status 3)") in lines


@pytest.mark.parametrize("min_free_mb", [0, 1024**3])
def test_status_says_when_the_spool_is_low_on_disk(
        tmp_path: Path, sandbox: Sandbox, busy_spool: Spool, min_free_mb: int,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPQS_BULKD_SPOOL_MIN_FREE_MB", str(min_free_mb))
    config = write_config(tmp_path, sandbox.api_base)
    report = json.loads(cli(capsys, "status", "--json", "--config", config).out)
    assert report["disk"]["low"] is bool(min_free_mb)  # 1 PiB is more than any test disk
    lines = cli(capsys, "status", "--config", config).out.splitlines()
    assert any(line.startswith("LOW DISK: ") for line in lines) is bool(min_free_mb)


def test_status_without_a_spool_exits_2(tmp_path: Path, config: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "status", "--config", config)
    assert result.code == 2
    assert result.last_err == (f"ipqs-bulkd: config key spool.root: {tmp_path / 'spool'} is not "
                               "a folder (the daemon creates it when it starts)")


# -- jobs -------------------------------------------------------------------------------------


def _make_jobs(sandbox: Sandbox, counts: dict[str, int]) -> None:
    async def upload() -> None:
        async with IpqsClient(sandbox.api_base, FAKE_KEY) as client:
            for file_type, n in counts.items():
                for i in range(n):
                    await client.upload_rows(file_type, [[f"u{i}@example.com"]],
                                             f"{file_type}-{i:03d}")

    sandbox.runner.call(upload())


def test_jobs_pages_through_the_list_api(config: Path, sandbox: Sandbox,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _make_jobs(sandbox, {"email": 52, "phone": 3})
    first = cli(capsys, "jobs", "--config", config)
    lines = first.out.splitlines()
    assert first.code == 0
    assert lines[0].split() == ["ID", "FILE_NAME", "TYPE", "STATUS", "INVALID"]
    assert len(lines) == 1 + 50 + 2
    assert lines[1].split()[1:4] == ["phone-002", "phone", "FINISHED"]
    # The next page of the same account: the command to paste names the config given.
    assert lines[-2:] == ["page 1 of 2 (55 jobs)",
                          f"next: ipqs-bulkd jobs --config {config} --page 2"]

    second = cli(capsys, "jobs", "--page", "2", "--json", "--config", config)
    page = json.loads(second.out)
    assert (page["page"], page["total_pages"], page["total_csvs"]) == (2, 2, 55)
    assert [j["file_name"] for j in page["csvs"]] == [f"email-{i:03d}" for i in range(4, -1, -1)]
    assert set(page["csvs"][0]) == {"id", "file_name", "type", "status", "aborted",
                                    "invalid_records"}
    assert "status_url" not in second.out and "download" not in second.out

    phones = cli(capsys, "jobs", "--type", "phone", "--config", config)
    assert phones.out.splitlines()[-1] == "page 1 of 1 (3 jobs of type phone)"
    beyond = cli(capsys, "jobs", "--page", "9", "--config", config)
    assert beyond.out.splitlines() == ["no jobs on this page", "page 9 of 2 (55 jobs)"]


def test_jobs_on_an_empty_account_says_so_without_page_1_of_0(
        config: Path, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    empty = cli(capsys, "jobs", "--config", config)
    assert (empty.code, empty.out) == (0, "no jobs at IPQS yet\n")
    _make_jobs(sandbox, {"email": 1})
    phones = cli(capsys, "jobs", "--type", "phone", "--config", config)
    assert (phones.code, phones.out) == (0, "no jobs of type phone at IPQS yet\n")


def test_table_right_aligns_numbers() -> None:
    assert table(["A", "N"], [["x", 1], ["yy", 100]]).splitlines() == [
        "A     N", "x     1", "yy  100"]


# -- retry ------------------------------------------------------------------------------------


def _failed(tmp_path: Path, name: str = "list.csv", *, file_type: str = "email",
            reason: str = "aborted", data: bytes | None = None,
            marker: bool = True) -> tuple[Spool, bytes]:
    """A failed file made through the spool's protocol, with its duplicate marker."""
    spool = Spool(tmp_path / "spool", ("email", "phone"))
    spool.prepare()
    data = emails(2, name) if data is None else data
    job = spool.claim(file_type, drop(spool.root, file_type, name, data), "multipart")
    assert job is not None
    spool.inspect(job)
    if marker:
        assert spool.mark(job, 3600) is None
    job.outcome, job.reason, job.error, job.id = "failed", reason, "it went wrong", 99
    spool.finish(job)
    return spool, data


def test_retry_moves_back_and_keeps_history(tmp_path: Path, config: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    spool, data = _failed(tmp_path)
    record = (spool.root / "failed" / "email" / "list.csv.json").read_bytes()
    result = cli(capsys, "retry", spool.root / "failed" / "email" / "list.csv",
                 "--config", config)
    assert result.code == 0
    assert (spool.root / "inbox" / "email" / "list.csv").read_bytes() == data
    assert list((spool.root / "failed" / "email").iterdir()) == []
    [kept] = (spool.root / "history" / "email").iterdir()
    assert kept.name.startswith("list.csv.") and kept.name.endswith("Z.json")
    assert kept.read_bytes() == record
    lines = result.out.splitlines()
    assert lines[0] == (f"email/list.csv: back in inbox/email/list.csv; old record kept as "
                        f"history/email/{kept.name}")
    assert lines[1].startswith("  note: IPQS already took this content as job ")
    assert "fails it again as a duplicate" in lines[1] and "--force" in lines[1]
    assert lines[2] == "1 file(s) put back into their inbox"
    assert (spool.root / "markers" / sha256(data)).exists()


def test_retry_force_clears_the_marker_and_the_daemon_sends_it_again(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    spool, data = _failed(tmp_path)
    daemon = daemon_config(spool.root, sandbox.api_base)
    assert cli(capsys, "retry", "list.csv", "--config", config).code == 0
    assert asyncio.run(run_once(daemon)) == 1  # the marker is still there
    assert records(spool.root, "failed")["list.csv"]["reason"] == "duplicate"
    assert sandbox.uploads() == []

    forced = cli(capsys, "retry", "list.csv.json", "--force", "--config", config)
    assert forced.code == 0
    assert "duplicate marker for job " in forced.out and "removed (--force)" in forced.out
    assert not (spool.root / "markers" / sha256(data)).exists()
    assert asyncio.run(run_once(daemon)) == 0
    assert records(spool.root, "done")["list.csv"]["sha256"] == sha256(data)
    assert len(list((spool.root / "history" / "email").glob("list.csv.*.json"))) == 2


def test_retry_never_replaces_a_file_in_the_inbox(tmp_path: Path, config: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    spool, data = _failed(tmp_path, reason="rejected", marker=False)
    drop(spool.root, "email", "list.csv", b"new@example.com\n")
    result = cli(capsys, "retry", "list.csv", "--type", "email", "--config", config)
    assert result.code == 0
    assert (spool.root / "inbox" / "email" / "list.csv").read_bytes() == b"new@example.com\n"
    assert (spool.root / "inbox" / "email" / "list-1.csv").read_bytes() == data
    assert "back in inbox/email/list-1.csv" in result.out and "note:" not in result.out


def test_retry_all_failed_of_one_type(tmp_path: Path, config: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    spool, _ = _failed(tmp_path, "a.csv")
    _failed(tmp_path, "b.csv", marker=False)
    _failed(tmp_path, "c.csv", file_type="phone", data=b"+14155550100\n")
    result = cli(capsys, "retry", "--all-failed", "--type", "email", "--config", config)
    assert result.code == 0
    assert sorted(p.name for p in (spool.root / "inbox" / "email").iterdir()) == [
        "a.csv", "b.csv"]
    assert sorted(p.name for p in (spool.root / "failed" / "phone").iterdir()) == [
        "c.csv", "c.csv.json"]
    assert result.out.splitlines()[-1] == "2 file(s) put back into their inbox"
    empty = cli(capsys, "retry", "--all-failed", "--type", "email", "--config", config)
    assert empty.code == 0 and empty.out.startswith("nothing to retry")


def test_retry_unknown_files_and_usage(tmp_path: Path, config: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    spool, _ = _failed(tmp_path)
    unknown = cli(capsys, "retry", "nope.csv", "list.csv", "--config", config)
    assert unknown.code == 6
    assert unknown.err.startswith("ipqs-bulkd: nope.csv: not found in failed/<type>/")
    assert (spool.root / "inbox" / "email" / "list.csv").exists()  # the known one went back
    outside = cli(capsys, "retry", tmp_path / "list.csv", "--config", config)
    assert outside.code == 6
    neither = cli(capsys, "retry", "--config", config)
    both = cli(capsys, "retry", "x.csv", "--all-failed", "--config", config)
    bad_type = cli(capsys, "retry", "--all-failed", "--type", "url", "--config", config)
    assert (neither.code, both.code, bad_type.code) == (2, 2, 2)
    assert bad_type.last_err == "ipqs-bulkd: --type url: not in spool.types (email, phone)"


def test_local_disk_trouble_is_one_line_with_status_1(
        tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool, _ = _failed(tmp_path)
    (spool.root / "inbox" / "email").rmdir()
    (spool.root / "inbox" / "email").write_text("in the way")
    result = cli(capsys, "retry", "list.csv", "--config", config)
    assert result.code == 1
    assert result.err == f"ipqs-bulkd: File exists: {spool.root / 'inbox' / 'email'}\n"
    assert sorted(p.name for p in (spool.root / "failed" / "email").iterdir()) == [
        "list.csv", "list.csv.json"]


def test_interrupt_is_one_line_with_status_130(
        config: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("daemon.commands.status.collect", interrupted)
    result = cli(capsys, "status", "--config", config)
    assert (result.code, result.err) == (130, "ipqs-bulkd: interrupted\n")


# -- small surprises (issue 14 item 10) ----------------------------------------------------


def test_submit_out_without_wait_is_a_usage_error(tmp_path: Path, config: Path,
                                                 sandbox: Sandbox,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "submit", csv_file(tmp_path), "--type", "email", "--out",
                 tmp_path / "out", "--config", config)
    assert result.code == 2
    assert result.last_err == ("ipqs-bulkd: --out needs --wait: without it nothing is "
                               "downloaded")
    assert sandbox.uploads() == [] and markers(tmp_path) == []
    assert not (tmp_path / "out").exists()


def test_submit_a_folder_says_it_is_a_folder(tmp_path: Path, config: Path, sandbox: Sandbox,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "submit", tmp_path, "--type", "email", "--config", config)
    assert result.code == 6
    assert result.last_err == f"ipqs-bulkd: {tmp_path} is a folder: name a file in it"
    assert sandbox.uploads() == []


def test_submit_says_the_rows_ipqs_bills(tmp_path: Path, config: Path, sandbox: Sandbox,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # A header is a row IPQS bills; a blank line and a line inside a quoted cell are not.
    data = b'email,note\n"a@example.com","two\nlines"\n\nb@example.com,\n'
    path = csv_file(tmp_path, data=data)
    result = cli(capsys, "submit", path, "--type", "email", "--json", "--config", config)
    assert result.code == 0, result.err
    assert billed_rows(path, "json") == 3  # the count the record is made of
    assert "sending 3 rows of list.csv as JSON" in result.err.splitlines()
    assert len(sandbox.uploads()) == 1


def test_a_timeout_run_does_not_promise_a_retry_it_will_not_make(
        tmp_path: Path, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, sandbox.api_base, extra="")
    text = config.read_text().replace("retry_max_seconds = 0.05", "retry_max_seconds = 30")
    config.write_text(text.replace("retry_initial_seconds = 0.01",
                                   "retry_initial_seconds = 0.2"))
    sandbox.state.faults.outage = True
    result = cli(capsys, "jobs", "--timeout", "0.5", "--config", config)
    assert result.code == 4
    notes = result.err.splitlines()[:-1]
    assert notes, result.err
    waits = [float(n.split("retrying in ")[1].split()[0]) for n in notes if "retrying in" in n]
    assert all(wait < 0.5 for wait in waits)
    assert "; one last try in " in notes[-1]
    assert notes[-1].endswith(", then giving up (--timeout 0.5)")


def test_retry_all_failed_skips_invalid_input_unless_forced(
        tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool, _ = _failed(tmp_path, "empty.csv", reason="invalid-input", marker=False)
    _failed(tmp_path, "b.csv", reason="rejected", marker=False)
    result = cli(capsys, "retry", "--all-failed", "--config", config)
    assert result.code == 0
    assert result.out.splitlines() == [
        "skipped 1 invalid-input file(s): unchanged they fail again; fix and drop them again, "
        "name them, or give --force",
        "email/b.csv: back in inbox/email/b.csv; old record kept as "
        + next(f"history/email/{p.name}" for p in (spool.root / "history" / "email").iterdir()),
        "1 file(s) put back into their inbox"]
    assert (spool.root / "failed" / "email" / "empty.csv").exists()
    forced = cli(capsys, "retry", "--all-failed", "--force", "--config", config)
    assert forced.code == 0 and "skipped" not in forced.out
    assert (spool.root / "inbox" / "email" / "empty.csv").exists()
def test_fetch_downloads_an_existing_jobs_results_without_sending(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "submit", csv_file(tmp_path), "--type", "email",
               "--config", config).code == 0
    [upload] = sandbox.uploads()
    out = tmp_path / "out"
    result = cli(capsys, "fetch", str(upload["id"]), "--out", out, "--config", config)
    assert result.code == 0, result.err
    assert f"job {upload['id']} FINISHED" in result.out
    assert (out / f"{upload['id']}.all.csv").read_bytes().count(b"\n") == 4
    assert len(sandbox.uploads()) == 1
    # Again: the earlier results stay, the new ones get a free name.
    assert cli(capsys, "fetch", str(upload["id"]), "--out", out, "--config", config).code == 0
    assert len(list(out.glob("*.csv"))) == 2


def test_fetch_of_an_unknown_or_malformed_id_is_one_line(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    unknown = cli(capsys, "fetch", "999999999", "--out", tmp_path, "--config", config)
    assert unknown.code == 1 and "job 999999999" in unknown.last_err
    with pytest.raises(SystemExit) as bad:
        main(["fetch", "12ab", "--config", str(config)])
    assert bad.value.code == 2
    assert "an IPQS job id is a positive number" in capsys.readouterr().err


def test_an_unresolved_marker_is_looked_up_before_submit_sends(
        tmp_path: Path, config: Path, sandbox: Sandbox,
        capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from daemon.spool import Job, Owner

    file = csv_file(tmp_path)
    # A submit on this host that died while its upload may have been under way.
    dead = dataclasses.replace(Owner.current(), pid=2**22 + 7)
    spool = Spool(tmp_path / "spool", ("email",), owner=dead)
    spool.prepare()
    earlier = Job(job="earlier", type="email", source="list.csv", file_name="list-dead0000",
                  method="multipart", sha256=sha256(file.read_bytes()), uploads=1)
    assert spool.mark(earlier, 3600, holder="submit") is None
    spool.marks.sending(earlier)
    sandbox.state.faults.outage = True
    down = cli(capsys, "submit", file, "--type", "email", "--timeout", "0.5",
               "--config", config)
    assert down.code == 4, down.err
    assert "looking up an earlier upload of the same content" in down.last_err
    assert sandbox.uploads() == [] and len(markers(tmp_path)) == 1
    # IPQS answers again and has no such upload: nobody paid, so now it is sent, once.
    sandbox.state.faults.outage = False
    sent = cli(capsys, "submit", file, "--type", "email", "--config", config)
    assert sent.code == 0, sent.err
    [upload] = sandbox.uploads()
    assert json.loads(markers(tmp_path)[0].read_text())["id"] == upload["id"]
