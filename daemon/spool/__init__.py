"""The folder protocol: where a file is, and moving it on without ever losing or clobbering it.

- :mod:`~daemon.spool.fs`: file-system primitives (atomic and exclusive writes, no-clobber
  placement, fsync, reading only regular files);
- :mod:`~daemon.spool.record`: the job record and its fields;
- :mod:`~daemon.spool.layout`: where everything is under the root, and the inbox naming rule;
- :mod:`~daemon.spool.markers`: duplicate markers;
- :mod:`~daemon.spool.ledger`: rows used per UTC day, for the daily budgets;
- :mod:`~daemon.spool.leases`: owners, heartbeats and adoption between daemons;
- :mod:`~daemon.spool.daemons`: where each daemon on the spool listens (health address);
- :mod:`~daemon.spool.store`: the :class:`Spool` (claim, unclaim, finish, save and load).
"""

from daemon.inputs import FileFacts
from daemon.spool.fs import (
    NotRegularFileError,
    inspect_file,
    open_regular,
    place_no_clobber,
)
from daemon.spool.layout import OUTCOMES, OWNERS_DIR, RESULTS_DIR, Layout, is_ignored
from daemon.spool.leases import Owner
from daemon.spool.record import (
    CLAIMED,
    FETCHED,
    FINISHING,
    JOB_FILE,
    RECORD_FIELDS,
    RETURNING,
    SUBMITTED,
    UPLOADING,
    Job,
    new_job_id,
    upload_name,
    utcnow,
)
from daemon.spool.store import Spool

__all__ = [
    "CLAIMED", "FETCHED", "FINISHING", "JOB_FILE", "OUTCOMES", "OWNERS_DIR", "RECORD_FIELDS",
    "RESULTS_DIR", "RETURNING", "SUBMITTED", "UPLOADING", "FileFacts", "Job", "Layout",
    "NotRegularFileError", "Owner", "Spool", "inspect_file",
    "is_ignored", "new_job_id", "open_regular", "place_no_clobber", "upload_name", "utcnow",
]
