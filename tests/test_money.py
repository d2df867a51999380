"""The money guards against the sandbox: rows on records, the credit guard, the daily
budget (across restarts, days and daemons), the per-file cap, the account API gone, the
dry run, and a wrong key found at start (issue 11; issue 14 item 2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon.commands.status import probe
from daemon.config import Config, HealthConfig
from daemon.credits import CreditGuard
from daemon.job.money import Purse
from daemon.sandbox import SandboxSettings
from daemon.sandbox.account import UNLIMITED_CREDITS
from daemon.service import Service
from daemon.spool import Job
from daemon.spool.ledger import Ledger, Limits, utc_day
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    free_port,
    quick_settings,
    records,
    run_once,
    running,
    sandbox_server,
    start_daemon,
    wait_for,
    write_config_file,
)

REPO = Path(__file__).resolve().parent.parent


def money_config(root: Path, api_base: str, *, health_port: int | None = None,
                 **budget: Any) -> Config:
    """A test daemon's config with ``[budget]`` set and quick pauses and rescans."""
    health = {"enabled": False} if health_port is None else {"enabled": True,
                                                             "port": health_port}
    return daemon_config(root, api_base, spool={"types": ("email",)},
                         watch={"rescan_seconds": 0.3},
                         upload={"pause_initial_seconds": 0.05, "pause_max_seconds": 0.3},
                         health=health, log={"level": "info", "format": "json"},
                         budget=budget)


def drop_files(root: Path, count: int, rows: int, tag: str = "f") -> None:
    for n in range(count):
        drop(root, "email", f"{tag}{n:03d}.csv", emails(rows, f"-{tag}{n}"))


def inbox(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "inbox" / "email").iterdir())


def billed(sandbox: Sandbox) -> int:
    """Rows the sandbox debited (its usage counters)."""
    return sum(sandbox.state.usage.values())


def sandbox_with(tmp_path: Path, **faults: Any) -> SandboxSettings:
    settings = quick_settings(tmp_path)
    for name, value in faults.items():
        setattr(settings.faults, name, value)
    return settings


async def cli(*argv: str) -> tuple[int, str]:
    """An operator command, ``python -m daemon ARGV``, as a subprocess: exit status,
    stdout + stderr."""
    env = {k: v for k, v in os.environ.items()
           if k != "IPQS_API_KEY" and not k.startswith("IPQS_BULKD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def run_batch(config: str, *, faketime: str | None = None) -> tuple[int, str]:
    """``run --once`` as a subprocess (under ``faketime``: the daemon's clock only, the
    sandbox keeps the real one): exit status and its log."""
    wrap = () if faketime is None else ("env", "FAKETIME_DONT_FAKE_MONOTONIC=1",
                                        "faketime", "-f", faketime)
    proc = await start_daemon(Path(config), "--once", wrap=wrap)
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode()


async def readyz(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        data: dict[str, Any] = await resp.json()
        return data


def events(output: str, name: str) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in output.splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == name]


# -- the purse, on an injected clock --------------------------------------------------------


def a_job(n: int, rows: int | None) -> Job:
    return Job(job=f"j{n}", type="email", source=f"{n}.csv", file_name=f"n{n}",
               method="multipart", rows=rows)


async def test_the_purse_holds_gives_back_and_forgets_old_days(tmp_path: Path) -> None:
    now = [datetime(2030, 1, 1, 23, 59, tzinfo=UTC).timestamp()]
    purse = Purse(cap=15, ledger=Ledger(tmp_path, Limits(per_day=20)), clock=lambda: now[0])
    assert purse.too_large(16) == "the file has 16 rows, over budget.max_rows_per_file = 15"
    assert purse.too_large(15) is None and purse.too_large(None) is None
    assert (await purse.admit(a_job(1, 10))).allowed
    assert (await purse.admit(a_job(1, 10))).allowed  # asked again: held once
    refused = await purse.admit(a_job(2, 11))
    assert not refused.allowed and purse.reason == refused.reason == (
        "waiting until the next UTC day: daily budget: 10 of 20 rows used today (UTC), "
        "next file needs 11")
    assert not (await purse.would_admit("email", 11)).allowed
    await purse.released(a_job(1, 10))  # not sent after all: its rows come back
    assert (await purse.would_admit("email", 11)).allowed
    assert (await purse.admit(a_job(2, 11))).allowed and purse.reason is None
    purse.accepted(a_job(2, 11))
    assert purse.rows_left(["email"]) == {"email": 9}
    now[0] += 120  # past midnight UTC: a new day, a new budget
    assert purse.rows_left(["email"]) == {"email": 20}
    await purse.refresh()
    now[0] += 8 * 86400
    await purse.refresh()  # a new day again: days older than a week are removed
    assert sorted(p.name for p in (tmp_path / "budget").iterdir()) == []


# -- rows ----------------------------------------------------------------------------------


async def test_rows_on_the_record_the_log_line_and_the_metrics(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "blanks.csv", b"\xef\xbb\xbfemail\r\na@x.com\r\n\r\n  \nb@x.com")
        drop(root, "email", "link.url", b"https://example.com/list.csv\n")
        config = money_config(root, sandbox.api_base, max_rows_per_day_by_type={"email": 100})
        service = Service(config)
        with capture_logs() as logs:
            assert await service.run(once=True) == 0
        service.refresh_gauges()
        metrics = service.pipe.metrics.render().decode()
    done = records(root, "done")
    assert done["blanks.csv"]["rows"] == 3  # the header is billed; blank lines are not
    assert "rows" not in done["link.url"]  # unknown until IPQS fetches it
    finished = {e["source"]: e["rows"] for e in logs if e["event"] == "file_finished"}
    assert finished == {"blanks.csv": 3, "link.url": None}
    assert 'ipqs_bulkd_rows_total{type="email"} 3.0' in metrics
    assert 'ipqs_bulkd_budget_rows_left{type="email"} 97.0' in metrics
    credits = next(f for f in text_string_to_metric_families(metrics)
                   if f.name == "ipqs_bulkd_credits_remaining").samples[0].value
    assert credits == UNLIMITED_CREDITS - 3 - 1  # a .url counts as one row against credits


async def test_json_uploads_bill_their_json_rows(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "q.csv", b"email,note\na@x.com,\n,\nb@x.com,x\n")
        config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)},
                               upload={"method": "json"})
        assert await run_once(config) == 0
    # Four non-blank lines, but the blank row (",") is not sent: three JSON rows billed.
    assert records(root, "done")["q.csv"]["rows"] == 3 == billed(sandbox)


# -- credits -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_short_balance_waits_in_the_inbox_and_resumes_after_a_top_up(
        tmp_path: Path) -> None:
    async with sandbox_server(sandbox_with(tmp_path, credits=100)) as sandbox:
        root, port = tmp_path / "spool", free_port()
        config = write_config_file(tmp_path / "config.toml",
                                   money_config(root, sandbox.api_base, health_port=port))
        drop_files(root, 15, rows=10)
        log = (tmp_path / "daemon.log").open("wb")
        daemon = await start_daemon(config, stderr=log)
        try:
            paused = "paused: credits 0, next file needs 10 + reserve 0"

            async def reason() -> str:
                try:
                    return str((await readyz(port))["reason"])
                except aiohttp.ClientError:
                    return ""

            for _ in range(500):
                if await reason() == paused and len(inbox(root)) == 5 \
                        and len(records(root, "done")) == 10:
                    break
                await asyncio.sleep(0.05)
            assert await reason() == paused
            assert len(records(root, "done")) == 10 and len(sandbox.uploads()) == 10
            assert len(inbox(root)) == 5 and records(root, "failed") == {}
            assert sandbox.state.stats.faults["credits"] == 0  # never refused by IPQS
            code, out = await cli("status", "--config", str(config))
            assert code == 0 and f"uploads: {paused}" in out and "credits: 0" in out
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
            assert "ipqs_bulkd_credits_remaining 0.0" in metrics
            assert 'ipqs_bulkd_rows_total{type="email"} 100.0' in metrics

            sandbox.state.faults.credits = 1000  # a top-up, seen by a fresh read
            await wait_for(lambda: len(records(root, "done")) == 15, what="all 15 done")
        finally:
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait()
            log.close()
    assert len(sandbox.uploads()) == 15 and records(root, "failed") == {}
    assert sandbox.state.stats.faults["credits"] == 0
    assert {r["rows"] for r in records(root, "done").values()} == {10}
    output = (tmp_path / "daemon.log").read_text()
    assert len(events(output, "uploads_paused_for_credits")) == 1


async def test_a_file_that_can_never_fit_does_not_hold_up_smaller_ones(tmp_path: Path) -> None:
    async with sandbox_server(sandbox_with(tmp_path, credits=25)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "big.csv", emails(30, "big"))
        drop_files(root, 2, rows=10, tag="small")
        assert await run_once(money_config(root, sandbox.api_base)) == 1  # big one waits
    assert sorted(records(root, "done")) == ["small000.csv", "small001.csv"]
    assert inbox(root) == ["big.csv"] and records(root, "failed") == {}
    assert billed(sandbox) == 20 and sandbox.state.stats.faults["credits"] == 0


async def test_account_api_gone_works_unguarded_and_warns_once(tmp_path: Path) -> None:
    async with sandbox_server(sandbox_with(tmp_path, account_missing=True)) as sandbox:
        root = tmp_path / "spool"
        drop_files(root, 3, rows=4)
        with capture_logs() as logs:
            assert await run_once(money_config(root, sandbox.api_base)) == 0
    assert len(records(root, "done")) == 3 and len(sandbox.uploads()) == 3
    assert sandbox.state.stats.faults["account_missing"] >= 1
    assert [e["event"] for e in logs].count("credit_guard_off") == 1


# -- daily budget --------------------------------------------------------------------------


@pytest.mark.slow
async def test_daily_budget_holds_across_a_restart_and_opens_the_next_utc_day(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = str(write_config_file(
            tmp_path / "config.toml", money_config(root, sandbox.api_base,
                                                   max_rows_per_day=50)))
        drop_files(root, 10, rows=10)
        code, out = await run_batch(config)
        assert code == 1, out[-2000:]  # files were left waiting
        assert len(records(root, "done")) == 5 and len(inbox(root)) == 5
        assert billed(sandbox) == 50 and records(root, "failed") == {}
        assert len(events(out, "uploads_waiting_for_budget")) == 1
        code, out = await cli("status", "--json", "--config", config)
        assert json.loads(out)["budget"]["used"] == {"email": 50}
        assert json.loads(out)["budget"]["left"] == {"email": 0}

        code, out = await run_batch(config)  # a restart: no more
        assert code == 1 and billed(sandbox) == 50 and len(inbox(root)) == 5

        code, out = await run_batch(config, faketime="+1d")
        assert code == 0, out[-2000:]
    assert len(records(root, "done")) == 10 and inbox(root) == []
    assert billed(sandbox) == 100 and len(sandbox.uploads()) == 10
    assert {r["rows"] for r in records(root, "done").values()} == {10}


@pytest.mark.slow
async def test_two_daemons_on_one_spool_spend_exactly_the_budget(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        config = str(write_config_file(
            tmp_path / "config.toml", money_config(root, sandbox.api_base,
                                                   max_rows_per_day=50)))
        drop_files(root, 20, rows=10)
        results = await asyncio.gather(run_batch(config), run_batch(config))
    for n, (code, out) in enumerate(results):
        (tmp_path / f"daemon{n}.log").write_text(out)
        # (A claim may fail, the file staying in its inbox, when the other daemon's
        # recovery sweep removes the job folder before its record: not about money.)
        assert code in (0, 1) and "stage_crashed" not in out, out[-2000:]
        assert "upload_job_error" not in out, out[-2000:]
    assert billed(sandbox) == 50 and len(sandbox.uploads()) == 5
    left = sorted(p.relative_to(root).as_posix() for p in (root / "processing").rglob("*")
                  if p.is_file() and ".owners" not in p.parts)
    assert (len(records(root, "done")), len(inbox(root)), records(root, "failed"), left) \
        == (5, 15, {}, [])
    assert sum(Ledger(root, Limits(50)).used(utc_day(time.time())).values()) == 50


@pytest.mark.slow
async def test_one_hundred_files_under_a_budget_never_bill_above_it(tmp_path: Path) -> None:
    """The closing figure: rows debited by the sandbox vs the budget vs the records."""
    budget = 600
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        for n in range(100):
            drop(root, "email", f"m{n:03d}.csv", emails(1 + n % 13, f"-m{n}"))
        config = money_config(root, sandbox.api_base, max_rows_per_day=budget)
        await run_once(config)
    on_records = sum(r["rows"] for r in records(root, "done").values())
    print(f"\n100 files, budget {budget}: sandbox debited {billed(sandbox)}, records "
          f"{on_records} rows in {len(records(root, 'done'))} files, "
          f"{len(inbox(root))} waiting")
    assert billed(sandbox) == on_records <= budget
    assert billed(sandbox) > budget - 13  # it stopped only when the next file did not fit
    assert records(root, "failed") == {}


# -- per-file cap, dry run -----------------------------------------------------------------


async def test_over_the_cap_fails_too_large_unsent_and_retry_force_sends_it_once(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "big.csv", emails(101))
        assert await run_once(money_config(root, sandbox.api_base,
                                           max_rows_per_file=100)) == 1
        failed = records(root, "failed")["big.csv"]
        assert failed["reason"] == "too-large" and failed["rows"] == 101
        assert "101 rows" in failed["error"] and "max_rows_per_file = 100" in failed["error"]
        assert sandbox.uploads() == []

        raised = write_config_file(tmp_path / "raised.toml", money_config(
            root, sandbox.api_base, max_rows_per_file=200))
        code, out = await cli("retry", "--force", "--config", str(raised), "big.csv")
        assert code == 0, out
        code, out = await run_batch(str(raised))
        assert code == 0, out[-2000:]
    assert records(root, "done")["big.csv"]["rows"] == 101
    assert len(sandbox.uploads()) == 1


async def test_dry_run_prints_rows_and_credits_and_sends_nothing(tmp_path: Path) -> None:
    async with sandbox_server(sandbox_with(tmp_path, credits=500)) as sandbox:
        root = tmp_path / "spool"
        config = write_config_file(tmp_path / "config.toml", money_config(
            root, sandbox.api_base, max_rows_per_day=100, max_rows_per_file=20))
        a, b = tmp_path / "a.csv", tmp_path / "b.csv"
        a.write_bytes(b"email\n" + emails(9) + b"\n\n")
        b.write_bytes(emails(25))
        code, out = await cli("submit", "--dry-run", "--type", "email", "--config",
                              str(config), str(a), str(b))
    assert code == 0, out
    assert "a.csv: 10 rows" in out and "b.csv: 25 rows" in out
    assert "credits: 500" in out and "100 of 100 rows left today" in out
    assert "over budget.max_rows_per_file = 20" in out
    assert sandbox.uploads() == [] and billed(sandbox) == 0


# -- a wrong key at start (issue 14 item 2) --------------------------------------------------


async def test_a_wrong_key_at_start_is_not_ready_and_recovers_by_itself(tmp_path: Path) -> None:
    async with sandbox_server(sandbox_with(tmp_path, invalid_key=True)) as sandbox:
        config = money_config(tmp_path / "spool", sandbox.api_base, health_port=0)
        with capture_logs() as logs:
            async with running(config) as service:
                assert service.health_server is not None and service.health_server.port
                health = HealthConfig(port=service.health_server.port)
                daemon = await probe(health)
                assert daemon["ready"] is False and daemon["paused"] is True
                assert "refused the account at start" in daemon["reason"]
                assert "Invalid or unauthorized key" in daemon["reason"]
                sandbox.state.faults.invalid_key = False  # fixed at IPQS: no restart
                await wait_for(lambda: service.health.ready()[0], what="ready again")
                assert (await probe(health))["ready"] is True
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["uploads_paused"]
    assert sandbox.uploads() == []


async def test_submit_obeys_the_same_guards(tmp_path: Path) -> None:
    async with sandbox_server(sandbox_with(tmp_path, credits=5)) as sandbox:
        root = tmp_path / "spool"
        config = str(write_config_file(tmp_path / "config.toml", money_config(
            root, sandbox.api_base, max_rows_per_day=15)))
        first, second = tmp_path / "first.csv", tmp_path / "second.csv"
        first.write_bytes(emails(10, "first"))
        second.write_bytes(emails(10, "second"))
        submit = ("submit", "--type", "email", "--config", config)
        code, out = await cli(*submit, str(first))
        assert code == 3 and "not sent: paused: credits 5, next file needs 10" in out, out
        sandbox.state.faults.credits = 100
        code, out = await cli(*submit, str(first))  # the duplicate marker was given back
        assert code == 0, out
        code, out = await cli(*submit, str(second))
        assert code == 1, out
        assert "not sent: daily budget: 10 of 15 rows used today (UTC), next file needs 10" \
            in out
    assert len(sandbox.uploads()) == 1 and billed(sandbox) == 10


async def test_a_type_over_its_budget_waits_while_others_go(tmp_path: Path) -> None:
    purse = Purse(ledger=Ledger(tmp_path, Limits(per_type={"email": 10})))
    assert (await purse.admit(a_job(1, 10))).allowed
    assert not (await purse.admit(a_job(2, 1))).allowed
    phones = Job(job="p1", type="phone", source="p.csv", file_name="p", method="multipart",
                 rows=500)
    assert (await purse.admit(phones)).allowed  # no phone budget: it goes...
    assert purse.reason is not None and "daily email budget: 10 of 10" in purse.reason
    assert purse.rows_left(["email", "phone"]) == {"email": 0}  # ...and email still waits


async def test_an_admission_interrupted_half_way_gives_its_rows_back(tmp_path: Path) -> None:
    # Cancelled while the balance is read (a body cut off before its last chunk): the rows
    # it had reserved in the ledger must not stay counted against today's budget.
    reading = asyncio.Event()

    async def slow_balance() -> int:
        reading.set()
        await asyncio.sleep(3600)
        return 10**6

    ledger = Ledger(tmp_path, Limits(per_day=1500))
    purse = Purse(ledger=ledger, guard=CreditGuard(slow_balance))
    job = Job(job="j", type="email", source="a.csv", file_name="a", method="multipart",
              rows=1000)
    admitting = asyncio.create_task(purse.admit(job))
    await asyncio.wait_for(reading.wait(), timeout=10)
    assert ledger.used(purse.today()) == {"email": 1000}  # reserved, the read under way
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert ledger.used(purse.today()) == {}
    purse.guard = None  # the balance no longer asked: the day's 1500 are all there again
    assert (await purse.admit(job)).allowed
    assert ledger.used(purse.today()) == {"email": 1000}
