"""Paid means delivered: results IPQS has billed are never abandoned before the deadline,
and what cannot be fetched by then can be fetched later without uploading again."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.api import CsvJob, ResultFile
from daemon.cli import main
from daemon.commands.common import EXIT_NOT_FOUND
from daemon.config import Config
from daemon.errors import RejectedError
from daemon.inputs import first_row_is_header
from daemon.job.verdicts import ResultsNotReady, links_ready, rows_in_doubt, unknown_id
from daemon.sandbox import SandboxSettings
from daemon.sandbox.options import add_arguments, settings_from_args
from daemon.spool import Job
from tests.conftest import StartSandbox
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    records,
    run_once,
    running,
    wait_for,
    write_config_file,
)


@pytest.fixture(autouse=True)
def logging_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main()`` configures logging, and structlog then caches loggers for good, which
    would blind ``capture_logs()`` in later test modules (as in test_commands)."""
    monkeypatch.setattr("daemon.cli.configure", lambda *args, **kwargs: None)
    monkeypatch.delenv("IPQS_API_KEY", raising=False)


#: About two seconds: long enough for several rounds at the test's poll intervals.
SHORT_DEADLINE_HOURS = 2 / 3600


def _config(root: Path, sandbox: Sandbox, **poll: Any) -> Config:
    return daemon_config(root / "spool", sandbox.api_base, poll=poll) if poll else \
        daemon_config(root / "spool", sandbox.api_base)


def _delivered(root: Path, n: int) -> bool:
    done = records(root / "spool", "done")
    return len(done) == n and all(r["results"] for r in done.values())


async def test_links_dead_for_ten_seconds_all_three_files_end_in_done(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 17.2: result links answer 404 for the first 10 s after FINISHED (a CDN that has
    # not caught up). Before: four refusals in milliseconds, then failed/ "rejected".
    sandbox_settings.faults.links_dead_seconds = 10
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    async with running(config):
        for n in range(3):
            drop(config.spool.root, "email", f"e{n}.csv", emails(5, seed=str(n)))
        # Far more refusals than the old limit (4 per file) before the CDN catches up.
        await wait_for(lambda: sandbox.state.stats.faults["dead_link"] >= 15,
                       what="links refused many times")
        assert not records(config.spool.root, "failed")
        sandbox.state.advance(10)  # ten seconds on the sandbox clock: the links work now
        await wait_for(lambda: _delivered(tmp_path, 3), what="three files delivered")
    done = records(config.spool.root, "done")
    assert all(set(r["results"]) == set(config.results.sets) for r in done.values())
    assert all(r["fetch_attempts"] >= 1 for r in done.values())
    assert len(sandbox.uploads()) == 3
    assert not records(config.spool.root, "failed")


async def test_links_dead_forever_fail_as_results_unavailable_then_retry_fetches_them(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 17.2 and 20.8: past the deadline the job fails with its own reason, its IPQS id
    # and its attempts; `retry --results-only` then fetches the results with 0 uploads.
    sandbox_settings.faults.links_dead_seconds = 10**9
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox, deadline_hours=SHORT_DEADLINE_HOURS)
    root = config.spool.root
    drop(root, "email", "paid.csv", emails(4))
    assert await run_once(config) == 1
    failed = records(root, "failed")["paid.csv"]
    assert failed["reason"] == "results-unavailable"
    assert failed["id"] == sandbox.uploads()[0]["id"]
    assert failed["fetch_attempts"] >= 2 and failed["results"] == {}
    assert "retry --results-only" in failed["error"] and "paid" in failed["error"]

    sandbox.state.faults.links_dead_seconds = 0  # the links work now
    config_file = write_config_file(tmp_path / "config.toml", config)
    assert main(["retry", "--results-only", "paid.csv", "--config", str(config_file)]) == 0
    assert "back in processing/" in capsys.readouterr().out
    assert not (root / "failed" / "email" / "paid.csv").exists()
    assert await run_once(config) == 0
    done = records(root, "done")["paid.csv"]
    assert done["id"] == failed["id"] and set(done["results"]) == set(config.results.sets)
    assert (root / "done" / "email" / "paid.csv").read_bytes() == emails(4)
    assert len(sandbox.uploads()) == 1  # nothing uploaded again
    assert list((root / "history" / "email").glob("paid.csv.*.json"))


def test_results_only_refuses_a_record_without_an_ipqs_id(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = daemon_config(tmp_path / "spool", "http://127.0.0.1:9/api")
    failed = config.spool.root / "failed" / "email"
    failed.mkdir(parents=True)
    (failed / "bad.csv").write_bytes(b"x\n")
    (failed / "bad.csv.json").write_text('{"type": "email", "source": "bad.csv", '
                                         '"reason": "rejected"}')
    config_file = write_config_file(tmp_path / "config.toml", config)
    argv = ["retry", "--results-only", "bad.csv", "--config", str(config_file)]
    assert main(argv) == EXIT_NOT_FOUND
    assert "no IPQS id" in capsys.readouterr().err
    assert (failed / "bad.csv").exists() and (failed / "bad.csv.json").exists()


async def test_soft_failures_on_status_calls_never_fail_a_paid_job(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 18.5: `success: false`, "An internal error occurred." on status calls.
    # Before: the first one sent the job to failed/ as "rejected".
    sandbox_settings.faults.status_soft_failures = 5
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    drop(config.spool.root, "email", "soft.csv", emails(3))
    assert await run_once(config) == 0
    assert sandbox.state.stats.faults["status_soft_failure"] == 5
    assert records(config.spool.root, "done")["soft.csv"]["results"]
    assert len(sandbox.uploads()) == 1


async def test_an_unknown_id_fails_the_job_only_when_it_repeats(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 18.5: only a definitive answer (the id is unknown) fails a job, and only after
    # it repeats: one "Invalid CSV ID." in between is a glitch.
    sandbox_settings.processing_seconds = 3600  # keep the jobs running meanwhile
    sandbox = await start_sandbox(sandbox_settings)
    state = sandbox.state
    config = _config(tmp_path, sandbox)
    root = config.spool.root
    async with running(config):
        drop(root, "email", "glitch.csv", emails(2, seed="g"))
        await wait_for(lambda: len(state.jobs) == 1, what="first upload")
        job = state.jobs.pop(next(iter(state.jobs)))  # IPQS "forgets" it for a moment
        seen = state.stats.requests["status"]
        await wait_for(lambda: state.stats.requests["status"] >= seen + 1, what="a refusal")
        state.jobs[job.id] = job
        state.advance(3600)  # and finishes it
        await wait_for(lambda: _delivered(tmp_path, 1), what="glitch.csv delivered")

        drop(root, "email", "gone.csv", emails(2, seed="x"))
        await wait_for(lambda: len(state.jobs) == 2, what="second upload")
        state.jobs.clear()  # IPQS no longer knows it at all
        await wait_for(lambda: "gone.csv" in records(root, "failed"), what="gone.csv failed")
    gone = records(root, "failed")["gone.csv"]
    assert gone["reason"] == "rejected" and "3 times" in gone["error"] and gone["id"]
    assert len(sandbox.uploads()) == 2


async def test_finished_with_null_links_is_asked_again_never_filed_empty(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 18.6: FINISHED with null links for every set. Before: done/ with results {}.
    sandbox_settings.faults.null_link_answers = 4
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    drop(config.spool.root, "email", "nulls.csv", emails(3))
    assert await run_once(config) == 0
    assert sandbox.state.stats.faults["null_links"] == 4
    done = records(config.spool.root, "done")["nulls.csv"]
    assert set(done["results"]) == set(config.results.sets)
    assert done["fetch_attempts"] == 4


async def test_null_links_until_the_deadline_fail_as_results_unavailable(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    sandbox_settings.faults.null_link_answers = 10**6
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox, deadline_hours=SHORT_DEADLINE_HOURS)
    drop(config.spool.root, "email", "never.csv", emails(3))
    assert await run_once(config) == 1
    failed = records(config.spool.root, "failed")["never.csv"]
    assert failed["reason"] == "results-unavailable" and failed["id"]
    assert "no download link" in failed["error"]
    assert not records(config.spool.root, "done")


# -- issue 20, stage side: answers IPQS might really give ------------------------------


async def test_an_all_set_short_of_rows_is_fetched_again_with_a_fresh_link(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 20.3: a results file cut at a line end (a matching length, whole lines) that
    # only the row count shows. Before: filed in done/ as complete, one row short.
    sandbox_settings.faults.short_results = 1
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    drop(config.spool.root, "email", "short.csv", emails(5))
    assert await run_once(config) == 0
    assert sandbox.state.stats.faults["short_results"] == 1
    record = records(config.spool.root, "done")["short.csv"]
    assert "warning" not in record
    saved = config.spool.root / "done" / "email" / record["results"]["all"]
    assert len(saved.read_bytes().splitlines()) == 5 + 1  # every row, and the header


async def test_an_all_set_short_twice_is_filed_with_a_warning(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    sandbox_settings.faults.short_results = 2
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    drop(config.spool.root, "email", "doubt.csv", emails(5))
    assert await run_once(config) == 0
    record = records(config.spool.root, "done")["doubt.csv"]
    assert "4 rows for an input of 5" in record["warning"]


@pytest.mark.parametrize("knobs", [
    {"truncate_downloads": True, "odd_answers": 2},
    {"answer_form": "html", "operations": frozenset({"download"}), "odd_answers": 2},
], ids=["cut-mid-line", "html-page"])
async def test_a_damaged_download_is_fetched_again_never_filed(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        knobs: dict[str, Any]) -> None:
    # Issue 20.3: the api layer refuses a cut or HTML download; the job fetches again with
    # a fresh link (here twice: one more round) instead of filing it.
    for name, value in knobs.items():
        setattr(sandbox_settings.faults, name, value)
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    drop(config.spool.root, "email", "odd.csv", emails(6))
    assert await run_once(config) == 0
    record = records(config.spool.root, "done")["odd.csv"]
    saved = config.spool.root / "done" / "email" / record["results"]["all"]
    assert len(saved.read_bytes().splitlines()) == 6 + 1
    assert record["fetch_attempts"] == 1 and "warning" not in record


@pytest.mark.parametrize("form", ["missing", "empty_list"])
async def test_finished_without_a_downloads_object_is_polled_again(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        form: str) -> None:
    # Issue 20.4. Before: done/ with results {} although the next answer had links.
    sandbox_settings.faults.downloads_form = form
    sandbox_settings.faults.odd_answers = 3
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    drop(config.spool.root, "email", "nodl.csv", emails(3))
    assert await run_once(config) == 0
    record = records(config.spool.root, "done")["nodl.csv"]
    assert set(record["results"]) == {"all"} and record["fetch_attempts"] >= 1


async def test_status_words_in_any_case_and_string_booleans_deliver_once(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issues 20.2 and 20.6 through the daemon: "success": "true", "aborted": "false",
    # status "completed". Before: rejected (string success), or stuck until the deadline.
    faults = sandbox_settings.faults
    faults.booleans, faults.status_case, faults.finished_status = "string", "lower", "Completed"
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox)
    root = config.spool.root
    for n in range(3):
        drop(root, "email", f"s{n}.csv", emails(3, seed=f"s{n}"))
    assert await run_once(config) == 0
    assert {r["results"]["all"] for r in records(root, "done").values()}
    assert len(sandbox.uploads()) == 3
    assert len(list((root / "markers").iterdir())) == 3  # paid content stays marked


@pytest.mark.parametrize("public_url", ["http://results.elsewhere.invalid", "file://"])
async def test_a_link_no_setting_can_fix_ends_as_results_unavailable_at_the_deadline(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        public_url: str) -> None:
    # Issue 20.8: a link to another host or to file:// was retried without end once the
    # job was FINISHED. The deadline runs from upload to filed results.
    sandbox_settings.public_url = public_url
    sandbox = await start_sandbox(sandbox_settings)
    config = _config(tmp_path, sandbox, deadline_hours=SHORT_DEADLINE_HOURS)
    drop(config.spool.root, "email", "far.csv", emails(3))
    assert await run_once(config) == 1
    record = records(config.spool.root, "failed")["far.csv"]
    assert record["reason"] == "results-unavailable" and record["id"]
    assert "api.download_hosts" in record["error"]
    assert sandbox.state.stats.requests["download"] == 0  # nothing left for that host


async def test_a_redirected_upload_keeps_its_marker_and_is_looked_up_not_returned(
        tmp_path: Path, start_sandbox: StartSandbox,
        sandbox_settings: SandboxSettings) -> None:
    # Issue 20.2, stage side: a 302 answering a sent upload body may hide a job the
    # origin created. Before: the file went back to its inbox and its marker was removed.
    faults = sandbox_settings.faults
    faults.redirect_to, faults.operations = "http://127.0.0.1:9", frozenset({"upload"})
    sandbox = await start_sandbox(sandbox_settings)
    config = daemon_config(tmp_path / "spool", sandbox.api_base, upload={"method": "json"})
    root = config.spool.root
    async with running(config):
        drop(root, "email", "moved.csv", emails(3))
        await wait_for(lambda: sandbox.state.stats.faults["redirect"] >= 1, what="redirect")
        await wait_for(lambda: any((root / "processing").glob("*/job.json")), what="job")
    assert not list((root / "inbox" / "email").iterdir())  # not returned to its inbox
    assert len(list((root / "markers").iterdir())) == 1
    for job_dir in (root / "processing").glob("[!.]*"):
        assert json.loads((job_dir / "job.json").read_text())["state"] == "uploading"
        os.utime(job_dir, (0, 0))  # the stopped daemon's lease has long run out
    sandbox.state.faults.redirect_to = ""
    assert await run_once(config) == 0  # resumed: looked up, then sent once
    assert records(root, "done")["moved.csv"]["results"]
    assert len(sandbox.uploads()) == 1


# -- the verdicts, one by one ------------------------------------------------------------


def _job(rows: int | None, header_row: bool | None = None) -> Job:
    return Job(job="j", type="email", source="x.csv", file_name="x", method="multipart",
               rows=rows, header_row=header_row)


def _answer(downloads: dict[str, str | None] | None) -> CsvJob:
    return CsvJob.from_answer({"id": 7, "status": "FINISHED", "downloads": downloads})


@pytest.mark.parametrize(("downloads", "job", "ready"), [
    ({"all": "https://d/x", "bad": None}, _job(5), True),        # bad: explicitly empty
    ({"all": None, "bad": None}, _job(5), False),                 # nothing published yet
    ({"all": None, "bad": "https://d/x"}, _job(5), False),        # all cannot be empty
    (None, _job(5), False),                                       # no downloads object
    ({"bad": "https://d/x"}, _job(5), False),                     # the all set left out
    ({"all": None, "bad": None}, _job(1, header_row=True), True),  # a header alone
    ({"all": None}, _job(1, header_row=False), False),
], ids=["explicit-null", "all-null", "all-null-others-linked", "missing", "set-left-out",
        "header-only", "one-value-row"])
def test_links_ready(downloads: dict[str, str | None] | None, job: Job, ready: bool) -> None:
    sets = ("all", "bad")
    if ready:
        links_ready(_answer(downloads), sets, job)
    else:
        with pytest.raises(ResultsNotReady):
            links_ready(_answer(downloads), sets, job)


@pytest.mark.parametrize(("job", "lines", "doubt"), [
    (_job(5, header_row=False), 6, False),
    (_job(5, header_row=False), 5, True),
    (_job(5, header_row=True), 5, False),
    (_job(5, header_row=True), 6, True),
    (_job(5), 5, False),   # unknown header: either count is consistent
    (_job(None), 1, False),  # a .url file: rows unknown, nothing to compare
])
def test_rows_in_doubt(job: Job, lines: int, doubt: bool) -> None:
    assert (rows_in_doubt(job, "all", ResultFile(100, lines)) is not None) is doubt
    assert rows_in_doubt(job, "clean", ResultFile(100, 1)) is None


def test_first_row_is_header(tmp_path: Path) -> None:
    cases = {b"email\na@b.c\n": True, b"a@b.c\n": False, b"Phone Number\n+1555\n": True,
             b"1.2.3.4\n": False, b"https://x\n": False, b"\xef\xbb\xbfemail,name\n": True}
    for data, header in cases.items():
        (tmp_path / "x.csv").write_bytes(data)
        assert first_row_is_header(tmp_path / "x.csv") is header, data


def test_unknown_id_is_told_from_a_soft_failure() -> None:
    assert unknown_id(RejectedError("Invalid CSV ID."))
    assert not unknown_id(RejectedError("An internal error occurred."))


def test_the_delivery_knobs_have_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    faults = settings_from_args(parser.parse_args(
        ["--links-dead-seconds", "10", "--status-soft-failures", "2",
         "--null-link-answers", "3", "--short-results", "1"])).faults
    assert (faults.links_dead_seconds, faults.status_soft_failures, faults.null_link_answers,
            faults.short_results) == (10, 2, 3, 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["--short-results", "-1"])
