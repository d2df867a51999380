"""Real file-sharing servers on loopback for the shared-folder tests: Samba (smbd) and
SSHFS (sshd, mounted through FUSE), each on a free 127.0.0.1 port, plus a daemon run
as a subprocess. Each helper skips, with its reason, only where this machine cannot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import Sandbox, free_port, start_daemon, wait_for

# Free loopback ports: each test run gets its own, so two runs never share a server.
SMB_PORT = free_port()
SSH_PORT = free_port()


def require(*binaries: str, root: bool = False, fuse: bool = False) -> None:
    """Skip the test when the machine truly cannot run it (``.ci/run`` installs the tools)."""
    missing = [b for b in binaries if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)} (.ci/run installs them on Debian)")
    if root and os.geteuid() != 0:
        pytest.skip("needs root (smbd's private config, FUSE mounts, private namespaces)")
    if fuse and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/fuse: FUSE mounts are impossible here")


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.02)


def stop_session(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM a server started in its own session, then wait for every process of that
    session (smbd's notifyd and cleanupd outlive it by a second or two)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + timeout
    while _session_alive(proc.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def _session_alive(sid: int) -> bool:
    return subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).returncode == 0


@dataclass
class SambaShare:
    """``//127.0.0.1/spool`` on ``SMB_PORT``, sharing ``folder`` read-write to guests."""

    folder: Path

    def command(self, commands: str) -> list[str]:
        return ["smbclient", "//127.0.0.1/spool", "-p", str(SMB_PORT), "-N", "-c", commands]

    def run(self, commands: str) -> str:
        done = subprocess.run(self.command(commands), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


def _smb_conf(base: Path, folder: Path) -> str:
    dirs = {key: base / key.split()[0] for key in (
        "private dir", "lock directory", "state directory", "cache directory",
        "pid directory", "ncalrpc dir")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    lines = ["[global]", f"smb ports = {SMB_PORT}", "interfaces = lo", "bind interfaces only = yes",
             "disable netbios = yes", f"passdb backend = tdbsam:{base}/passdb.tdb",
             "map to guest = Bad User", "load printers = no", "disable spoolss = yes",
             "server min protocol = SMB2", "smb2 max write = 65536", f"log file = {base}/log.smbd"]
    lines += [f"{key} = {path}" for key, path in dirs.items()]
    # The daemon's user owns the spool; guests write as that user, as README advises.
    lines += ["[spool]", f"path = {folder}", "read only = no", "guest ok = yes",
              "force user = root", "create mask = 0644"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def samba_share(base: Path, folder: Path) -> Iterator[SambaShare]:
    """smbd as a child with a private config under ``base``, sharing ``folder``."""
    require("smbd", "smbclient", root=True)
    base.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    conf = base / "smb.conf"
    conf.write_text(_smb_conf(base, folder))
    # Its own session: smbd signals its process group on exit. --no-process-group lets it
    # start there; stdin must not be a terminal or socket, or it daemonizes.
    with open(base / "smbd.out", "wb") as out:
        proc = subprocess.Popen(
            [_binary("smbd"), f"--configfile={conf}", "--foreground", "--no-process-group",
             "--debug-stdout", "-d", "0"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_port(SMB_PORT, proc)
        yield SambaShare(folder)
    finally:
        stop_session(proc)


@dataclass
class SshServer:
    """sshd on 127.0.0.1:``SSH_PORT`` accepting ``client_key`` for root."""

    base: Path
    client_key: Path


@contextlib.contextmanager
def ssh_server(base: Path) -> Iterator[SshServer]:
    """sshd in a private mount namespace (its /run/sshd on a private tmpfs)."""
    require("sshd", "sshfs", "fusermount", "unshare", root=True, fuse=True)
    base.mkdir(parents=True, exist_ok=True)
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / key)],
                       check=True)
    shutil.copy(base / "client.pub", base / "authorized_keys")
    config = base / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {SSH_PORT}", f"HostKey {base / 'host'}",
        f"AuthorizedKeysFile {base / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "UsePAM no", "StrictModes no", "PidFile none",
        "Subsystem sftp internal-sftp"]) + "\n")
    script = ("mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
              f"exec {_binary('sshd')} -D -e -f {config}")
    with open(base / "sshd.out", "wb") as out:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(SSH_PORT, proc)
        yield SshServer(base, base / "client")
    finally:
        stop_session(proc)


@contextlib.contextmanager
def sshfs_mount(server: SshServer, remote: Path, mount: Path) -> Iterator[Path]:
    """``remote`` mounted at ``mount`` over SFTP; unmounted whatever happens."""
    mount.mkdir(parents=True, exist_ok=True)
    # dir_cache=no: otherwise a file made through another mount shows in listings ~20 s late.
    options = (f"IdentityFile={server.client_key},StrictHostKeyChecking=no,"
               "UserKnownHostsFile=/dev/null,LogLevel=ERROR,dir_cache=no")
    proc = subprocess.Popen(
        ["sshfs", "-f", "-p", str(SSH_PORT), "-o", options, f"root@127.0.0.1:{remote}",
         str(mount)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mount):
            assert proc.poll() is None, f"sshfs exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{mount} not mounted"
            time.sleep(0.02)
        yield mount
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(mount)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def daemon_process(config: Path, log: Path, *,
                         wrap: tuple[str, ...] = ()) -> AsyncIterator[asyncio.subprocess.Process]:
    """``ipqs-bulkd run`` as a subprocess in its own session, logging to ``log``; stopped
    with SIGTERM (then killed) at the end unless the test ended it already."""
    with open(log, "ab") as out:
        proc = await start_daemon(config, stdout=out, stderr=out, wrap=wrap)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


def kill_session(proc: asyncio.subprocess.Process) -> None:
    """kill -9 the daemon and anything it was started under (``unshare``)."""
    os.killpg(proc.pid, signal.SIGKILL)


def paid(sandbox: Sandbox) -> Counter[str]:
    """Uploads the sandbox accepted, by sha256."""
    return Counter(str(u["sha256"]) for u in sandbox.uploads())


async def slow_put(share: SambaShare, name: str, chunks: list[bytes], every: float,
                   sandbox: Sandbox) -> None:
    """``smbclient put /dev/stdin`` fed from a throttled pipe, checking after each chunk that
    nothing was uploaded yet.

    smbclient sends the first 64 KiB (``smb2 max write``) at once, then holds the rest until
    the pipe ends: the file sits on the share, open O_RDWR in an smbd child, unchanged for
    the whole write. The hardest case for a quiet window.
    """
    proc = await asyncio.create_subprocess_exec(
        *share.command(f"put /dev/stdin inbox/email/{name}"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdin is not None
    target = share.folder / "inbox" / "email" / name
    total = sum(map(len, chunks))
    for n, chunk in enumerate(chunks, 1):
        proc.stdin.write(chunk)
        await proc.stdin.drain()
        if n == 1:
            await wait_for(lambda: target.exists() and target.stat().st_size > 0, timeout=10,
                           what="the write under way on the share")
        await asyncio.sleep(every)  # the writer is slow: that is the scenario
        assert sandbox.uploads() == [], f"uploaded after {n} of {len(chunks)} chunks"
    assert 0 < target.stat().st_size < total  # it really was incomplete all along
    proc.stdin.close()
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


def split(data: bytes, parts: int) -> list[bytes]:
    """The first 64 KiB (what smbclient sends at once), then the rest in ``parts`` pieces."""
    first, rest = data[:65536], data[65536:]
    step = -(-len(rest) // parts)
    return [first] + [rest[i:i + step] for i in range(0, len(rest), step)]
