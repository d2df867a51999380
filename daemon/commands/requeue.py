"""``ipqs-bulkd retry``: put failed files back into their inbox.

For each file in ``failed/<type>/``, in this order (a crash in between leaves nothing lost,
and running the command again completes it):

1. the record ``<name>.json`` and any result files it names move to
   ``history/<type>/<name>.<UTC time>.json`` and ``...<UTC time>.<set>.csv``;
2. with ``--force``, the duplicate marker ``markers/<sha256>`` is removed, before the file
   can be seen by the daemon;
3. the file is linked into ``inbox/<type>/`` under its original name (or ``stem-1.ext``...
   when that is taken) and unlinked from failed/. Nothing in the inbox is ever replaced.

With ``--results-only``, step 3 differs: a file whose record has an IPQS id goes back into
``processing/`` as a submitted job (:mod:`daemon.spool.refetch`, before step 1), so the
daemon fetches its results and files it in done/ without uploading it again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import clocks
from daemon.commands.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Console,
    exit_help,
)
from daemon.config import Config
from daemon.shown import shown
from daemon.spool import Layout, place_no_clobber
from daemon.spool.refetch import refetch, refetchable

INVALID_INPUT = "invalid-input"

DESCRIPTION = """\
Move failed files from failed/<type>/ back into inbox/<type>/, so the daemon tries them
again. Their record (<name>.json) and any result files are kept, with a time stamp, in
history/<type>/. A name already in the inbox is never replaced: the file gets a free name
(name-1.csv, ...).

Content that IPQS already took (and was paid for) keeps its duplicate marker, so within
upload.duplicate_window_hours the daemon would fail it again as a duplicate; the command
says so. --force removes the marker, and the content is sent (and paid for) again.

--results-only is for files IPQS already took (their record has an IPQS id), typically
reason results-unavailable or timeout: nothing is uploaded; the file goes back into
processing/ as a submitted job, and the daemon (running, or the next `run --once`) asks
IPQS for its status and results again, with a fresh poll.deadline_hours, and files it in
done/.
"""

EPILOG = f"""\
FILE is a path under failed/<type>/ (its record path works too) or just a file name,
looked up in failed/<type>/ of every configured type (or of --type).

examples:
  ipqs-bulkd retry /var/lib/ipqs-bulkd/failed/email/list.csv
  ipqs-bulkd retry list.csv --type email
  ipqs-bulkd retry --all-failed --type phone
  ipqs-bulkd retry list.csv --force
  ipqs-bulkd retry --results-only list.csv

{exit_help(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED,
           meanings={EXIT_OK: "put back", EXIT_FAILED: "a file could not be moved (permissions,"
                     " a full disk)", EXIT_NOT_FOUND: "not found: a named file is not in "
                     "failed/"})}"""


def add_parser(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = commands.add_parser(
        "retry", help="move failed files back into their inbox",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", metavar="FILE", help="failed files to put back")
    p.add_argument("--all-failed", action="store_true",
                   help="put back every failed file (of --type, if given), but not those "
                        "refused as invalid-input (they would fail again) unless --force")
    p.add_argument("--type", metavar="TYPE", help="only look in failed/TYPE/")
    p.add_argument("--force", action="store_true",
                   help="also remove the duplicate markers, so content IPQS already took is "
                        "sent (and paid for) again; with --all-failed, put back invalid-input "
                        "files too")
    p.add_argument("--results-only", action="store_true",
                   help="fetch the results of jobs IPQS already has (a record with an IPQS "
                        "id) again, without uploading")
    add_config(p)


@dataclass(frozen=True)
class Failed:
    """One file in failed/<type>/."""

    type: str
    folder: Path
    name: str

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def record_path(self) -> Path:
        return self.folder / f"{self.name}.json"


def run(ns: argparse.Namespace, config: Config, console: Console) -> int:
    if bool(ns.files) == bool(ns.all_failed):
        raise CommandError(EXIT_USAGE, "name the failed FILEs to put back, or give "
                                       "--all-failed (not both)")
    types = config.spool.types
    if ns.type is not None and ns.type not in types:
        raise CommandError(EXIT_USAGE, f"--type {ns.type}: not in spool.types "
                                       f"({', '.join(types)})")
    if ns.results_only and ns.force:
        raise CommandError(EXIT_USAGE, "--results-only never uploads; it cannot be combined "
                                       "with --force")
    requeue = Requeue(config, console, force=ns.force)
    wanted = (ns.type,) if ns.type else types
    if ns.all_failed:
        targets = [f for t in wanted for f in _all_failed(requeue.layout, t)]
        if not targets:
            console.line("nothing to retry: no failed files")
        targets = _unless_invalid(targets, console, force=ns.force)
        missing = 0
    else:
        targets, missing = _resolve_all(requeue.layout, wanted, ns.files, console)
    if ns.results_only:
        fetched = sum(requeue.fetch_again(target) for target in targets)
        console.line(f"{fetched} file(s) back in processing/: the daemon fetches their "
                     "results without uploading")
        return EXIT_NOT_FOUND if missing or fetched < len(targets) else EXIT_OK
    for target in targets:
        requeue.move_back(target)
    console.line(f"{len(targets)} file(s) put back into their inbox")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def _all_failed(layout: Layout, file_type: str) -> list[Failed]:
    folder = layout.failed(file_type)
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return []
    present = set(names)
    return [Failed(file_type, folder, n[:-5]) for n in names
            if n.endswith(".json") and not n.startswith(".") and n[:-5] in present]


def _unless_invalid(targets: list[Failed], console: Console, *, force: bool) -> list[Failed]:
    """``--all-failed`` leaves out files refused as invalid input (they would fail again,
    unchanged) unless ``--force``; says how many."""
    if force:
        return targets
    kept = [f for f in targets if _read_json(f.record_path).get("reason") != INVALID_INPUT]
    skipped = len(targets) - len(kept)
    if skipped:
        console.line(f"skipped {skipped} {INVALID_INPUT} file(s): unchanged they fail again; "
                     "fix and drop them again, name them, or give --force")
    return kept


def _resolve_all(layout: Layout, types: tuple[str, ...], args: list[str],
                 console: Console) -> tuple[list[Failed], int]:
    found: list[Failed] = []
    missing = 0
    for arg in args:
        target = _resolve(layout, types, arg)
        if target is None:
            console.error(f"{shown(arg)}: not found in failed/<type>/ "
                          f"({', '.join(shown(layout.failed(t)) for t in types)})")
            missing += 1
        elif target not in found:
            found.append(target)
    return found, missing


def _resolve(layout: Layout, types: tuple[str, ...], arg: str) -> Failed | None:
    """The failed file ``arg`` names: a path under failed/<type>/, or a bare name."""
    path = Path(arg)
    if path.parent != Path("."):
        parent = path.parent.resolve()
        folders = {layout.failed(t).resolve(): t for t in types}
        if parent not in folders:
            return None
        candidates = [Failed(folders[parent], layout.failed(folders[parent]), path.name)]
    else:
        candidates = [Failed(t, layout.failed(t), path.name) for t in types]
    found = [c for f in candidates if (c := _input_of(f)) is not None]
    if len(found) > 1:
        raise CommandError(EXIT_USAGE, f"{shown(arg)}: in more than one failed/ folder "
                                       f"({', '.join(f.type for f in found)}); give --type")
    return found[0] if found else None


def _input_of(candidate: Failed) -> Failed | None:
    """The failed input a name means: the file itself, or the input of a named record."""
    name = candidate.name
    if name.endswith(".json") and os.path.isfile(candidate.folder / name[:-5]) and \
            not os.path.exists(candidate.folder / f"{name}.json"):
        return Failed(candidate.type, candidate.folder, name[:-5])
    if os.path.isfile(candidate.path) and not os.path.islink(candidate.path):
        return candidate
    return None


class Requeue:
    """Moves failed files back, keeping their history (see the module docstring)."""

    def __init__(self, config: Config, console: Console, *, force: bool) -> None:
        self.layout = Layout(config.spool.root)
        self.root = self.layout.root
        self.window = config.upload.duplicate_window_hours * 3600
        self.file_mode = config.spool.file_mode
        self.console = console
        self.force = force

    def move_back(self, failed: Failed) -> None:
        inbox = self.layout.inbox(failed.type)
        inbox.mkdir(parents=True, exist_ok=True)
        record = _read_json(failed.record_path)
        kept = self._keep_history(failed, record)
        marker = self._marker(record)
        source = record.get("source")
        wanted = Path(source).name if isinstance(source, str) and source else failed.name
        placed = place_no_clobber(failed.path, inbox, wanted)
        where = placed.relative_to(self.root)
        self.console.line(f"{failed.type}/{shown(failed.name)}: back in {shown(where)}"
                          + (f"; old record kept as {shown(kept.relative_to(self.root))}"
                             if kept else "; it had no record"))
        if marker:
            self.console.line(f"  {marker}")

    def fetch_again(self, failed: Failed) -> bool:
        """Put a failed job IPQS holds back into processing/ as submitted; False (with a
        line saying why) when its record has no IPQS id."""
        record = _read_json(failed.record_path)
        why = refetchable(record)
        if why is not None:
            self.console.error(f"{failed.type}/{shown(failed.name)}: not fetched again: {why}")
            return False
        job = refetch(self.layout, failed.path, record, self.file_mode)
        kept = self._keep_history(failed, record)
        failed.path.unlink(missing_ok=True)
        self.console.line(f"{failed.type}/{shown(failed.name)}: IPQS job {job.id} back in "
                          f"processing/{job.job}, to fetch its results"
                          + (f"; old record kept as {shown(kept.relative_to(self.root))}"
                             if kept else ""))
        return True

    def _keep_history(self, failed: Failed, record: dict[str, Any]) -> Path | None:
        if not os.path.lexists(failed.record_path):
            return None
        history = self.layout.history(failed.type)
        history.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # Retried twice within a second: the second gets <stamp>-1, and so on.
        tag = next(t for t in (stamp, *(f"{stamp}-{n}" for n in range(1, 10000)))
                   if not os.path.lexists(history / f"{failed.name}.{t}.json"))
        results = record.get("results") if isinstance(record.get("results"), dict) else {}
        for result_set, file_name in (results or {}).items():
            src = failed.folder / str(file_name)
            if isinstance(file_name, str) and os.path.lexists(src) and "/" not in file_name:
                place_no_clobber(src, history, f"{failed.name}.{tag}.{result_set}.csv")
        return place_no_clobber(failed.record_path, history, f"{failed.name}.{tag}.json")

    def _marker(self, record: dict[str, Any]) -> str | None:
        """Deal with the content's duplicate marker; a line to say what happened, if any."""
        sha = record.get("sha256")
        if not isinstance(sha, str) or not sha.isalnum():
            return None
        path = self.layout.marker(sha)
        marker = _read_json(path)
        if not marker:
            return None
        if self.force:
            path.unlink(missing_ok=True)
            return (f"duplicate marker for job {shown(marker.get('job'))} removed (--force): the "
                    "content will be sent, and paid for, again")
        # Judged as the daemon judges it: by the boot-time clock within one boot.
        age = clocks.age(marker, mtime=_mtime(path))
        if self.window <= 0 or age >= self.window:
            return None
        return (f"note: IPQS already took this content as job {shown(marker.get('job'))} "
                f"(IPQS id {shown(marker.get('id'))}) {age / 3600:.1f} h ago, so within "
                "upload.duplicate_window_hours the daemon fails it again as a duplicate; "
                "to send (and pay for) it again, retry it with --force")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
