"""A new user's trial of the README on a fresh clone: the real command in a subprocess,
its exit status and its one line (issue: new-user findings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_first_run import clean_env


def run_into_closed_pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``ipqs-bulkd ARGS | head -0``, without the race: stdout's reader is gone already."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd,
                              env=clean_env(), stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, check=False)
    finally:
        os.close(write_end)


# -- item 2: check-config | head -2 ----------------------------------------------------------


def test_check_config_into_a_closed_pipe_is_quiet_and_succeeds(tmp_path: Path) -> None:
    result = run_into_closed_pipe("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    # The only line left on stderr is the warning that there is no key here.
    assert [line for line in result.stderr.splitlines()
            if not line.startswith("# warning: no API key")] == []


# -- item 3: rows today without a daily budget ----------------------------------------------


def status_of(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "spool").mkdir(exist_ok=True)
    (tmp_path / "config.toml").write_text(
        '[spool]\nroot = "spool"\n[health]\nenabled = false\n' + config)
    return subprocess.run([sys.executable, "-m", "daemon", "status", "--config", "config.toml",
                           *args], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=60, check=False)


def test_status_says_rows_are_not_counted_without_a_daily_budget(tmp_path: Path) -> None:
    result = status_of(tmp_path, "")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("rows today")]
    assert len(rows) == 1 and rows[0].endswith(
        "UTC): not counted (no daily budget: budget.max_rows_per_day and ..._by_type are 0)")
    report = json.loads(status_of(tmp_path, "", "--json").stdout)
    assert report["budget"]["counted"] is False


def test_status_counts_rows_with_a_daily_budget(tmp_path: Path) -> None:
    result = status_of(tmp_path, "[budget]\nmax_rows_per_day_by_type = { email = 5 }\n")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("rows today")]
    assert len(rows) == 1 and rows[0].endswith("UTC): all types 0, email 0 of 5"), rows
