"""What an IPQS answer means for a job that is paid for: a status refusal that is a soft
failure or a definitive "unknown id", results that are not ready yet, and a results file
whose row count puts it in doubt. Pure: no I/O."""

from __future__ import annotations

from daemon.api import CsvJob, ResultFile
from daemon.errors import RejectedError, TransientError
from daemon.spool import Job

#: Words of a status refusal that say IPQS does not know the id (lower-case). Any other
#: refusal of a status call ("An internal error occurred.") is a soft failure.
UNKNOWN_ID_HINTS = ("invalid csv id", "invalid id", "unknown id", "not found",
                    "does not exist")
#: The result set that holds every row: never empty while others have rows.
ALL_ROWS_SET = "all"


class ResultsNotReady(TransientError):
    """IPQS finished the job, but its results cannot be fetched yet (no links, a link
    refused even when fresh): ask the status again later, until the deadline."""

    def __init__(self, message: str) -> None:
        super().__init__(message, cause="results")


class UnknownJob(RejectedError):
    """A status call said IPQS does not know the job's id (once: it may be a glitch)."""


def unknown_id(exc: RejectedError) -> bool:
    """Whether a refused status call says the id is unknown (not a soft failure)."""
    return any(hint in exc.message.lower() for hint in UNKNOWN_ID_HINTS)


def links_ready(answer: CsvJob, sets: tuple[str, ...], job: Job) -> None:
    """Raise :class:`ResultsNotReady` unless a FINISHED answer says where results are.

    A missing or malformed ``downloads`` (or one that leaves a configured set out) is an
    incomplete answer. An explicit null is an empty set only once IPQS has published its
    results: some set has a link, and the ``all`` set (every row) is not the null one;
    or when the input has no data rows at all (a header alone), so every set is empty.
    """
    links = answer.downloads
    if not answer.links_complete_for(sets):
        raise ResultsNotReady(f"IPQS says job {answer.id} is {answer.status} but its "
                              "answer has no complete downloads object yet")
    if _no_data_rows(job):
        return
    if not any(links.values()):
        raise ResultsNotReady(f"IPQS says job {answer.id} is {answer.status} but gives no "
                              "download link yet")
    if ALL_ROWS_SET in links and links[ALL_ROWS_SET] is None:
        raise ResultsNotReady(f"job {answer.id}: some result sets have links but the "
                              f"'{ALL_ROWS_SET}' set has none yet")


def _no_data_rows(job: Job) -> bool:
    """Whether the input may hold nothing but a header row (every result set empty)."""
    return job.rows is not None and (job.rows == 0
                                     or (job.rows == 1 and job.header_row is not False))


def rows_in_doubt(job: Job, name: str, saved: ResultFile) -> str | None:
    """What makes a saved set inconsistent with the input (None when nothing does): the
    ``all`` set holds a row per input row, the input's header row (if any) not counted."""
    if name != ALL_ROWS_SET or job.rows is None:
        return None
    expected = {None: {job.rows, job.rows - 1}, True: {job.rows - 1}, False: {job.rows}}
    if saved.data_rows in expected[job.header_row]:
        return None
    return f"{saved.data_rows} rows for an input of {job.rows}"
