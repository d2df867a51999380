"""The job record: a file's journey through the daemon, persisted as
``processing/<job>/job.json``, and the public record written beside a finished file."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.spool.fs import atomic_write

JOB_FILE = "job.json"

# Job states, in order. Each is saved before the side effect that follows it. The state
# field stays a plain str: a str enum of these values compares equal to them.
CLAIMED = "claimed"          # input renamed into processing/; nothing sent yet
UPLOADING = "uploading"      # an upload may be under way: never resend without a lookup
SUBMITTED = "submitted"      # IPQS accepted it: ``id`` is known
FETCHED = "fetched"          # results are in processing/<job>/results/
FINISHING = "finishing"      # being moved to done/ or failed/ under ``final_name``
RETURNING = "returning"      # going back to its inbox (nothing was sent): never upload it

# Fields of the public record (design.md), in the order they are written.
RECORD_FIELDS = ("id", "type", "source", "file_name", "sha256", "bytes", "rows", "method",
                 "status", "invalid_records", "results", "submitted_at", "finished_at")


def utcnow() -> str:
    """Now as ISO 8601 UTC, second precision."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """A job id that sorts by time: ``YYYYmmddTHHMMSS-<8 hex>``."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def upload_name(source: str, job_id: str) -> str:
    """A unique, readable ``file_name`` for IPQS: the sanitised stem plus the job's token."""
    stem = source.rsplit(".", 1)[0] if "." in source.lstrip(".") else source
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in stem)
    return f"{safe.strip('._')[:80] or 'file'}-{job_id.rsplit('-', 1)[-1]}"


@dataclass
class Job:
    """A file's journey through the daemon; persisted as processing/<job>/job.json."""

    job: str
    type: str
    source: str
    file_name: str
    method: str
    state: str = CLAIMED
    sha256: str | None = None
    bytes: int | None = None
    rows: int | None = None
    mtime_ns: int | None = None
    id: int | None = None
    status: str | None = None
    invalid_records: int | None = None
    results: dict[str, str] = field(default_factory=dict)
    claimed_at: str | None = None
    upload_started_at: str | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    floor_id: int | None = None
    uploads: int = 0
    outcome: str | None = None
    reason: str | None = None
    error: str | None = None
    final_name: str | None = None
    owner: str | None = None
    warning: str | None = None
    #: Rounds of asking for the results of a FINISHED job that did not deliver them all.
    fetch_attempts: int = 0
    #: Whether the input's first row is column names (None: unknown); for checking results.
    header_row: bool | None = None
    #: When set (by ``retry --results-only``), the deadline counts from here.
    followed_since: str | None = None
    waiting: str | None = None  # why the job waits (shown by ``status``), while it does

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def record(self) -> dict[str, Any]:
        """The public record: contract fields, plus reason/error in failed/."""
        out: dict[str, Any] = {name: getattr(self, name) for name in RECORD_FIELDS}
        for optional in ("id", "rows"):  # never accepted; a .url file's rows are unknown
            if out[optional] is None:
                del out[optional]
        out["job"] = self.job
        if self.warning:
            out["warning"] = self.warning
        if self.fetch_attempts:
            out["fetch_attempts"] = self.fetch_attempts
        if self.outcome == "failed":
            out["reason"] = self.reason
            out["error"] = self.error
        return out


def write_record(path: Path, job: Job, mode: int) -> None:
    """Write the job's state atomically; on return it survives a crash."""
    # ASCII JSON: names that are not valid UTF-8 survive as \udcXX escapes.
    data = json.dumps(dataclasses.asdict(job), indent=2).encode()
    atomic_write(path, data, mode)


def load_record(path: Path) -> Job | None:
    """The job saved at ``path``; None if it is missing or not a record."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    try:
        return Job.from_json(data) if isinstance(data, dict) else None
    except TypeError:  # a required field is missing: not a record
        return None
