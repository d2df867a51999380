"""First run, as a new user meets it: the real command in a subprocess, one line and exit 2.

Every configuration mistake, whether found while loading or only when the daemon starts
(a spool root it cannot create, a health port that is taken), is one line on stderr that
names the key, and exit status 2: never a traceback, never a daemon running without health.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon import cli as cli_module
from daemon.cli import SANDBOX_RULE
from daemon.config import load_config
from daemon.sandbox import TEST_KEY
from tests.cli_helpers import assert_one_line, clean_env, cli, health_port_config
from tests.support import FAKE_KEY, REPO, emails, free_port


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False




# -- mistakes found while loading (issue 18, item 8) -----------------------------------------


@pytest.mark.parametrize(("text", "named"), [
    ('[api]\nbase_url = "http://[::1"\n', "api.base_url"),
    ('[api]\nbase_url = "http://127.0.0.1:99999/api"\n', "api.base_url"),
    ('[health]\nport = 65536\n', "health.port"),
    ('[health]\nhost = "local host"\n', "health.host"),
    ('[upload]\nconcurrency = 100000000\n', "upload.concurrency"),
], ids=["ipv6-unclosed", "url-port", "health-port", "host-space", "huge-count"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_config_mistakes_are_one_line_exit_2_at_load(tmp_path: Path, command: str, text: str,
                                                     named: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    result = cli(command, "--config", "config.toml", cwd=tmp_path,
                 env=clean_env(IPQS_API_KEY=FAKE_KEY))
    assert_one_line(result, f"config key {named} ")
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path, command: str) -> None:
    (tmp_path / "config.toml").write_bytes(b'[spool]\nroot = "caf\xe9"\n')
    result = cli(command, "--config", "config.toml", cwd=tmp_path,
                 env=clean_env(IPQS_API_KEY=FAKE_KEY))
    assert_one_line(result, "config.toml is not UTF-8", "0xe9")


# -- mistakes that only the start can find (issue 18 item 8, issue 14 items 1 and 13) ---------


def test_a_health_host_that_does_not_resolve_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[spool]\nroot = "spool"\n'
                                          '[health]\nhost = "no-such-host.invalid"\n')
    result = cli("run", "--config", "config.toml", cwd=tmp_path,
                 env=clean_env(IPQS_API_KEY=FAKE_KEY))
    assert_one_line(result, "config key health.host: cannot resolve 'no-such-host.invalid'")


def test_a_health_host_of_another_machine_stops_the_start(tmp_path: Path) -> None:
    # 192.0.2.1 is TEST-NET-1: a valid address that is no address of this host.
    result = cli("run", cwd=tmp_path, env=clean_env(
        IPQS_API_KEY=FAKE_KEY, IPQS_BULKD_SPOOL_ROOT="spool", IPQS_BULKD_HEALTH_HOST="192.0.2.1"))
    assert_one_line(result, "config key health.host: '192.0.2.1' is not an address")


@pytest.mark.parametrize("root", ["/etc/passwd", "/etc/passwd/x"])
def test_a_spool_root_inside_a_file_is_one_line_naming_it(tmp_path: Path, root: str) -> None:
    result = cli("run", cwd=tmp_path, env=clean_env(IPQS_API_KEY=FAKE_KEY,
                                                    IPQS_BULKD_SPOOL_ROOT=root))
    err = assert_one_line(result, f"config key spool.root: cannot create {root} ",
                          "(Not a directory)", "point spool.root")
    assert "Traceback" not in err


def as_nobody() -> tuple[str, ...]:
    """A prefix that runs a command as ``nobody``; skips where that is not possible."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run a command as nobody")
    prefix = (setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import daemon.cli"], cwd="/",
                           capture_output=True, check=False, env=clean_env())
    if probe.returncode != 0:
        pytest.skip("nobody cannot run this interpreter or read this checkout")
    return prefix


def test_the_default_spool_root_as_a_plain_user_is_one_line_with_the_fix() -> None:
    default_root = Path("/var/lib/ipqs-bulkd")
    if default_root.exists():
        pytest.skip(f"{default_root} exists on this machine")
    result = cli("run", cwd="/", prefix=as_nobody(),
                 env=clean_env(IPQS_API_KEY=FAKE_KEY, IPQS_BULKD_HEALTH_PORT="0"))
    assert_one_line(result, "config key spool.root: cannot create /var/lib/ipqs-bulkd "
                            "(Permission denied)",
                    "user nobody", "sudo install -d -o nobody /var/lib/ipqs-bulkd")
    assert not default_root.exists()


def test_a_root_owned_spool_as_a_plain_user_names_the_folder(tmp_path: Path) -> None:
    locked = Path("/tmp") / f"ipqs-locked-{os.getpid()}"
    locked.mkdir(mode=0o755)
    try:
        result = cli("run", cwd="/", prefix=as_nobody(), env=clean_env(
            IPQS_API_KEY=FAKE_KEY, IPQS_BULKD_HEALTH_PORT="0",
            IPQS_BULKD_SPOOL_ROOT=str(locked / "spool")))
        assert_one_line(result, f"cannot create {locked}/spool (Permission denied)",
                        "IPQS_BULKD_SPOOL_ROOT")
    finally:
        shutil.rmtree(locked)


@pytest.mark.slow
def test_a_second_daemon_on_the_same_health_port_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    first_config = health_port_config(tmp_path / "a", port)
    second_config = health_port_config(tmp_path / "b", port)
    env = clean_env()
    with subprocess.Popen([sys.executable, "-m", "daemon", "run", "--sandbox", "--config",
                           str(first_config)], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as first:
        try:
            wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz")
                       or first.poll() is not None, "the first daemon ready")
            assert first.poll() is None
            second = cli("run", "--sandbox", "--config", str(second_config), cwd=tmp_path,
                         env=env)
            assert_one_line(second, f"config key health.port: 127.0.0.1:{port} is already in "
                                    "use", "0 for any free port")
            # It stopped before taking a lease on its spool, let alone a job.
            assert list((tmp_path / "b" / "spool" / "processing" / ".owners").iterdir()) == []
            assert answers(f"http://127.0.0.1:{port}/healthz")  # the first one runs on
            first.send_signal(signal.SIGTERM)
            _, err = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()
    assert first.returncode == 0, err[-2000:]


# -- relative spool roots (issue 18 item 4) and the sandbox's spool (issue 14 item 4) ---------


def printed_root(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("root = "))
    return str(json.loads(line.removeprefix("root = ")))


@pytest.mark.slow
def test_a_relative_spool_root_is_the_config_folders_from_any_working_directory(
        tmp_path: Path) -> None:
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    w2.mkdir()
    # health.port = 0: a free port, so `run` with it keeps working.
    config = health_port_config(w1, 0)
    env = clean_env(IPQS_API_KEY=FAKE_KEY)
    roots = {printed_root(cli("check-config", "--config", str(config), cwd=here, env=env))
             for here in (w1, w2, tmp_path)}
    assert roots == {str(w1 / "spool")}
    inbox = w1 / "spool" / "inbox" / "email"
    inbox.mkdir(parents=True)
    (inbox / "list.csv").write_bytes(emails(2))
    # The daemon started from w2 works on w1/spool, the spool the config file names;
    # --sandbox too uses the spool.root of a config it is given.
    result = cli("run", "--sandbox", "--once", "--config", "../w1/config.toml", cwd=w2,
                 env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert (w1 / "spool" / "done" / "email" / "list.csv.json").exists()
    assert not (w2 / "spool").exists() and not (w2 / "ipqs-spool").exists()


def test_home_and_environment_roots(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    home = cli("check-config", cwd=tmp_path / "w",
               env=clean_env(HOME=str(tmp_path), IPQS_BULKD_SPOOL_ROOT="~/spool"))
    assert printed_root(home) == str(tmp_path / "spool")
    # From the environment, a relative root is taken from the working directory.
    relative = cli("check-config", cwd=tmp_path / "w",
                   env=clean_env(IPQS_BULKD_SPOOL_ROOT="../spool"))
    assert printed_root(relative) == str(tmp_path / "spool")


def test_the_sandbox_spool_without_a_config_is_ipqs_spool_here(tmp_path: Path) -> None:
    env = clean_env(IPQS_BULKD_HEALTH_PORT="0")
    del env["IPQS_BULKD_CONFIG"]
    result = cli("run", "--sandbox", "--once", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ipqs-spool" / "inbox" / "email").is_dir()
    assert str(tmp_path / "ipqs-spool") in result.stderr


def test_the_sandbox_spool_rule_is_one_rule_in_code_help_and_readme(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    production = tmp_path / "etc.toml"
    production.write_text('[spool]\nroot = "/srv/production-spool"\n')
    monkeypatch.setattr("daemon.config.DEFAULT_PATH", production)
    for name in list(os.environ):
        if name.startswith(("IPQS_", "CREDENTIALS_DIRECTORY")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    named = tmp_path / "named" / "config.toml"
    named.parent.mkdir()
    named.write_text('[spool]\nroot = "spool"\n')

    def root(*argv: str, sandbox: bool = True) -> Path:
        return cli_module._load(cli_module.build_parser().parse_args(["run", *argv]),
                                sandbox=sandbox).spool.root

    assert root(sandbox=False) == Path("/srv/production-spool")  # the production config...
    assert root() == tmp_path / "ipqs-spool"  # ...is never read by --sandbox
    assert root("--config", str(named)) == tmp_path / "named" / "spool"
    monkeypatch.setenv("IPQS_BULKD_SPOOL_ROOT", "/srv/elsewhere")
    assert root() == Path("/srv/elsewhere")
    # The same words in --help and in the README.
    with pytest.raises(SystemExit):
        cli_module.main(["run", "--help"])
    assert " ".join(SANDBOX_RULE.split()) in " ".join(capsys.readouterr().out.split())
    readme = " ".join((REPO / "README.md").read_text().replace("`", "").split())
    assert SANDBOX_RULE.removeprefix("spool: ") in readme


# -- docs and help (issue 14, items 7, 8 and 9) ---------------------------------------------


def test_the_readme_opens_with_the_two_commands_and_leads_to_the_operator_commands() -> None:
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert lines[:9] == [
        "# ipqs-bulkd", "", "```sh",
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/ipqs-bulkd run "
        "--sandbox", "```", "", "```sh",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python "
        "-m pytest", "```"]
    top = text[:text.index("## What it does")]
    assert "python3-venv" in top and "## Operator commands" in top
    for command in ("status", "submit", "jobs", "retry", "check-config"):
        assert f"ipqs-bulkd {command}" in top
    systemd = text[text.index("### Run it under systemd"):text.index("### Run it in a container")]
    assert "apt install python3-venv" in systemd
    assert "systemd-run -P -p LoadCredential=api-key:" in systemd


def test_the_compose_examples_key_file_is_git_ignored() -> None:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run([git, "check-ignore", "-q", "examples/ipqs_api_key.txt"], cwd=REPO,
                            check=False)
    assert result.returncode == 0


def help_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli_module.main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_sandbox_help_shows_each_default_and_what_each_flag_does(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli_module.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sandbox = commands.choices["sandbox"]
    for action in sandbox._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.default not in (None, False):
            assert "(default: %(default)s)" in action.help or "default: all" in action.help, \
                action.dest
    out = help_of("sandbox", capsys=capsys)
    assert "port to listen on (default: 8089)" in out
    assert "--new-seconds S a job stays NEW this long after its upload (default: 0.5)" in out


def test_check_config_help_describes_it(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_of("check-config", capsys=capsys)
    assert "print the effective values as TOML" in out and "where the API key comes from" in out
    assert "systemd-run -P -p LoadCredential=api-key:/etc/ipqs-bulkd/api-key" in out
    assert "exit status: 0 valid 2 a configuration error" in out


# -- the quick start leads on (issue 14 item 3) ----------------------------------------------


@pytest.mark.slow
def test_run_sandbox_hands_its_config_to_the_other_commands(tmp_path: Path) -> None:
    # As the README's quick start: .venv/bin/ipqs-bulkd, the venv not activated, no config.
    script = Path(sys.executable).parent / "ipqs-bulkd"
    if not script.exists():
        pytest.skip("the console script is not installed beside this python")
    (tmp_path / ".venv").symlink_to(script.parent.parent)
    env = clean_env(PATH="/usr/bin:/bin")
    del env["IPQS_BULKD_CONFIG"]
    hint = "in another terminal: .venv/bin/ipqs-bulkd status --config ipqs-spool/sandbox.toml"
    lines: list[str] = []
    with subprocess.Popen([".venv/bin/ipqs-bulkd", "run", "--sandbox"], cwd=tmp_path,
                          env=env, text=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE) as daemon:
        assert daemon.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(daemon.stderr or ()), daemon=True)
        reader.start()
        try:
            wait_until(lambda: hint + "\n" in lines or daemon.poll() is not None, "the hint")
            assert daemon.poll() is None, "".join(lines)[-2000:]
            handed = tmp_path / "ipqs-spool" / "sandbox.toml"
            handed_config = tomllib.loads(handed.read_text())
            assert handed_config["api"]["key"] == TEST_KEY
            assert handed_config["health"]["port"] == 0  # any free port: no clash (item 4)
            inbox = tmp_path / "ipqs-spool" / "inbox" / "email"
            (tmp_path / "list.csv").write_bytes(emails(2))
            (tmp_path / "list.csv").rename(inbox / "list.csv")
            done = tmp_path / "ipqs-spool" / "done" / "email" / "list.csv.json"
            wait_until(done.exists, "the file done")
            # As the hint says, verbatim: from the same folder, with no other setting.
            others = clean_env(PATH="/usr/bin:/bin")
            status = subprocess.run(shlex.split(hint.split(": ", 1)[1]), cwd=tmp_path,
                                    env=others, capture_output=True, text=True, timeout=60,
                                    check=False)
            assert status.returncode == 0, status.stderr
            assert "email      0           0     1       0" in status.stdout
            assert "uploads: running" in status.stdout.splitlines()
            jobs = cli("jobs", "--json", "--config", "ipqs-spool/sandbox.toml", cwd=tmp_path,
                       env=others)
            assert jobs.returncode == 0, jobs.stderr
            record = json.loads(done.read_text())
            assert [(j["id"], j["file_name"]) for j in json.loads(jobs.stdout)["csvs"]] == [
                (record["id"], record["file_name"])]
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
            reader.join(timeout=30)
    assert daemon.returncode == 0, "".join(lines)[-2000:]
    assert not handed.exists()  # it named a port that is gone now


def test_the_handed_config_never_holds_a_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPQS_API_KEY", FAKE_KEY)
    config = load_config(None, {"IPQS_API_KEY": FAKE_KEY})
    text = cli_module._sandbox_toml(config)
    assert FAKE_KEY not in text
    assert tomllib.loads(text)["api"]["key"] == ""
    assert "(from IPQS_API_KEY)" in text
