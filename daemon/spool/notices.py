"""Hook notices: ``hooks/<job>.json``, one per finished file whose ``on_finish`` hook has
not yet exited 0.

A notice is written before the file is moved to done/ or failed/ (by :meth:`Spool.finish`,
under the name the move will use) and removed only after the hook succeeded. So a crash or
``kill -9`` anywhere between the move and the hook's success leaves the notice, and the next
start runs the hook: at least once. A notice also keeps the attempts made so far and the
last error, which is how ``status`` shows failing hooks without asking the daemon.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.spool.fs import atomic_write, read_json
from daemon.spool.layout import Layout


@dataclass
class Notice:
    """A finished file whose hook is still owed."""

    job: str
    type: str
    outcome: str
    record: str  # the record's path relative to the spool root
    owner: str
    created: float
    attempts: int = 0
    last_error: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notice | None:
        try:
            return cls(job=str(data["job"]), type=str(data["type"]),
                       outcome=str(data["outcome"]), record=str(data["record"]),
                       owner=str(data.get("owner") or ""),
                       created=float(data.get("created") or 0),
                       attempts=int(data.get("attempts") or 0),
                       last_error=(None if data.get("last_error") is None
                                   else str(data["last_error"])))
        except (KeyError, TypeError, ValueError):
            return None


class Notices:
    """The hook notices of one spool. All methods block: call in a thread."""

    def __init__(self, layout: Layout, file_mode: int) -> None:
        self.layout = layout
        self.file_mode = file_mode

    def write(self, notice: Notice) -> None:
        """Write (or rewrite) a notice; on return it survives a crash."""
        self.layout.hooks.mkdir(parents=True, exist_ok=True)
        atomic_write(self.layout.notice(notice.job), json.dumps(asdict(notice)).encode(),
                     self.file_mode)

    def note(self, job: str, owner: str, *, attempts: int, error: str | None) -> None:
        """Record a failed attempt (best effort: the count only informs ``status``)."""
        notice = self.load(job)
        if notice is not None:
            notice.owner, notice.attempts, notice.last_error = owner, attempts, error
            with contextlib.suppress(OSError):
                self.write(notice)

    def load(self, job: str) -> Notice | None:
        data = read_json(self.layout.notice(job))
        return None if data is None else Notice.from_json(data)

    def remove(self, job: str) -> None:
        self.layout.notice(job).unlink(missing_ok=True)

    def exists(self, job: str) -> bool:
        """Is a notice for ``job`` on disk?"""
        return self.layout.notice(job).exists()

    def jobs(self) -> Iterator[str]:
        """The job ids with a notice, oldest first (job ids sort by time)."""
        with contextlib.suppress(FileNotFoundError):
            names = sorted(p.name for p in self.layout.hooks.iterdir())
            yield from (n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def record_path(self, notice: Notice) -> Path:
        return self.layout.root / notice.record


def new_notice(job: str, file_type: str, outcome: str, record: str, owner: str) -> Notice:
    return Notice(job=job, type=file_type, outcome=outcome, record=record, owner=owner,
                  created=time.time())
