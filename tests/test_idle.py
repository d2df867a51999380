"""An idle daemon sleeps (issue 15): apart from watchfiles' own 50 ms step in its watch
thread, nothing of the daemon's wakes more than about once a second."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.shares import daemon_process
from tests.support import daemon_config, quick_settings, sandbox_server, wait_for, write_config_file

WINDOW = 8.0  # seconds measured; spans one rescan-free stretch of an idle daemon


def switches(pid: int) -> dict[int, int]:
    """Voluntary context switches (a thread going to sleep: one per wake-up) per thread."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text().splitlines()
        except OSError:
            continue
        found[int(task.name)] = next(int(line.split()[1]) for line in status
                                     if line.startswith("voluntary_ctxt_switches"))
    return found


@pytest.mark.slow
async def test_an_idle_daemon_wakes_at_most_about_once_a_second(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        # The shipped timings, not the tests' fast ones (rescans every 60 s).
        config = daemon_config(tmp_path / "spool", sandbox.api_base, spool={"types": ("email",)},
                               watch={"rescan_seconds": 60.0, "settle_seconds": 0.2,
                                      "quiet_seconds": 5.0},
                               log={"level": "info", "format": "json"})
        log = tmp_path / "d.log"
        async with daemon_process(write_config_file(tmp_path / "d.toml", config), log) as proc:
            await wait_for(lambda: log.exists() and "daemon_ready" in log.read_text(),
                           what="daemon_ready")
            await asyncio.sleep(2.0)  # past start-up
            before, started = switches(proc.pid), time.monotonic()
            await asyncio.sleep(WINDOW)  # the measurement window itself
            after, took = switches(proc.pid), time.monotonic() - started
    rates = sorted(((after[t] - before.get(t, 0)) / took for t in after), reverse=True)
    print("\nwake-ups/s per thread: " + ", ".join(f"{r:.2f}" for r in rates))
    # The busiest thread is watchfiles' watch loop (its 50 ms step: about 20/s).
    watch_step, rest = rates[0], rates[1:]
    assert 10 < watch_step < 30
    # Every other thread together; before issue 15: 1.4 (the watch returned every second).
    assert sum(rest) < 0.8
