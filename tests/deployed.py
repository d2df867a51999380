"""Run the daemon as the systemd unit runs it: an unprivileged user, UMask 0027, /proc
showing only its own processes (``/work/shared/tools/as-deployed``), over a spool outside
pytest's private tmp folders, while the test (root) plays producers and operators."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import start_daemon


def _as_deployed() -> Path:
    """The shared as-deployed tool: named by ``IPQS_AS_DEPLOYED``, else in the ``shared/``
    folder beside this checkout (as CI lays it out), else the workplace's own copy."""
    if named := os.environ.get("IPQS_AS_DEPLOYED"):
        return Path(named)
    beside = Path(__file__).resolve().parents[2] / "shared" / "tools" / "as-deployed"
    return beside if beside.exists() else Path("/work/shared/tools/as-deployed")


AS_DEPLOYED = _as_deployed()
USER = "ipqs-bulkd"


@dataclass
class Deployed:
    """A spool owned by the daemon's user, and where its daemon's logs go."""

    base: Path
    root: Path
    uid: int
    gid: int

    @property
    def log_file(self) -> Path:
        return self.base / "daemon.log"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (those with ``event`` = ``name``, if given)."""
        lines = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                lines.append(entry)
        return lines


@contextmanager
def deployed_spool() -> Iterator[Deployed]:
    """A fresh spool root that the daemon's user owns; skips where that cannot be run."""
    if os.geteuid() != 0 or not AS_DEPLOYED.exists() or shutil.which("unshare") is None:
        pytest.skip("needs root and the as-deployed tool")
    # The tool creates its user on first use.
    subprocess.run([str(AS_DEPLOYED), "--", "true"], check=True, capture_output=True)
    user = pwd.getpwnam(USER)
    probe = subprocess.run([str(AS_DEPLOYED), "--", sys.executable, "-c", "import daemon.cli"],
                           cwd="/", capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"{USER} cannot run this interpreter or read this checkout")
    base = Path(tempfile.mkdtemp(prefix="ipqs-deployed-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "spool"
    root.mkdir()
    os.chown(root, user.pw_uid, user.pw_gid)
    try:
        yield Deployed(base, root, user.pw_uid, user.pw_gid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@asynccontextmanager
async def daemon_as_deployed(spool: Deployed, config_file: Path) -> AsyncIterator[
        asyncio.subprocess.Process]:
    """``ipqs-bulkd run`` under as-deployed; stopped with SIGTERM (then killed) on exit."""
    config_file.chmod(0o644)
    with spool.log_file.open("ab") as log:
        proc = await start_daemon(config_file, stdout=log, stderr=log,
                                  wrap=(str(AS_DEPLOYED), "--"))
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


PRODUCER = "ipqs-drop"  # another user, in the daemon's group, that drops files


def tmpfiles_layout(spool: Deployed, types: tuple[str, ...]) -> None:
    """The inboxes as ``systemd/ipqs-bulkd.tmpfiles`` makes them: inbox/ 0750, each
    inbox/<type> 2770, all the daemon's user and group."""
    inbox = spool.root / "inbox"
    inbox.mkdir()
    os.chown(inbox, spool.uid, spool.gid)
    inbox.chmod(0o750)
    for file_type in types:
        folder = inbox / file_type
        folder.mkdir()
        os.chown(folder, spool.uid, spool.gid)
        folder.chmod(0o2770)


def producer(spool: Deployed) -> pwd.struct_passwd:
    """The producer user (created on first use), a member of the daemon's group."""
    try:
        user = pwd.getpwnam(PRODUCER)
    except KeyError:
        group = grp_name(spool.gid)
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "-G", group, PRODUCER], check=True,
                       capture_output=True)
        user = pwd.getpwnam(PRODUCER)
    return user


def grp_name(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


def as_producer(spool: Deployed, script: str, *, umask: str = "0027") -> None:
    """Run ``sh -c script`` as the producer (with its groups) under ``umask``."""
    user = producer(spool)
    subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--init-groups", "sh", "-c", f"umask {umask}; {script}"],
                   check=True, capture_output=True, cwd="/")
