"""A job's lifecycle: its states and the transitions between them, in one table.

Each state is saved before the side effect that follows it (design.md), so after a crash
the state on disk says what may already have happened. :func:`advance` is the one place a
job's state changes; a transition the table does not allow is a bug, raised loudly as
:class:`IllegalTransition` (never an :class:`~daemon.errors.IpqsError`, so nothing treats
it as trouble with IPQS).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from daemon.spool import Job


class JobState(enum.StrEnum):
    """The states of a job, in order (the values are what job.json holds)."""

    CLAIMED = "claimed"      # input renamed into processing/; nothing sent yet
    UPLOADING = "uploading"  # an upload may be under way: never resend without a lookup
    SUBMITTED = "submitted"  # IPQS accepted it: ``id`` is known
    FETCHED = "fetched"      # results are in processing/<job>/results/
    FINISHING = "finishing"  # being moved to done/ or failed/ under ``final_name``
    RETURNING = "returning"  # going back to its inbox (nothing was sent): never upload it


S = JobState

#: Every allowed transition: from a state (as saved) to the states it may be saved as next.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    # Upload; refused before sending (invalid input, duplicate); nothing sent (paused, stop).
    S.CLAIMED: frozenset({S.UPLOADING, S.FINISHING, S.RETURNING}),
    # Another POST after a lookup said "absent"; accepted; refused; the account refused it
    # (which creates nothing at IPQS).
    S.UPLOADING: frozenset({S.UPLOADING, S.SUBMITTED, S.FINISHING, S.RETURNING}),
    # Results fetched; aborted, timed out or refused; saved without its id by a crash
    # (then it is looked up, as an upload whose answer was lost).
    S.SUBMITTED: frozenset({S.FETCHED, S.FINISHING, S.UPLOADING}),
    S.FETCHED: frozenset({S.FINISHING}),
    # A clash with another writer's name, or a finish resumed after a crash.
    S.FINISHING: frozenset({S.FINISHING}),
    # Resumed after a crash half-way back to the inbox.
    S.RETURNING: frozenset({S.RETURNING}),
}


class IllegalTransition(AssertionError):
    """A job was about to be saved in a state its current state cannot lead to: a bug."""


def state_of(job: Job) -> JobState:
    """The job's state as a :class:`JobState` (a record read from disk holds a string)."""
    try:
        return JobState(job.state)
    except ValueError:
        raise IllegalTransition(f"job {job.job} has an unknown state {job.state!r}") from None


def allowed(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]


def advance(job: Job, new: JobState) -> None:
    """Move the job to ``new`` (in memory; the caller saves it before the side effect it
    guards). Raises :class:`IllegalTransition` if the table does not allow it."""
    old = state_of(job)
    if not allowed(old, new):
        raise IllegalTransition(f"job {job.job}: {old} -> {new} is not an allowed transition")
    job.state = new
