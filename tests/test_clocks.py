"""Clocks (issue 18.3): the duplicate window survives wall-clock steps; an unsynchronised
wall clock is reported (a caveat: the daemon stays ready)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from daemon import clocks
from daemon.health import HealthState
from tests.support import (
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    running,
    sandbox_server,
    start_daemon,
    wait_for,
    write_config_file,
)

ROOT_DIR = Path(__file__).resolve().parent.parent
DAY = 86400.0


def test_age_within_one_boot_ignores_the_wall_clock() -> None:
    if clocks.boot_id() is None:
        pytest.skip("/proc/sys/kernel/random/boot_id is hidden here")
    made = clocks.stamp()
    # Written while the wall clock was two days behind, or two days ahead: same age.
    for error in (-2 * DAY, 2 * DAY):
        assert clocks.age({**made, "created": made["created"] + error}) < 60
    assert clocks.age({**made, "boottime": made["boottime"] - 3 * 3600}) >= 3 * 3600


def test_age_across_boots_takes_the_younger_wall_reading() -> None:
    now = time.time()
    earlier_boot = {"created": now - 2 * DAY, "boot_id": "another-boot", "boottime": 5.0}
    assert clocks.age(earlier_boot) >= 2 * DAY - 60
    # The file's mtime (set by a file server, say) says it is an hour old: believed,
    # because the younger reading keeps the marker longer.
    assert 3500 < clocks.age(earlier_boot, mtime=now - 3600) < 3700
    # A marker from before boot ids were recorded: its own time, as it always was.
    assert clocks.age({"created": now - 2 * DAY}, mtime=now) >= 2 * DAY - 60
    assert clocks.age({"created": now + DAY}) == 0.0  # from the future: never negative
    assert clocks.age({}) == float("inf")  # nothing to go by: not a marker that holds


def test_adjtimex_answers_are_read() -> None:
    assert clocks.synced_from(0, 0) is True           # TIME_OK
    assert clocks.synced_from(5, 0) is False          # TIME_ERROR
    assert clocks.synced_from(0, clocks.STA_UNSYNC) is False
    assert clocks.synced_from(-1, 0) is None          # the call failed: cannot tell
    state = clocks.adjtimex_state()  # the real call, read-only
    assert state is None or (0 <= state[0] <= 5 and state[1] >= 0)


def test_an_unsynchronised_clock_degrades_readiness_without_failing_it() -> None:
    state = HealthState(recovered=True, watching=True, caveats=[clocks.UNSYNCED])
    ok, why = state.ready()
    assert ok and why.startswith("ready, but: the wall clock is not synchronised")


async def test_the_daemon_reports_an_unsynchronised_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clocks, "wall_clock_synced", lambda: False)  # what the kernel says
    async with sandbox_server(quick_settings(tmp_path)) as sandbox, \
            running(daemon_config(tmp_path / "spool", sandbox.api_base)) as service:
        ok, why = service.health.ready()
    assert ok and "not synchronised" in why


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime (faketime)")
async def test_a_marker_written_two_days_behind_holds_after_the_clock_is_fixed(
        tmp_path: Path) -> None:
    """18.3: a daemon whose wall clock is two days behind (libfaketime; the kernel's boot
    clock is right, as it is on such a host) takes a file; the clock is fixed; the same
    content dropped again is still a duplicate within the 24 h window."""
    data = emails(10, "two-days")
    root = tmp_path / "spool"
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = daemon_config(root, sandbox.api_base)
        path = write_config_file(tmp_path / "config.toml", config)
        drop(root, "email", "first.csv", data)
        # The kernel's boot clock is right on such a host: only the wall clock is faked.
        proc = await start_daemon(path, "--once", wrap=(
            "env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", "-2d"))
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        first = records(root, "done")["first.csv"]
        assert first["submitted_at"] < time.strftime("%Y-%m-%d", time.gmtime(time.time() - DAY))
        # The clock is fixed: this daemon reads the real time.
        drop(root, "email", "again.csv", data)
        async with running(config):
            await wait_for(lambda: "again.csv" in records(root, "failed"),
                           what="the copy's verdict")
        assert len(sandbox.uploads()) == 1, "IPQS jobs for one content"
        assert records(root, "failed")["again.csv"]["reason"] == "duplicate"


def test_status_says_when_the_clock_is_not_synchronised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli import main

    monkeypatch.setattr("daemon.cli.configure", lambda *args, **kwargs: None)
    monkeypatch.delenv("IPQS_API_KEY", raising=False)
    root = tmp_path / "spool"
    root.mkdir()
    config = write_config_file(tmp_path / "config.toml",
                               daemon_config(root, "http://127.0.0.1:9/api"))
    assert main(["status", "--config", str(config)]) == 0
    assert "clock:" not in capsys.readouterr().out
    monkeypatch.setattr(clocks, "wall_clock_synced", lambda: False)
    assert main(["status", "--config", str(config)]) == 0
    assert f"clock: {clocks.UNSYNCED}" in capsys.readouterr().out.splitlines()


def test_the_boot_id_comes_from_the_unit_where_proc_hides_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clocks, "BOOT_ID", tmp_path / "hidden")  # as under ProcSubset=pid
    monkeypatch.delenv(clocks.BOOT_ID_ENV, raising=False)
    assert clocks.boot_id() is None
    # systemd's %b: the same id as /proc's, without the dashes.
    monkeypatch.setenv(clocks.BOOT_ID_ENV, "A39EA91D36AC441696E766E493E1137F")
    assert clocks.boot_id() == "a39ea91d-36ac-4416-96e7-66e493e1137f"
    monkeypatch.setenv(clocks.BOOT_ID_ENV, "%b")  # not expanded: no id, wall time decides
    assert clocks.boot_id() is None
    unit = (ROOT_DIR / "systemd" / "ipqs-bulkd.service").read_text()
    assert f"Environment={clocks.BOOT_ID_ENV}=%b" in unit.splitlines()
