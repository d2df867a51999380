"""Hard-linked drops (issues 17.4 and 19.3): a claimed file with other links gets its own
inode, so done/ holds exactly the bytes billed, whatever happens to the other names; and
nothing is decided from /proc/sys, which the shipped unit hides."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemon.sandbox import SandboxSettings
from daemon.spool import Spool
from tests.conftest import StartSandbox
from tests.deployed import AS_DEPLOYED
from tests.support import daemon_config, emails, records, running, wait_for, write_config_file

USER = "ipqs-bulkd"


def test_a_hard_linked_claim_gets_its_own_inode(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ("email",))
    spool.prepare()
    export = tmp_path / "e2.csv"
    export.write_bytes(emails(3))
    os.link(export, spool.inbox("email") / "e2.csv")
    job = spool.claim("email", spool.inbox("email") / "e2.csv", "multipart")
    assert job is not None
    assert spool.inspect(job) is None
    claimed = spool.input_path(job)
    assert claimed.stat().st_nlink == 1 and export.stat().st_nlink == 1
    assert not os.path.samefile(claimed, export)
    assert job.sha256 == hashlib.sha256(emails(3)).hexdigest()
    assert [p.name for p in spool.job_dir(job).iterdir() if p.name.startswith(".")] == []


async def test_a_hard_linked_input_rewritten_after_its_upload_keeps_the_billed_bytes(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # The reproduction: `ln exports/e2.csv inbox/email/e2.csv`; after file_submitted the
    # exporter rewrites exports/e2.csv in place. Before: done/ held the new bytes.
    sandbox_settings.processing_seconds = 3600  # the job waits at IPQS while we rewrite
    sandbox = await start_sandbox(sandbox_settings)
    config = daemon_config(tmp_path / "spool", sandbox.api_base)
    exports = tmp_path / "exports"
    exports.mkdir()
    billed, rewritten = emails(4, seed="old"), emails(6, seed="new")
    (exports / "e2.csv").write_bytes(billed)
    async with running(config):
        os.link(exports / "e2.csv", config.spool.root / "inbox" / "email" / "e2.csv")
        await wait_for(lambda: len(sandbox.uploads()) == 1, what="file_submitted")
        with (exports / "e2.csv").open("r+b") as fh:  # in place: the same inode
            fh.write(rewritten)
            fh.truncate()
        sandbox.state.advance(3600)
        await wait_for(lambda: bool(records(config.spool.root, "done")), what="done")
    done = config.spool.root / "done" / "email"
    assert (done / "e2.csv").read_bytes() == billed
    record = records(config.spool.root, "done")["e2.csv"]
    assert record["sha256"] == sandbox.uploads()[0]["sha256"] == hashlib.sha256(billed).hexdigest()
    assert (exports / "e2.csv").read_bytes() == rewritten  # the exporter's file is its own
    assert len(sandbox.uploads()) == 1


async def test_hard_linked_drops_are_taken_as_deployed(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 19.3: under ProcSubset=pid /proc/sys is hidden; the old check read it as "off"
    # and sent every hard-linked drop to failed/. Now nothing is read from /proc/sys.
    if os.geteuid() != 0 or not AS_DEPLOYED.exists() or shutil.which("unshare") is None:
        pytest.skip("needs root and the as-deployed tool")
    subprocess.run([str(AS_DEPLOYED), "--", "true"], check=True, capture_output=True)
    hidden = subprocess.run([str(AS_DEPLOYED), "--", "cat", "/proc/sys/fs/protected_hardlinks"],
                            capture_output=True, check=False)
    assert hidden.returncode != 0  # as the unit runs it, /proc/sys is not there
    user = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="ipqs-hardlinks-", dir="/tmp"))
    try:
        base.chmod(0o755)
        root = base / "spool"
        sandbox = await start_sandbox(sandbox_settings)
        config = daemon_config(root, sandbox.api_base)
        Spool(root, config.spool.types).prepare()
        for path in [root, *root.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        exports = base / "exports"
        exports.mkdir()
        (exports / "linked.csv").write_bytes(emails(3))
        (exports / "linked.csv").chmod(0o644)
        os.link(exports / "linked.csv", root / "inbox" / "email" / "linked.csv")
        config_file = write_config_file(base / "config.toml", config)
        config_file.chmod(0o644)
        env = {k: v for k, v in os.environ.items() if k != "IPQS_API_KEY"}
        proc = await asyncio.create_subprocess_exec(
            str(AS_DEPLOYED), "--", sys.executable, "-m", "daemon", "run", "--once",
            "--config", str(config_file), cwd="/", env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        assert records(root, "done")["linked.csv"]["results"]
        assert not records(root, "failed")
        assert (root / "done" / "email" / "linked.csv").stat().st_uid == user.pw_uid
        assert len(sandbox.uploads()) == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
