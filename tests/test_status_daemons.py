"""``status`` finds its daemons (issue 21 item 2): each publishes its health address in the
spool's ``.daemon/``, so ``health.port = 0`` (any free port) still shows who runs, and how.

Real daemons in subprocesses, on one spool, each with its embedded sandbox.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.test_first_run import clean_env, cli, daemon_config, wait_until


@contextmanager
def daemon(config: Path, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen([sys.executable, "-m", "daemon", "run", "--sandbox", "--config",
                           str(config)], cwd=cwd, env=clean_env(), text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


def published(root: Path) -> list[Path]:
    folder = root / ".daemon"
    return sorted(folder.glob("*.json")) if folder.exists() else []


def status(config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = cli("status", "--config", str(config), *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_two_daemons_with_health_port_0_are_both_shown_ready(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, 0)
    root = tmp_path / "spool"
    with ExitStack() as stack:
        first = stack.enter_context(daemon(config, tmp_path))
        second = stack.enter_context(daemon(config, tmp_path))
        wait_until(lambda: len(published(root)) == 2 or None not in (first.poll(),
                                                                      second.poll()),
                   "both daemons published")

        def both_ready() -> bool:
            found = json.loads(status(config, tmp_path, "--json").stdout)["daemons"]
            return len(found) == 2 and all(d["ready"] for d in found)

        wait_until(both_ready, "both daemons ready")  # recovery takes a moment
        report = json.loads(status(config, tmp_path, "--json").stdout)
        assert sorted(d["pid"] for d in report["daemons"]) == sorted([first.pid, second.pid])
        assert report["daemon"]["ready"] is True
        text = status(config, tmp_path).stdout
        assert "uploads: running" in text.splitlines()
        assert "daemons on this spool: 2" in text
        rows = [line for line in text.splitlines() if line.split()[:1] in
                ([str(first.pid)], [str(second.pid)])]
        assert len(rows) == 2 and all(row.endswith("running") for row in rows)

        # A clean exit withdraws the address; a killed daemon's is left, and ignored.
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        assert first.returncode == 0
        assert len(published(root)) == 1
        second.kill()
        second.wait(timeout=30)
        assert len(published(root)) == 1
        after = json.loads(status(config, tmp_path, "--json").stdout)
        assert after["daemons"] == []
        assert after["daemon"]["reachable"] is False
        assert ".daemon" in after["daemon"]["reason"]
