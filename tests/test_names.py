"""Names are data (issue 21): a producer's file name never reaches a terminal raw.

Everything here is real: the sandbox and the daemon run as subprocesses, the commands too,
and their output is checked byte for byte for control characters. The unit tests of
:func:`daemon.shown.shown` pin its form; the end-to-end test walks names with terminal
escapes, CR, LF, C1 controls and invalid UTF-8 through the daemon, ``status``, ``jobs``,
``retry``, ``submit`` and both log formats.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.api import IpqsClient
from daemon.service import Service
from daemon.shown import shown, terminal_safe
from tests.cli_helpers import clean_env
from tests.support import FAKE_KEY, Sandbox, daemon_config, start_daemon

# Raw control bytes in output: C0 but tab and newline, DEL, C1 (as UTF-8), and any byte
# that is not UTF-8 is caught by the strict decode in assert_clean.
CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")

NAMES = {
    "osc-csi": "evil\x1b]0;pwned\x07\x1b[2J\x1b[31mred.csv",
    "cr": "over\rwritten.csv",
    "lf": "two\nlines.csv",
    "c1": "c1-\x9b31m.csv",
    "not-utf8": os.fsdecode(b"bad\xff\xfe-utf8.csv"),
}


def assert_clean(out: bytes) -> str:
    """No raw control character, valid UTF-8; the text."""
    found = CONTROL.search(out)
    assert found is None, f"raw control {found.group()!r} in {out[:3000]!r}"
    return out.decode("utf-8")


# -- the one function -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    (NAMES["osc-csi"], "evil\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred.csv"),
    (NAMES["cr"], "over\\rwritten.csv"),
    (NAMES["lf"], "two\\nlines.csv"),
    (NAMES["c1"], "c1-\\u009b31m.csv"),
    (NAMES["not-utf8"], "bad\\xff\\xfe-utf8.csv"),
    (b"bad\xff.csv", "bad\\xff.csv"),
    (Path("a\x7f/b"), "a\\x7f/b"),
    ("back\\slash\\x1b.csv", "back\\\\slash\\\\x1b.csv"),
    ("right\u202eto-left.csv", "right\\u202eto-left.csv"),
    ("plain naïve 名前.csv", "plain naïve 名前.csv"),
])
def test_shown_escapes_controls_visibly(name: object, expected: str) -> None:
    assert shown(name) == expected


@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(
    ["\\", "\x1b", "\x07", "\r", "\n", "\x9b", "\x7f", "\udcff", "\udc80", "\u202e"])))
def test_shown_is_printable_and_unambiguous(text: str) -> None:
    out = shown(text)
    assert not CONTROL.search(out.encode("utf-8"))  # encodable: no lone surrogate either
    assert not {unicodedata.category(c) for c in out} & {"Cc", "Cs", "Zl", "Zp"}
    # Unambiguous: the escapes decode back to the very same string.
    assert _unshown(out) == text


def _unshown(text: str) -> str:
    """The inverse of :func:`shown`, to prove it loses nothing."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "\\":
            out.append(text[i])
            i += 1
            continue
        kind = text[i + 1]
        if kind in "\\trn":
            out.append({"\\": "\\", "t": "\t", "r": "\r", "n": "\n"}[kind])
            i += 2
        elif kind == "x":
            code = int(text[i + 2:i + 4], 16)
            out.append(chr(code) if code < 0x80 else chr(0xDC00 + code))
            i += 4
        else:
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
    return "".join(out)


def test_terminal_safe_keeps_line_breaks_and_escapes_the_rest() -> None:
    assert terminal_safe("a\nb\x1b[2Jc\rd\\x") == "a\nb\\x1b[2Jc\\rd\\x"
    assert terminal_safe(shown("n\x1bame")) == shown("n\x1bame")


# -- through the real daemon ------------------------------------------------------------------


def run_cli(*args: str | bytes, cwd: Path,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd,
                          env=clean_env(IPQS_API_KEY=FAKE_KEY, **(env_extra or {})),
                          capture_output=True, timeout=120, check=False)


def write_config(tmp_path: Path, api_base: str, log_format: str) -> Path:
    path = tmp_path / f"config-{log_format}.toml"
    path.write_text(
        f'[api]\nbase_url = "{api_base}"\nkey = "{FAKE_KEY}"\n'
        f'[spool]\nroot = "{tmp_path / "spool"}"\ntypes = ["email"]\n'
        '[watch]\nsettle_seconds = 0.05\nwriter_check = "proc"\n'
        "[poll]\ninitial_seconds = 0.05\nmax_seconds = 0.2\n"
        "[budget]\ncheck_credits = false\n"
        f'[health]\nenabled = false\n[log]\nformat = "{log_format}"\n')
    return path


def drop(inbox: Path, name: str, data: bytes) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    staging = inbox.parent / ".staging"
    staging.write_bytes(data)
    os.rename(staging, os.path.join(os.fsencode(inbox), os.fsencode(name)))


async def command(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """A command for people, as a process of its own (the sandbox runs in this loop)."""
    return await asyncio.to_thread(run_cli, *args, cwd=cwd)


async def daemon_once(config: Path) -> tuple[int, bytes]:
    """``run --once`` through the one daemon-process helper: exit status and its logs."""
    proc = await start_daemon(config, "--once")
    _, logs = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, logs


@pytest.mark.slow
async def test_odd_names_reach_no_terminal_raw_and_json_keeps_them_exact(
        tmp_path: Path, sandbox: Sandbox) -> None:
    console = write_config(tmp_path, sandbox.api_base, "console")
    inbox = tmp_path / "spool" / "inbox" / "email"
    for i, name in enumerate(NAMES.values()):
        drop(inbox, name, f"user{i}@example.com\n".encode())
    empty = "empty\x1b[5m.csv"  # fails as invalid-input, unsent
    drop(inbox, empty, b"")

    code, raw_logs = await daemon_once(console)
    logs = assert_clean(raw_logs)
    assert code == 1, logs[-3000:]
    assert shown(NAMES["osc-csi"]) in logs and shown(NAMES["not-utf8"]) in logs
    done = tmp_path / "spool" / "done" / "email"
    sources = {json.loads((done / f"{name}.json").read_bytes())["source"]
               for name in NAMES.values()}
    assert sources == set(NAMES.values())  # records keep the exact name

    status = await command("status", "--config", str(console), cwd=tmp_path)
    text = assert_clean(status.stdout + status.stderr)
    assert status.returncode == 0, text
    for name in (*NAMES.values(), empty):
        assert shown(name) in text
    report = json.loads((await command("status", "--json", "--config", str(console),
                                       cwd=tmp_path)).stdout)
    assert {r["name"] for r in report["recent"]} == {*NAMES.values(), empty}

    # Another client of the same account names its jobs as it likes.
    async with IpqsClient(sandbox.api_base, FAKE_KEY) as client:
        await client.upload_rows("email", [["x@example.com"]], NAMES["osc-csi"])
    jobs = await command("jobs", "--config", str(console), cwd=tmp_path)
    assert shown(NAMES["osc-csi"]) in assert_clean(jobs.stdout + jobs.stderr)
    listed = json.loads((await command("jobs", "--json", "--config", str(console),
                                       cwd=tmp_path)).stdout)
    assert NAMES["osc-csi"] in {j["file_name"] for j in listed["csvs"]}

    retry = await command("retry", "--all-failed", "--force", "--config", str(console),
                          cwd=tmp_path)
    assert shown(empty) in assert_clean(retry.stdout + retry.stderr)
    assert retry.returncode == 0
    assert (inbox / empty).exists()
    missing = await command("retry", os.fsencode(NAMES["not-utf8"]), "--config",
                            str(console), cwd=tmp_path)
    assert shown(NAMES["not-utf8"]) in assert_clean(missing.stderr)

    odd = tmp_path / "to-submit"
    drop(odd, NAMES["osc-csi"], b"late@example.com\n")
    submit = await command("submit", os.path.join(os.fsencode(odd),
                                                  os.fsencode(NAMES["osc-csi"])),
                           "--type", "email", "--wait", "--out", str(odd / "out"), "--config",
                           str(console), cwd=tmp_path)
    text = assert_clean(submit.stdout + submit.stderr)
    assert submit.returncode == 0, text
    assert shown(NAMES["osc-csi"]) in text
    assert (odd / "out" / f"{NAMES['osc-csi']}.all.csv").exists()

    # JSON logs keep the exact name, JSON-escaped.
    as_json = write_config(tmp_path, sandbox.api_base, "json")
    (inbox / empty).unlink()
    drop(inbox, NAMES["cr"], b"again@example.com\n")
    _, json_logs = await daemon_once(as_json)
    assert_clean(json_logs)
    events = [json.loads(line) for line in json_logs.splitlines()]
    assert NAMES["cr"] in {e.get("source") for e in events}


def test_check_config_and_config_errors_show_paths_escaped(tmp_path: Path) -> None:
    root = tmp_path / NAMES["osc-csi"]
    shown_config = run_cli("check-config", cwd=tmp_path,
                           env_extra={"IPQS_BULKD_SPOOL_ROOT": str(root)})
    text = assert_clean(shown_config.stdout + shown_config.stderr)
    assert shown_config.returncode == 0, text
    # TOML's (JSON's) own escapes: the value reads back as the exact path.
    line = next(x for x in text.splitlines() if x.startswith("root = "))
    assert json.loads(line.removeprefix("root = ")) == str(root)
    missing = run_cli("check-config", "--config", str(tmp_path / NAMES["lf"]), cwd=tmp_path)
    error = assert_clean(missing.stderr)
    assert missing.returncode == 2
    assert error.count("\n") == 1 and "two\\nlines.csv" in error


async def test_the_systemd_status_line_shows_ipqs_words_escaped(tmp_path: Path) -> None:
    service = Service(daemon_config(tmp_path / "spool", "http://127.0.0.1:9/api"))
    try:
        service.pipe.breaker.failure("Invalid key.\nREADY=1\x1b[2J")
        status = service.refresh_gauges()
    finally:
        await service.pipe.client.close()
    assert status.endswith("; PAUSED: Invalid key.\\nREADY=1\\x1b[2J")
