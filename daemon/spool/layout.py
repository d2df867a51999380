"""Where things are under the spool root, and which inbox names are never submissions.

Layout under the spool root::

    inbox/<type>/<name>              drop zone
    processing/<job>/job.json        the job's state, always written before the step it guards
    processing/<job>/<name>          the input, renamed in at claim time
    processing/<job>/results/<set>   downloaded result sets
    processing/.owners/<owner>       one heartbeat file per running daemon (leases)
    .daemon/<host>-<pid>-<token>.json  where each running daemon's health listener is
    markers/<sha256>                 duplicate markers, made by exclusive create
    budget/<YYYY-MM-DD>/<n>          rows reserved per UTC day (:mod:`~daemon.spool.ledger`)
    done/<type>/<name>, <name>.json, <name>.<set>.csv
    failed/<type>/<name>, <name>.json
    history/<type>/<name>.<stamp>.json   records of retried files (``retry``)
    hooks/<job>.json                 a finished file whose ``on_finish`` hook has yet to
                                     succeed (:mod:`~daemon.spool.notices`)
    orphans/<type>/<file_name>.<id>.json IPQS jobs this daemon paid for but no longer owned

Commands and stages ask a :class:`Layout` for these paths instead of joining them by hand.
"""

from __future__ import annotations

from pathlib import Path

from daemon.spool.record import Job

RESULTS_DIR = "results"
OWNERS_DIR = ".owners"
DAEMONS_DIR = ".daemon"
OUTCOMES = ("done", "failed")

_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")


def is_ignored(name: str) -> bool:
    """Whether an inbox entry called ``name`` is never a submission.

    Hidden names (rsync and many editors write ``.name.XXXX`` then rename) and the usual
    temporary suffixes. Suffixes match in any case: a ``.TMP`` from a Windows tool is just
    as unfinished, and skipping a file is cheaper than uploading half of one. ``~$name``
    is the lock file Office keeps beside a document it has open (often on a Samba share).
    """
    return name.startswith((".", "~$")) or name.lower().endswith(_IGNORED_SUFFIXES)


class Layout:
    """The paths of one spool root. Pure: nothing here touches the disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processing = root / "processing"
        self.markers = root / "markers"
        self.budget = root / "budget"
        self.owners = self.processing / OWNERS_DIR
        self.hooks = root / "hooks"
        self.daemons = root / DAEMONS_DIR

    def inbox(self, file_type: str) -> Path:
        return self.root / "inbox" / file_type

    def outcome_dir(self, outcome: str, file_type: str) -> Path:
        """``done/<type>`` or ``failed/<type>``."""
        return self.root / outcome / file_type

    def done(self, file_type: str) -> Path:
        return self.outcome_dir("done", file_type)

    def failed(self, file_type: str) -> Path:
        return self.outcome_dir("failed", file_type)

    def history(self, file_type: str) -> Path:
        return self.root / "history" / file_type

    def notice(self, job_id: str) -> Path:
        """The pending hook notice of a finished job."""
        return self.hooks / f"{job_id}.json"

    def orphans(self, file_type: str) -> Path:
        return self.root / "orphans" / file_type

    def marker(self, sha256: str) -> Path:
        return self.markers / sha256

    def job_dir(self, job: Job) -> Path:
        return self.processing / job.job

    def input_path(self, job: Job) -> Path:
        return self.job_dir(job) / job.source

    def results_dir(self, job: Job) -> Path:
        return self.job_dir(job) / RESULTS_DIR
