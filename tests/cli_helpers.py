"""The command as a new user runs it: ``python -m daemon`` in a subprocess, with a clean
environment, and the one-line exit-2 shape every configuration mistake must have."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ipqs-bulkd setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IPQS_", "CREDENTIALS_DIRECTORY"))}
    # /dev/null is an empty, valid config file that every user can read.
    return {**env, "IPQS_BULKD_CONFIG": "/dev/null", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def cli(*args: str, cwd: Path | str, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "daemon", *args], cwd=cwd,
                          env=clean_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def assert_one_line(result: subprocess.CompletedProcess[str], *named: str) -> str:
    """Exit 2, and stderr is exactly one line starting ``ipqs-bulkd: config ...``."""
    err = result.stderr
    assert result.returncode == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("ipqs-bulkd: config "), err[-2000:]
    for text in named:
        assert text in err
    return err


FAST = """
[watch]
settle_seconds = 0.05
writer_check = "proc"
[poll]
initial_seconds = 0.1
max_seconds = 0.5
"""


def health_port_config(folder: Path, port: int, root: str = "spool") -> Path:
    """``folder``/config.toml: spool ``root`` (relative to it), email only, health on
    ``port``, fast timings."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(f'[spool]\nroot = "{root}"\ntypes = ["email"]\n'
                    f"[health]\nport = {port}\n{FAST}")
    return path
