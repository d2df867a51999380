"""The job layer: the lifecycle table and the in-flight bookkeeping."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.errors import IpqsError
from daemon.job.inflight import InFlight
from daemon.job.state import TRANSITIONS, IllegalTransition, JobState, advance
from daemon.spool import Job

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
