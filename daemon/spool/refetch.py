"""Putting a failed job that IPQS holds back into processing/, to fetch its results again
without uploading (``ipqs-bulkd retry --results-only``).

The job is rebuilt from its public record as ``submitted`` with its IPQS id, so a daemon
resumes it as it would after a restart: it asks the status, fetches the results, and moves
the file to done/. Nothing is ever sent again: a job with an id is only ever followed.

Order, so that a crash leaves nothing lost and nothing the daemon could mistake:

1. the job folder is built under a hidden name (``processing/.refetch-<job>``, which the
   daemon skips): the record first, then the input linked in from failed/;
2. the folder is renamed to ``processing/<job>``: from here on a daemon may take it;
3. the caller moves the old record to history/ and unlinks the input from failed/.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from daemon.spool.fs import fsync_dir
from daemon.spool.layout import Layout
from daemon.spool.record import JOB_FILE, SUBMITTED, Job, new_job_id, utcnow, write_record

#: Record fields carried over into the rebuilt job.
_KEPT = ("id", "type", "source", "file_name", "sha256", "bytes", "rows", "method", "status",
         "invalid_records", "submitted_at")


def refetchable(record: dict[str, Any]) -> str | None:
    """Why this failed record cannot be fetched again (None when it can)."""
    if not isinstance(record.get("id"), int) or isinstance(record.get("id"), bool):
        return "its record has no IPQS id: IPQS never accepted it, so there is nothing to fetch"
    for name in ("type", "source", "file_name", "method"):
        if not isinstance(record.get(name), str) or not record[name]:
            return f"its record has no {name}"
    if "/" in record["source"] or record["source"] in (".", ".."):
        return "its record's source is not a plain file name"
    return None


def refetch(layout: Layout, failed_input: Path, record: dict[str, Any], file_mode: int) -> Job:
    """Build ``processing/<job>`` for the failed file, as ``submitted`` (steps 1 and 2 of
    the module docstring). Blocking: call in a thread."""
    fields = {k: record[k] for k in _KEPT if k in record}
    name = record.get("job")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") \
            or os.path.lexists(layout.processing / name):
        name = new_job_id()
    job = Job(job=name, state=SUBMITTED, followed_since=utcnow(), **fields)
    hidden = layout.processing / f".refetch-{name}"
    hidden.mkdir(parents=True)
    try:
        write_record(hidden / JOB_FILE, job, file_mode)
        os.link(failed_input, hidden / job.source, follow_symlinks=False)
        fsync_dir(hidden)
        os.rename(hidden, layout.job_dir(job))
    except BaseException:
        with contextlib.suppress(OSError):
            for leftover in hidden.iterdir():
                leftover.unlink()
            hidden.rmdir()
        raise
    fsync_dir(layout.processing)
    return job
