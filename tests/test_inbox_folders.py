"""Inbox folders as deployed (issue 17 item 3, issue 19 items 4, 6, 7): a folder replaced
by a symlink is refused, files the daemon may not read wait for a chmod, a deleted inbox
comes back as the tmpfiles layout has it, and lost inotify watches show and recover.

Each runs the daemon as the unit does (``tests/deployed.py``), with producers as another
user of the daemon's group."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon import ALL_TYPES
from daemon.claims import Unreadable
from daemon.spool import Spool
from daemon.spool.fs import SymlinkedFolderError
from daemon.watcher.events import WatchHealth
from daemon.watcher.scan import observe, scan
from tests.deployed import (
    AS_DEPLOYED,
    Deployed,
    as_producer,
    daemon_as_deployed,
    deployed_spool,
    tmpfiles_layout,
)
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    free_port,
    records,
    running,
    sha256,
    start_daemon,
    wait_for,
    write_config_file,
)


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


async def _ready(port: int) -> bool:
    try:
        return (await _get(port, "/readyz"))[0] == 200
    except aiohttp.ClientError:
        return False


async def _until(check: Callable[[], bool | Awaitable[bool]], what: str,
                 timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _config_file(spool: Deployed, sandbox: Sandbox, port: int, **watch: object) -> Path:
    config = daemon_config(spool.root, sandbox.api_base, health={"enabled": True, "port": port},
                           watch={"rescan_seconds": 0.5, **watch})
    return write_config_file(spool.base / "config.toml", config)


def _drop(spool: Deployed, file_type: str, name: str, data: bytes, *,
          umask: str = "0027") -> None:
    """The producer writes under a hidden name, then renames into the inbox."""
    staging = spool.base / f"{name}.src"
    staging.write_bytes(data)
    staging.chmod(0o644)
    inbox = spool.root / "inbox" / file_type
    as_producer(spool, f"cat {staging} > {inbox}/.{name} && mv {inbox}/.{name} {inbox}/{name}",
                umask=umask)


def _delivered(root: Path, name: str, file_type: str = "email") -> Callable[[], bool]:
    return lambda: name in records(root, "done", file_type)


# -- 17.3: an inbox folder replaced by a symlink ------------------------------------------------


@pytest.mark.slow
async def test_an_inbox_replaced_by_a_symlink_is_refused_as_deployed(sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        root, port = spool.root, free_port()
        tmpfiles_layout(spool, ALL_TYPES)
        elsewhere = spool.base / "hr"
        elsewhere.mkdir()
        os.chown(elsewhere, -1, spool.gid)  # a folder the daemon's group may write
        elsewhere.chmod(0o2770)
        payroll = elsewhere / "payroll.csv"
        payroll.write_bytes(emails(5, seed="-payroll"))
        payroll.chmod(0o644)  # readable by the daemon: only the refusal keeps it out
        hour_ago = time.time() - 3600
        os.utime(payroll, (hour_ago, hour_ago))
        before = payroll.stat()
        async with daemon_as_deployed(spool, _config_file(spool, sandbox, port)) as proc:
            await _until(lambda: _ready(port), "the daemon ready")
            url = root / "inbox" / "url"
            shutil.rmtree(url)
            url.symlink_to(elsewhere)
            await _until(lambda: bool(spool.events("inbox_unusable")), "the link refused")
            # The other inboxes keep working, over several rescans (0.5 s apart).
            for name in ("a.csv", "b.csv"):
                _drop(spool, "email", name, emails(2, seed=name))
                await _until(_delivered(root, name), f"{name} delivered")
            assert url.is_symlink()  # not re-created over the link
            assert proc.returncode is None
            url.unlink()  # the operator takes the link away: the inbox comes back
            await _until(lambda: bool(spool.events("inbox_usable")), "the inbox usable again")
        after = payroll.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino, before.st_size, before.st_mtime_ns)
        assert sorted(elsewhere.iterdir()) == [payroll]
        assert payroll.read_bytes() == emails(5, seed="-payroll")
        assert sorted(records(root, "done", "url")) == []
        uploads = sandbox.uploads()
        assert len(uploads) == 2
        assert sha256(emails(5, seed="-payroll")) not in {u["sha256"] for u in uploads}
        refused = spool.events("inbox_unusable")
        assert len(refused) == 1, refused  # one line, not one per rescan
        assert refused[0]["path"] == str(url) and "symbolic link" in refused[0]["error"]
        assert refused[0]["level"] == "error"
        made = url.lstat()
        assert stat.S_ISDIR(made.st_mode) and f"{stat.S_IMODE(made.st_mode):o}" == "2770"


# -- 19.4: files the daemon may not read --------------------------------------------------------


async def _status(config_file: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "status", "--config", str(config_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/")
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.slow
async def test_an_unreadable_file_waits_said_once_and_goes_once_readable_as_deployed(
        sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        root, port = spool.root, free_port()
        tmpfiles_layout(spool, ALL_TYPES)
        inbox = root / "inbox" / "email"
        # Rescans far apart: what takes the file after the chmod is the event (or the
        # unreadable files' own re-check), not a rescan.
        config_file = _config_file(spool, sandbox, port, rescan_seconds=600.0)
        async with daemon_as_deployed(spool, config_file) as proc:
            await _until(lambda: _ready(port), "the daemon ready")
            _drop(spool, "email", "secret.csv", emails(3, seed="-secret"), umask="0077")
            assert f"{stat.S_IMODE((inbox / 'secret.csv').stat().st_mode):o}" == "600"
            await _until(lambda: bool(spool.events("file_unreadable")), "said unreadable")
            # Other files go meanwhile, and the unreadable one is not said again.
            _drop(spool, "email", "other.csv", emails(2, seed="-other"))
            await _until(_delivered(root, "other.csv"), "other.csv delivered")
            metrics = (await _get(port, "/metrics"))[1]
            assert "ipqs_bulkd_inbox_unreadable 1.0" in metrics
            shown = await _status(config_file)
            assert "unreadable: 1 file(s)" in shown, shown
            assert (inbox / "secret.csv").exists()
            assert records(root, "failed") == {}

            as_producer(spool, f"chmod g+r {inbox}/secret.csv")  # the fix the line names
            fixed = time.monotonic()
            await _until(_delivered(root, "secret.csv"), "secret.csv delivered")
            took = time.monotonic() - fixed
            assert "ipqs_bulkd_inbox_unreadable 0.0" in (await _get(port, "/metrics"))[1]

            # A default ACL gives the group read whatever the producer's umask.
            subprocess.run(["setfacl", "-d", "-m", "g::r", str(inbox)], check=True)
            _drop(spool, "email", "acl.csv", emails(2, seed="-acl"), umask="0077")
            await _until(_delivered(root, "acl.csv"), "acl.csv delivered")
            assert proc.returncode is None
        said = spool.events("file_unreadable")
        assert len(said) == 1, said
        assert said[0]["path"] == str(inbox / "secret.csv") and said[0]["mode"] == "0600"
        assert "chmod g+r" in said[0]["fix"] and "umask" in said[0]["fix"]
        assert [e["path"] for e in spool.events("file_readable")] == [str(inbox / "secret.csv")]
        assert not spool.events("claim_failed") and not spool.events("claim_error")
        assert len(sandbox.uploads()) == 3
        print(f"taken {took:.2f} s after the chmod")
        assert took < 10, took


# -- 19.6: an inbox deleted while running -------------------------------------------------------


@pytest.mark.slow
async def test_a_deleted_inbox_comes_back_as_its_siblings_are_as_deployed(
        sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        root, port = spool.root, free_port()
        tmpfiles_layout(spool, ALL_TYPES)
        inbox = root / "inbox" / "email"
        async with daemon_as_deployed(spool, _config_file(spool, sandbox, port)) as proc:
            await _until(lambda: _ready(port), "the daemon ready")
            shutil.rmtree(inbox)  # an operator's clean-up gone too far
            await _until(lambda: bool(spool.events("inbox_recreated")), "inbox re-created")
            made = inbox.stat()
            assert (f"{stat.S_IMODE(made.st_mode):o}", made.st_uid, made.st_gid) == (
                "2770", spool.uid, spool.gid)
            # A producer of the daemon's group can drop into it again.
            _drop(spool, "email", "after.csv", emails(2, seed="-after"))
            await _until(_delivered(root, "after.csv"), "after.csv delivered")
            assert proc.returncode is None
        said = spool.events("inbox_recreated")
        assert len(said) == 1 and said[0]["level"] == "warning", said
        assert said[0]["path"] == str(inbox) and said[0]["mode"] == "2770"


def test_an_inbox_with_no_sibling_left_gets_the_tmpfiles_mode(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    inboxes = [(t, root / "inbox" / t) for t in ("email", "phone")]
    result = scan(inboxes, frozenset(), frozenset(), room=10, report_room=10)
    assert result.recreated == {"email": 0o2770, "phone": 0o2770}
    modes = {t: stat.S_IMODE(p.stat().st_mode) for t, p in inboxes}
    assert modes == {"email": 0o2770, "phone": 0o2770}
    (root / "inbox" / "phone").chmod(0o2775)  # the operator's choice is kept for siblings
    (root / "inbox" / "email").rmdir()
    assert scan(inboxes, frozenset(), frozenset(), 10, 10).recreated == {"email": 0o2775}


# -- 19.7: inotify limits reached ---------------------------------------------------------------

_LIMIT = "/proc/sys/user/max_inotify_instances"


def _in_own_user_namespace(python_path: str) -> tuple[str, ...]:
    """Run the daemon (still the daemon's user to the host, with no capabilities) in a user
    and pid namespace of its own whose inotify instance limit is 0: the limit binds only
    that namespace, so no other process on the machine is touched, and nothing needs
    restoring. Its /proc shows only its own processes, as ProcSubset=pid would."""
    # "$1" is the test's interpreter, which this namespace's user cannot open; the system
    # python3 runs the same checkout and site-packages instead.
    script = (f"echo 0 > {_LIMIT} && shift && PYTHONPATH={python_path} exec setpriv "
              '--inh-caps=-all --bounding-set=-all /usr/bin/python3 "$@"')
    return (str(AS_DEPLOYED), "--", "unshare", "--user", "--map-root-user", "--pid", "--fork",
            "--mount", "--mount-proc", "sh", "-c", script, "daemon")


def _skip_without_user_namespaces() -> None:
    same = f"import sys; sys.exit(sys.version_info[:2] != {tuple(sys.version_info[:2])})"
    if shutil.which("nsenter") is None or not Path("/usr/bin/python3").exists() or subprocess.run(
            ["/usr/bin/python3", "-c", same], check=False).returncode != 0:
        pytest.skip("needs nsenter and a /usr/bin/python3 of the test's version")
    probe = subprocess.run([str(AS_DEPLOYED), "--", "unshare", "--user", "--map-root-user",
                            "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c",
                            f"echo 0 > {_LIMIT}"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace for the daemon's user: {probe.stderr.decode()}")


def _set_limit(pid: int, value: int) -> None:
    subprocess.run(["nsenter", f"--target={pid}", "--user", "sh", "-c",
                    f"echo {value} > {_LIMIT}"], check=True, capture_output=True)


@pytest.mark.slow
async def test_lost_inotify_is_reported_polled_faster_retried_and_said_back_as_deployed(
        sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        _skip_without_user_namespaces()
        port = free_port()
        tmpfiles_layout(spool, ALL_TYPES)
        # Rescans 10 min apart: a delivery within seconds comes from the faster polling
        # while events are missing, and from events once they are back.
        config_file = _config_file(spool, sandbox, port, rescan_seconds=600.0)
        site = next(p for p in sys.path if p.endswith("site-packages"))
        repo = str(Path(__file__).resolve().parent.parent)
        config_file.chmod(0o644)
        with spool.log_file.open("ab") as log:
            proc = await start_daemon(config_file, stdout=log, stderr=log,
                                      wrap=_in_own_user_namespace(f"{site}:{repo}"))
        try:
            await _check_lost_and_back(spool, port, proc.pid)
            assert proc.returncode is None
        finally:
            if proc.returncode is None:
                # unshare --fork does not pass SIGTERM on: signal the whole session.
                os.killpg(proc.pid, signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout=30)
        failed = spool.events("watch_failed")
        assert len(failed) == 1, failed  # said once, not on every retry
        assert "max_user_instances" in failed[0]["fix"]
        assert len(spool.events("watch_restored")) == 1
    assert len(sandbox.uploads()) == 2


async def _check_lost_and_back(spool: Deployed, port: int, pid: int) -> None:
    root = spool.root
    await _until(lambda: _ready_or_degraded(port), "the daemon up")
    status, body = await _get(port, "/readyz")
    assert status == 503 and "degraded: inbox events unavailable" in body, body
    assert "ipqs_bulkd_watch_events_unavailable 1.0" in (await _get(port, "/metrics"))[1]
    start = time.monotonic()
    _drop(spool, "email", "polled.csv", emails(2, seed="-polled"))
    await _until(_delivered(root, "polled.csv"), "polled.csv delivered by the rescans")
    polled = time.monotonic() - start
    _set_limit(pid, 128)  # the operator raises the limit
    await _until(lambda: _ready(port), "readiness back", timeout=60)
    assert spool.events("watch_restored")
    assert "ipqs_bulkd_watch_events_unavailable 0.0" in (await _get(port, "/metrics"))[1]
    start = time.monotonic()
    _drop(spool, "email", "evented.csv", emails(2, seed="-evented"))
    await _until(_delivered(root, "evented.csv"), "evented.csv delivered by an event")
    evented = time.monotonic() - start
    print(f"delivered {polled:.2f} s after the drop without events, {evented:.2f} s with")
    assert polled < 15 and evented < 15, (polled, evented)


async def _ready_or_degraded(port: int) -> bool:
    """Up and past its start: recovered and watching (ready, or degraded with a reason)."""
    try:
        body = (await _get(port, "/readyz"))[1]
    except aiohttp.ClientError:
        return False
    return "reason" in body and "recovering jobs" not in body and "watcher not running" not in body


# -- the parts, without a deployed daemon ---------------------------------------------------


def test_a_symlinked_inbox_is_refused_by_the_scan_and_not_recreated(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    email, url = root / "inbox" / "email", root / "inbox" / "url"
    email.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "payroll.csv").write_bytes(b"a@example.com\n")
    url.symlink_to(elsewhere)
    (email / "list.csv").write_bytes(b"b@example.com\n")
    result = scan([("email", email), ("url", url)], frozenset(), frozenset(), 10, 10)
    assert [path for _, path, _ in result.found] == [email / "list.csv"]
    assert list(result.unusable) == ["url"] and "symbolic link" in result.unusable["url"]
    assert str(url) in result.unusable["url"] and result.recreated == {}
    assert url.is_symlink()
    # A file noticed before the swap is not looked at through the link either.
    assert observe([url / "payroll.csv"], None).seen == {url / "payroll.csv": None}


def test_a_claim_never_renames_through_a_symlinked_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ("email", "url"))
    spool.prepare()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    payroll = elsewhere / "payroll.csv"
    payroll.write_bytes(b"a@example.com\n")
    shutil.rmtree(spool.inbox("url"))
    spool.inbox("url").symlink_to(elsewhere)
    with pytest.raises(SymlinkedFolderError, match="symbolic link"):
        spool.claim("url", spool.inbox("url") / "payroll.csv", "multipart")
    assert payroll.exists()
    listed = drop(spool.root, "email", "list.csv", b"b@example.com\n")
    processing = spool.processing
    processing.rename(tmp_path / "moved")
    processing.symlink_to(tmp_path / "moved")
    with pytest.raises(SymlinkedFolderError):
        spool.claim("email", listed, "multipart")
    assert listed.exists() and [p.name for p in (tmp_path / "moved").iterdir()] == [".owners"]


async def test_a_symlinked_done_folder_holds_its_jobs_aside(tmp_path: Path,
                                                          sandbox: Sandbox) -> None:
    root = tmp_path / "spool"
    async with running(daemon_config(root, sandbox.api_base)) as service:
        done = root / "done" / "email"
        done.rmdir()
        done.symlink_to(tmp_path)
        drop(root, "email", "a.csv", emails(2))
        await wait_for(lambda: service.pipe.finishing.count() == 1, what="held aside")
        assert "symbolic link" in str(service.pipe.finishing.reason())
        done.unlink()
        await wait_for(lambda: "a.csv" in records(root, "done"), what="delivered")
    assert done.is_dir() and not done.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".csv") == []


async def test_unreadable_files_are_said_once_rechecked_and_forgotten_when_gone(
        tmp_path: Path) -> None:
    states: dict[Path, bool | None] = {tmp_path / "a.csv": False, tmp_path / "b.csv": False}
    rescans: list[int] = []
    stop = asyncio.Event()
    unreadable = Unreadable(states.__getitem__, initial_seconds=0.01, max_seconds=0.02)
    task = asyncio.create_task(unreadable.run(stop, lambda: rescans.append(1)))
    with capture_logs() as logs:
        for path in states:
            unreadable.held(path, 0o600, 1234)
            unreadable.held(path, 0o600, 1234)
        assert unreadable.count() == 2
        states[tmp_path / "a.csv"] = True  # chmod g+r
        states[tmp_path / "b.csv"] = None  # deleted
        await wait_for(lambda: bool(rescans) and unreadable.count() == 1, what="re-checked")
        unreadable.claimed(tmp_path / "a.csv")
        stop.set()
        await task
    said = [e for e in logs if e["event"] == "file_unreadable"]
    assert [e["path"] for e in said] == [str(p) for p in states]
    assert said[0]["mode"] == "0600" and "chmod g+r" in said[0]["fix"]
    assert unreadable.count() == 0


def test_watch_health_reports_polls_faster_and_says_when_back() -> None:
    health = WatchHealth(rescan_seconds=60.0)
    with capture_logs() as logs:
        health.failed(FileNotFoundError(2, "gone"))  # an inbox vanished: not degraded
        assert health.reason() is None and health.rescan_seconds() == 60.0
        for _ in range(3):
            health.failed(RuntimeError("Too many open files (os error 24)"))
        assert "Too many open files" in str(health.reason())
        assert health.rescan_seconds() == 2.0
        health.started()
        health.started()
    assert health.reason() is None and health.rescan_seconds() == 60.0
    events = [e["event"] for e in logs]
    assert events == ["watch_restarting", "watch_failed", "watch_restored"]
