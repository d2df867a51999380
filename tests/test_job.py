"""The job layer: the lifecycle table, the in-flight bookkeeping, and the one conversation
with IPQS that the daemon and ``submit`` share."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
import structlog

from daemon.api import CsvJob
from daemon.cli import main
from daemon.errors import IpqsError
from daemon.job.conversation import Conversation
from daemon.job.inflight import InFlight
from daemon.job.state import TRANSITIONS, IllegalTransition, JobState, advance
from daemon.sandbox import SandboxSettings
from daemon.spool import Job
from tests.conftest import StartSandbox
from tests.support import daemon_config, drop, emails, records, run_once, sha256, write_config_file

S = JobState


def _job(state: str) -> Job:
    return Job(job="20260101T000000-abcd0123", type="email", source="a.csv",
               file_name="a.csv", method="multipart", state=state)


def test_every_state_has_a_row_and_every_allowed_transition_passes() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for old, targets in TRANSITIONS.items():
        for new in targets:
            job = _job(old.value)
            advance(job, new)
            assert job.state == new


@pytest.mark.parametrize(("old", "new"), [
    (S.CLAIMED, S.SUBMITTED),    # an id without an upload saved first
    (S.CLAIMED, S.FETCHED),
    (S.SUBMITTED, S.RETURNING),  # paid for: it must never go back to its inbox
    (S.FETCHED, S.UPLOADING),    # never a second upload once results are in
    (S.FETCHED, S.RETURNING),
    (S.FINISHING, S.UPLOADING),
    (S.FINISHING, S.CLAIMED),
    (S.RETURNING, S.UPLOADING),  # going back to its inbox: never uploaded from here
    (S.UPLOADING, S.CLAIMED),
    (S.UPLOADING, S.FETCHED),
])
def test_forbidden_transitions_raise_a_bug_not_an_ipqs_error(old: JobState,
                                                              new: JobState) -> None:
    job = _job(old.value)
    with pytest.raises(IllegalTransition) as caught:
        advance(job, new)
    assert not isinstance(caught.value, IpqsError)
    assert job.state == old  # unchanged


def test_an_unknown_state_on_disk_is_a_bug() -> None:
    with pytest.raises(IllegalTransition):
        advance(_job("sent"), S.SUBMITTED)


def test_no_module_sets_a_job_state_but_the_lifecycle() -> None:
    # spool's own writes (unclaim, finish) are made no-ops by the job layer advancing first.
    root = Path(__file__).resolve().parent.parent / "daemon"
    setters = []
    for path in root.rglob("*.py"):
        if (path.name == "state.py" and path.parent.name == "job") or "sandbox" in path.parts:
            continue
        if path.parent.name == "spool" or path.name == "spool.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.state\s*=[^=]", line):
                setters.append(f"{path.relative_to(root)}:{n}")
    assert setters == []


def test_inflight_counts_each_job_once_and_knows_when_it_is_idle() -> None:
    jobs = InFlight()
    jobs.started("a")
    jobs.started("b")
    jobs.started("a")
    assert jobs.count() == 2 and "a" in jobs and not jobs.idle.is_set()
    jobs.finished("a", "done")
    jobs.forget("b", left_behind=True)
    assert jobs.count() == 0 and jobs.idle.is_set()
    assert jobs.left_count() == 1 and dict(jobs.outcomes) == {"done": 1, "failed": 0}
    jobs.started("b")
    jobs.finished("b", "failed")  # resumed and finished: no longer left behind
    assert jobs.left_count() == 0 and dict(jobs.outcomes) == {"done": 1, "failed": 1}


# -- one conversation for the daemon and for submit ----------------------------------------

#: What the conversation says about an upload whose answer was lost.
_SEND_EVENTS = ("upload_answer_lost", "upload_not_found", "upload_adopted")


async def test_a_lost_upload_answer_takes_the_same_path_in_submit_as_in_the_daemon(
        tmp_path: Path, start_sandbox: StartSandbox, sandbox_settings: SandboxSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox = await start_sandbox(sandbox_settings)
    faults = sandbox.state.faults
    faults.lost_answer_rate, faults.operations = 1.0, frozenset({"upload"})
    for name in list(os.environ):
        if name == "IPQS_API_KEY" or name.startswith("IPQS_BULKD_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr("daemon.cli.configure", lambda *args, **kwargs: None)
    # Whoever looks a lost upload up must do it through the conversation.
    lookups: list[tuple[str, int | None]] = []
    real_lookup = Conversation.lookup

    async def lookup(self: Conversation, job: Job) -> CsvJob | None:
        found = await real_lookup(self, job)
        lookups.append((job.source, None if found is None else found.id))
        return found

    monkeypatch.setattr(Conversation, "lookup", lookup)
    root = tmp_path / "spool"
    config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
    by_daemon, by_submit = emails(5, "daemon"), emails(5, "submit")

    drop(root, "email", "daemon.csv", by_daemon)
    with structlog.testing.capture_logs() as daemon_logs:
        assert await run_once(config) == 0
    mine = tmp_path / "submit.csv"
    mine.write_bytes(by_submit)
    path = write_config_file(tmp_path / "config.toml", config)
    with structlog.testing.capture_logs() as submit_logs:
        code = await asyncio.to_thread(
            main, ["submit", str(mine), "--type", "email", "--config", str(path)])
    assert code == 0

    uploads = {str(u["sha256"]): u["id"] for u in sandbox.uploads()}
    assert [u["sha256"] for u in sandbox.uploads()] == [sha256(by_daemon), sha256(by_submit)]
    assert lookups == [("daemon.csv", uploads[sha256(by_daemon)]),
                       ("submit.csv", uploads[sha256(by_submit)])]
    assert records(root, "done")["daemon.csv"]["id"] == uploads[sha256(by_daemon)]

    def path_of(logs: list[dict[str, object]]) -> list[object]:
        return [e["event"] for e in logs if e["event"] in _SEND_EVENTS]

    assert path_of(daemon_logs) == path_of(submit_logs) == ["upload_answer_lost",
                                                              "upload_adopted"]
    assert sandbox.state.stats.faults["lost_answer"] == 2


def test_the_states_are_the_ones_job_json_holds() -> None:
    # spool (below the job layer) writes some states itself; the names must never drift.
    from daemon import spool
    assert {s.value for s in JobState} == {spool.CLAIMED, spool.UPLOADING, spool.SUBMITTED,
                                           spool.FETCHED, spool.FINISHING, spool.RETURNING}
