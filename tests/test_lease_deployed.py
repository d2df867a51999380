"""Issue 16 as a user meets it: the daemon run as the systemd unit runs it (an unprivileged
user, /proc showing only its own processes), a writer of another user pausing mid-write
for longer than twice ``quiet_seconds``. With CAP_LEASE the lease probe sees that writer;
without it the daemon says so once and falls back to the quiet window."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deployed import AS_DEPLOYED
from tests.dockerfile import dockerfile_stages
from tests.shares import daemon_process, paid, samba_share, slow_put, split
from tests.support import (
    FAKE_KEY,
    REPO,
    Sandbox,
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    sandbox_server,
    sha256,
    wait_for,
    write_config_file,
)

USER = "nobody"
PAUSE = 8.0  # the writer's pause: more than twice QUIET
QUIET = 3.0

pytestmark = pytest.mark.slow


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A folder the daemon's user can reach (tmp_path's parents are root's alone), with
    the spool in it owned by that user."""
    if os.geteuid() != 0 or not os.access(AS_DEPLOYED, os.X_OK) or not shutil.which("setpriv"):
        pytest.skip("needs root, setpriv and the as-deployed tool")
    folder = Path("/tmp") / f"ipqs-deployed-{os.getpid()}-{tmp_path.name}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "spool").mkdir()
    shutil.chown(folder / "spool", USER, "nogroup")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def deployed_config(base: Path, sandbox: Sandbox, **watch: Any) -> Path:
    config = daemon_config(base / "spool", sandbox.api_base, spool={"types": ("email",)},
                           watch={"writer_check": "auto", "settle_seconds": 0.05,
                                  "quiet_seconds": QUIET, "rescan_seconds": 1.0, **watch},
                           log={"level": "info", "format": "json"})
    path = write_config_file(base / "config.toml", config)
    path.chmod(0o644)  # the key in it is a fake one
    return path


def events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == name:
            found.append(json.loads(line))
    return found


@asynccontextmanager
async def deployed(base: Path, config: Path, lease: bool) -> AsyncIterator[Path]:
    """The daemon as the unit runs it, as ``nobody`` (with CAP_LEASE if ``lease``); yields
    its log once it is ready."""
    log = base / "daemon.log"
    wrap = (str(AS_DEPLOYED), "--user", USER, *(["--lease"] if lease else []), "--")
    async with daemon_process(config, log, wrap=wrap) as proc:
        await wait_for(lambda: "daemon_ready" in log.read_text() or proc.returncode is not None,
                       what="daemon_ready")
        assert proc.returncode is None, log.read_text()
        yield log
        assert proc.returncode is None, log.read_text()  # alive to the end


async def pausing_writer(target: Path, data: bytes, sandbox: Sandbox,
                         wrap: tuple[str, ...] = ()) -> float:
    """Root writes half of ``data`` into ``target`` in place, pauses PAUSE seconds (checking
    that nothing was uploaded), writes the rest and closes; returns when it closed."""
    half = len(data) // 2
    staged = target.parent.parent.parent / ".parts"
    staged.mkdir(exist_ok=True)
    (staged / "a").write_bytes(data[:half])
    (staged / "b").write_bytes(data[half:])
    script = 'exec 3>"$1"; cat "$2" >&3; echo half; read go; cat "$3" >&3; exec 3>&-; echo done'
    proc = await asyncio.create_subprocess_exec(
        *wrap, "sh", "-c", script, "sh", str(target), str(staged / "a"), str(staged / "b"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert await proc.stdout.readline() == b"half\n"
    paused = time.monotonic()
    while time.monotonic() - paused < PAUSE:  # the writer is slow: that is the scenario
        await asyncio.sleep(0.5)
        assert sandbox.uploads() == [], f"uploaded {time.monotonic() - paused:.1f} s into the pause"
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    assert await proc.stdout.readline() == b"done\n"
    closed = time.monotonic()
    assert sandbox.uploads() == []
    await proc.wait()
    return closed


@pytest.mark.parametrize("namespace", [False, True], ids=["root", "other-pid-mount-ns"])
async def test_a_paused_writer_of_another_user_is_waited_for_with_cap_lease(
        tmp_path: Path, base: Path, namespace: bool) -> None:
    data = emails(4000, "-paused")
    wrap = ("unshare", "-p", "-f", "-m", "--mount-proc") if namespace else ()
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = deployed_config(base, sandbox)
        async with deployed(base, config, lease=True) as log:
            target = base / "spool" / "inbox" / "email" / "paused.csv"
            closed = await pausing_writer(target, data, sandbox, wrap)
            await wait_for(lambda: "paused.csv" in records(base / "spool", "done"),
                           what="paused.csv done")
            taken = time.monotonic() - closed
    assert paid(sandbox) == {sha256(data): 1}  # exactly one upload, of the whole file
    assert (base / "spool" / "done" / "email" / "paused.csv").read_bytes() == data
    [mode] = events(log, "writer_check_mode")
    assert (mode["check"], mode["writers_visible"]) == ("lease", False)  # /proc sees nobody
    assert [e["check"] for e in events(log, "writer_check_chosen")] == ["lease"]
    assert len(events(log, "file_held_by_writer")) == 1
    assert events(log, "lease_probe_unavailable") == []
    print(f"\nwriter ({'namespace' if namespace else 'root'}): paused {PAUSE} s, "
          f"done {taken:.2f} s after it closed, uploads={len(sandbox.uploads())}")


async def test_without_cap_lease_the_quiet_window_decides_and_says_so_once(
        tmp_path: Path, base: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = deployed_config(base, sandbox)
        async with deployed(base, config, lease=False) as log:
            started = time.monotonic()
            drop(base / "spool", "email", "first.csv", emails(10, "-1"))
            await wait_for(lambda: "first.csv" in records(base / "spool", "done"),
                           what="first.csv done")
            waited = time.monotonic() - started
            drop(base / "spool", "email", "second.csv", emails(10, "-2"))
            await wait_for(lambda: "second.csv" in records(base / "spool", "done"),
                           what="second.csv done")
    [refused] = events(log, "lease_probe_unavailable")  # said once, at start
    assert "CAP_LEASE" in refused["reason"] and refused["fallback"] == "quiet"
    [mode] = events(log, "writer_check_mode")
    assert (mode["check"], mode["window"]) == ("quiet", QUIET)
    assert [e["check"] for e in events(log, "writer_check_chosen")] == ["quiet"]
    assert waited >= QUIET - 0.5  # by the quiet window (less the mtime credit of a fresh file)
    assert len(sandbox.uploads()) == 2


async def test_a_slow_smb_put_to_a_daemon_with_cap_lease_is_uploaded_once_complete(
        tmp_path: Path, base: Path) -> None:
    # smbd (as root) holds the file open while smbclient trickles it in. /proc shows the
    # daemon nothing, and its quiet window (1 s) passes three times; the lease sees smbd.
    data = emails(12000, "-smb")
    root = base / "spool"
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = deployed_config(base, sandbox, quiet_seconds=1.0)
        with samba_share(tmp_path / "smb", root) as share:
            async with deployed(base, config, lease=True) as log:
                started = time.monotonic()
                await slow_put(share, "slow.csv", split(data, 11), 0.3, sandbox)
                written = time.monotonic() - started
                await wait_for(lambda: "slow.csv" in records(root, "done"), what="slow.csv done")
    assert written >= 3.0
    assert paid(sandbox) == {sha256(data): 1}
    assert (root / "done" / "email" / "slow.csv").read_bytes() == data
    assert len(events(log, "file_held_by_writer")) == 1


# -- the container image, started as Docker would start it (setpriv stands in for runc) ---

IMAGE_UID = 10001
CAP_BITS = {"lease": 1 << 28, "setuid": 1 << 7, "setgid": 1 << 6}


def image_command(base: Path) -> Path:
    """The image's ``/opt/ipqs-bulkd/venv/bin``, here: an ``ipqs-bulkd`` on a system
    interpreter of this Python version, which the image's user can run without any
    capability (this venv's interpreter may sit in root's home)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = shutil.which(version, path="/usr/local/bin:/usr/bin")
    if python is None:
        pytest.skip(f"needs a system {version} that any user can run")
    site_packages = sysconfig.get_paths()["purelib"]
    folder = base / "bin"
    folder.mkdir()
    script = folder / "ipqs-bulkd"
    script.write_text(f"#!{python}\nimport site, sys\nsite.addsitedir({site_packages!r})\n"
                      "from daemon.cli import run_main\nsys.exit(run_main())\n")
    script.chmod(0o755)
    return folder


def image_env(base: Path, sandbox: Sandbox) -> dict[str, str]:
    """The image's ENV lines, pointed at this checkout, a sandbox and a spool under ``base``."""
    _, final = dockerfile_stages()
    env = {k: v for k, v in final.env().items() if k.startswith("IPQS_")}
    return env | {"PATH": f"{image_command(base)}:{os.environ['PATH']}",
                  "IPQS_BULKD_SPOOL_ROOT": str(base / "spool"), "IPQS_API_KEY": FAKE_KEY,
                  "IPQS_BULKD_API_BASE_URL": sandbox.api_base, "IPQS_BULKD_HEALTH_PORT": "0",
                  "IPQS_BULKD_SPOOL_TYPES": "email", "IPQS_BULKD_LOG_FORMAT": "json",
                  "IPQS_BULKD_WATCH_SETTLE_SECONDS": "0.05",
                  "IPQS_BULKD_WATCH_QUIET_SECONDS": str(QUIET),
                  "IPQS_BULKD_POLL_INITIAL_SECONDS": "0.02", "HOME": str(base)}


def capabilities(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    caps = {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in status)
            if k.startswith("Cap")}
    uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
    return caps | {"uid": int(uid)}


@asynccontextmanager
async def image_process(base: Path, argv: list[str], env: dict[str, str]
                        ) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    log = base / "image.log"
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=base, stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=out, start_new_session=True)
    try:
        await wait_for(lambda: "daemon_ready" in log.read_text() or proc.returncode is not None,
                       what="daemon_ready")
        assert proc.returncode is None, log.read_text()
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)


def docker_start(*, user: int, caps: tuple[str, ...]) -> list[str]:
    """What runc leaves behind for ``--user U --cap-drop ALL --cap-add ...`` and
    no-new-privileges: the bounding set cut down to ``caps``, nothing inheritable, and for
    a non-root user no permitted or effective capabilities (no ambient ones are set)."""
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    argv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs"]
    if user:
        argv += [f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return [*argv, "--"]


async def test_the_compose_example_gives_the_daemon_cap_lease_and_nothing_else(
        tmp_path: Path, base: Path) -> None:
    shutil.chown(base / "spool", IMAGE_UID, IMAGE_UID)
    compose = yaml.safe_load((REPO / "examples" / "docker-compose.yml").read_text())
    sidecar = compose["services"]["ipqs-bulkd"]
    assert sidecar["user"] == "0:0" and "ALL" in sidecar["cap_drop"]
    argv = docker_start(user=0, caps=tuple(c.lower() for c in sidecar["cap_add"]))
    data = emails(2000, "-image")
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        env = image_env(base, sandbox)
        async with image_process(base, [*argv, *sidecar["entrypoint"], *sidecar["command"]],
                                 env) as (proc, log):
            caps = capabilities(proc.pid)
            target = base / "spool" / "inbox" / "email" / "held.csv"
            with open(target, "wb") as writer:  # root, in another "container": a writer
                writer.write(data[:1000])
                await wait_for(lambda: events(log, "file_held_by_writer") != [],
                               what="the lease probe holding the file")
                assert sandbox.uploads() == []
                writer.write(data[1000:])
            await wait_for(lambda: "held.csv" in records(base / "spool", "done"), what="done")
    assert caps["uid"] == IMAGE_UID
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == CAP_BITS["lease"]
    assert caps["CapBnd"] & ~sum(CAP_BITS.values()) == 0
    [mode] = events(log, "writer_check_mode")
    assert (mode["mode"], mode["check"]) == ("lease", "lease")
    assert paid(sandbox) == {sha256(data): 1}


async def test_the_image_as_it_is_with_cap_add_lease_falls_back_and_says_so(
        tmp_path: Path, base: Path) -> None:
    shutil.chown(base / "spool", IMAGE_UID, IMAGE_UID)
    _, final = dockerfile_stages()
    argv = docker_start(user=IMAGE_UID, caps=("lease",))  # USER 10001, --cap-add LEASE
    entrypoint = json.loads(final.args("ENTRYPOINT")[0]) + json.loads(final.args("CMD")[0])
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        env = image_env(base, sandbox)
        async with image_process(base, [*argv, *entrypoint], env) as (proc, log):
            caps = capabilities(proc.pid)
            drop(base / "spool", "email", "a.csv", emails(10))
            await wait_for(lambda: "a.csv" in records(base / "spool", "done"), what="done")
    assert (caps["CapEff"], caps["CapBnd"]) == (0, CAP_BITS["lease"])  # bounding set only
    [refused] = events(log, "lease_probe_unavailable")
    assert "CAP_LEASE" in refused["reason"] and refused["fallback"] == "quiet"
    [mode] = events(log, "writer_check_mode")
    assert (mode["check"], mode["window"]) == ("quiet", QUIET)
