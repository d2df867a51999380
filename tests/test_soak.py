"""The crash soak (benchmarks/soak.py) in small: 20 kills -9, files arriving meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_twenty_kills_lose_nothing_and_pay_once(tmp_path: Path) -> None:
    figures_path = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--kills", "20", "--seed", "15", "--max-minutes", "2",
         "--drain-seconds", "60", "--tmp", str(tmp_path), "--json", str(figures_path)],
        capture_output=True, text=True, timeout=170, check=False)
    assert figures_path.exists(), run.stdout + run.stderr
    figures = json.loads(figures_path.read_text())
    print("\n" + run.stdout)
    assert figures["problems"] == [], run.stdout
    assert run.returncode == 0
    # The kills happened, with the daemon in the middle of its work, while files arrived.
    assert figures["kills"] == 20 and not figures["stopped_early"]
    assert figures["unexpected_exits"] == []
    assert figures["files"] >= 20
    busy = sum(n for state, n in figures["states_at_kill"].items() if state != "claimed")
    assert busy > 0, figures["states_at_kill"]
    # Every file filed once and paid once, with the faults really firing.
    assert figures["done"] == figures["files"] == figures["uploads"]
    assert figures["failed"] == 0
    assert figures["duplicates_by_sha256"] == figures["duplicates_by_file_name"] == 0
    assert figures["errors_5xx"] > 0
    assert figures["drain"]["exit_code"] == 0
    assert figures["daemon_log"]["tracebacks"] == 0
