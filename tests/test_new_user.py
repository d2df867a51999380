"""A new user's trial of the README on a fresh clone: the real command in a subprocess,
its exit status and its one line (issue: new-user findings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import invoked_as
from daemon.config import DEFAULT_PATH
from tests.cli_helpers import assert_one_line, clean_env
from tests.support import (
    FAKE_KEY,
    REPO,
    Sandbox,
    daemon_config,
    drop,
    emails,
    records,
    run_once,
)


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


# -- item 1: after the quick start, the commands reach the sandbox, not production ---------


def test_invoked_as_is_what_can_be_typed_again(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "ipqs-bulkd"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(script)])
    assert invoked_as() == ".venv/bin/ipqs-bulkd"  # the venv is not activated
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert invoked_as() == "ipqs-bulkd"  # it is: PATH finds this very script
    monkeypatch.setattr(sys, "argv", ["/somewhere/daemon/__main__.py"])
    assert invoked_as().endswith(" -m daemon")


@pytest.mark.parametrize("command", [("status",), ("jobs",), ("retry", "--all-failed"),
                                     ("submit", "list.csv", "--type", "email")])
def test_without_a_config_beside_a_running_quick_start_the_commands_say_how_to_reach_it(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    (tmp_path / "ipqs-spool").mkdir()
    (tmp_path / "ipqs-spool" / "sandbox.toml").write_text("")
    (tmp_path / "list.csv").write_text("alice@example.com\n")
    env = clean_env(IPQS_API_KEY=FAKE_KEY)  # a newcomer with a real key in the environment
    del env["IPQS_BULKD_CONFIG"]
    result = subprocess.run([sys.executable, "-m", "daemon", *command], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    if DEFAULT_PATH.exists():
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    assert_one_line(result, "config file: none given", "the real IPQS",
                    "add --config ipqs-spool/sandbox.toml")
    if command == ("status",):
        # A config named (or found) is used as named: no guessing (status reaches no IPQS).
        named = subprocess.run([sys.executable, "-m", "daemon", *command], cwd=tmp_path,
                               env={**env, "IPQS_BULKD_CONFIG": "/dev/null"},
                               capture_output=True, text=True, timeout=60, check=False)
        assert "config file: none given" not in named.stderr
        assert "config key spool.root" in named.stderr


# -- item 5: the README's contents line -----------------------------------------------------


def github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def test_the_readme_has_a_contents_line_under_the_two_commands_whose_links_all_resolve() -> None:
    text = (REPO / "README.md").read_text()
    top = text.split("\n\n")[3]  # title, command, command, then the contents
    assert top.startswith("Contents: ")
    links = re.findall(r"\]\(#([^)]+)\)", top)
    anchors = {github_anchor(line.lstrip("#")) for line in text.splitlines()
               if re.match(r"#{2,3} ", line)}
    assert len(links) >= 10 and set(links) <= anchors, set(links) - anchors


# -- item 6: small CLI surprises ------------------------------------------------------------


def ipqs_bulkd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd,
                          env=clean_env(**env), capture_output=True, text=True, timeout=60,
                          check=False)


def one_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr[-2000:]
    return result.stderr.rstrip("\n")


def test_submit_without_a_file_says_so_before_the_key(tmp_path: Path) -> None:
    line = one_line(ipqs_bulkd("submit", "--type", "email", cwd=tmp_path))
    assert line == "ipqs-bulkd: name the FILE to send (or give --url URL)"


def test_submit_refuses_a_type_that_is_not_in_spool_types(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("alice@example.com\n")
    for extra in ((), ("--dry-run",)):
        line = one_line(ipqs_bulkd("submit", "list.csv", "--type", "leaked_email", *extra,
                                   cwd=tmp_path, IPQS_API_KEY=FAKE_KEY))
        assert line == ("ipqs-bulkd: --type leaked_email: not in spool.types (proxy, email, "
                        "phone, url); add it there to send files of this type")


def test_a_misspelt_option_names_its_command_and_the_option_meant(tmp_path: Path) -> None:
    line = one_line(ipqs_bulkd("run", "--snadbox", cwd=tmp_path))
    assert line == ("ipqs-bulkd run: unrecognized arguments: --snadbox (did you mean "
                    "--sandbox?) (see ipqs-bulkd run --help)")
    line = one_line(ipqs_bulkd("status", "--verbose", cwd=tmp_path))
    assert line == ("ipqs-bulkd status: unrecognized arguments: --verbose "
                    "(see ipqs-bulkd status --help)")
    assert not (tmp_path / "ipqs-spool").exists()


def test_run_help_has_examples_and_its_exit_statuses(tmp_path: Path) -> None:
    result = ipqs_bulkd("run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "examples:\n  ipqs-bulkd run --sandbox" in result.stdout
    listed = result.stdout.split("exit status:\n")[1].splitlines()
    assert [line.split()[0] for line in listed if line[:4].strip().isdigit()] == \
        ["0", "1", "2", "130"]


def test_check_config_without_a_config_file_does_not_send_a_newcomer_to_systemd(
        tmp_path: Path) -> None:
    env = clean_env()
    del env["IPQS_BULKD_CONFIG"]
    result = subprocess.run([sys.executable, "-m", "daemon", "check-config"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    if DEFAULT_PATH.exists():
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    assert one_line(result, 0) == ("# warning: no API key here (set api.key, api.key_file or "
                                   "IPQS_API_KEY); `ipqs-bulkd run --sandbox` needs none")
    # With a config file (a deployment), the way to check the unit's key is shown.
    (tmp_path / "config.toml").write_text("")
    deployed = ipqs_bulkd("check-config", "--config", "config.toml", cwd=tmp_path)
    assert "systemd-run -P -p LoadCredential=" in one_line(deployed, 0)


# -- item 7: the extension is not checked, the content is -----------------------------------


async def test_the_inbox_takes_any_extension_and_checks_the_content(tmp_path: Path,
                                                                   sandbox: Sandbox) -> None:
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base)
    drop(root, "email", "list.txt", emails(2))            # text: sent and billed
    drop(root, "email", "x.xlsx", emails(3, seed="x"))    # text under any name: the same
    drop(root, "email", "real.xlsx", b"PK\x03\x04\x14\x00\x00\x00\x08\x00")  # a zip: refused
    assert await run_once(config) == 1
    done, failed = records(root, "done"), records(root, "failed")
    assert sorted(done) == ["list.txt", "x.xlsx"]
    assert (done["list.txt"]["rows"], done["x.xlsx"]["rows"]) == (2, 3)
    assert list(failed) == ["real.xlsx"] and failed["real.xlsx"]["reason"] == "invalid-input"
    assert len(sandbox.uploads()) == 2
