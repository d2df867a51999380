"""``ipqs-bulkd submit``: one file (or URL) to IPQS by hand, without the daemon.

It follows the daemon's rules: the same client and retry policy; the same duplicate guard
(a marker in the configured spool's ``markers/``, so the daemon and ``submit`` never both
pay for the same content); and the daemon's own conversation with IPQS
(:mod:`daemon.job.conversation`), so an upload whose answer was lost is looked up by its
unique ``file_name`` with the daemon's lookup policy before it is ever sent again.

It takes part in the spool's protocol like a daemon: it holds a lease (a heartbeat in
``processing/.owners/``) while it runs, so nobody takes its marker for stale, and it says
in the marker that its upload may go out before the POST. Interrupted or left without an
answer, it leaves the marker *unresolved*: the daemon, or the next ``submit`` of the same
content, looks the upload up at IPQS before anything is sent again
(:mod:`daemon.job.duplicates`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from daemon import ALL_TYPES
from daemon.api import CsvJob, make_client
from daemon.commands import money
from daemon.commands.common import (
    DEFAULT_TIMEOUT,
    EXIT_FAILED,
    EXIT_HELP,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Console,
    Patience,
    failure,
    positive_float,
    require_key,
    retry_note,
)
from daemon.commands.fetch import check_out, follow_job, report_results, save_results
from daemon.commands.guard import DuplicateGuard
from daemon.commands.progress import Reporter, reporter_for
from daemon.config import Config
from daemon.errors import (
    IpqsError,
    LostAnswerError,
    RejectedError,
)
from daemon.inputs import URL_SUFFIX, json_rows, url_of, url_problem
from daemon.job.conversation import Conversation, Hooks
from daemon.job.money import Purse
from daemon.job.state import JobState
from daemon.shown import shown
from daemon.spool import Job, inspect_file, new_job_id, upload_name

# After this many uploads whose answers were lost (and which a lookup then did not find),
# give up rather than keep sending.
MAX_SENDS = 3

DESCRIPTION = """\
Send one CSV file (or a URL) to IPQS now, without the daemon, and optionally wait for the
results. It reads the same config as the daemon (api.*, upload.*, poll.*, results.sets) and
uses the same duplicate guard: content already taken by the daemon or by an earlier submit
within upload.duplicate_window_hours is not sent again (exit status 5).

On a terminal it shows a progress bar for the upload and then the job's status; off a
terminal, plain lines. Progress goes to stderr; the result (job id, result files) to stdout.
"""

EPILOG = f"""\
examples:
  ipqs-bulkd submit emails.csv --type email
  ipqs-bulkd submit emails.csv --type email --wait --out results/
  ipqs-bulkd submit --url https://example.com/list.csv --type email --wait
  ipqs-bulkd submit small.csv --type phone --json

A file named *.url holds one URL and is sent by URL, as in the inbox.

{EXIT_HELP}"""


def add_parser(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = commands.add_parser(
        "submit", help="send one file to IPQS now, without the daemon",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, metavar="FILE",
                   help="the CSV file to send (leave out with --url); any number with "
                        "--dry-run")
    p.add_argument("--type", required=True, choices=ALL_TYPES, metavar="TYPE",
                   help=f"what the file holds: {', '.join(ALL_TYPES)}")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--url", metavar="URL",
                     help="let IPQS fetch the file from this http, https or ftp URL instead")
    how.add_argument("--json", action="store_true",
                     help="send the rows in a JSON body instead of a multipart file upload "
                          "(small files only)")
    p.add_argument("--wait", action="store_true",
                   help="wait until IPQS has finished the job, then download the result sets "
                        "named in results.sets")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="with --wait (required): where to put the results, as "
                        "FILE.<set>.csv (default: the current folder; existing files are "
                        "never replaced)")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help="keep retrying while IPQS is unreachable or answers with temporary "
                        f"errors for this long, then give up with status 4 "
                        f"(default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--dry-run", action="store_true",
                   help="only check each FILE: count its rows and show the credits and "
                        "today's budget left (budget.*); nothing is sent")
    p.add_argument("--no-duplicate-check", action="store_true",
                   help="send even if the same content was taken recently, and do not record "
                        "it (also the way out when the spool root is not writable)")
    add_config(p)


@dataclass(frozen=True)
class Payload:
    """What goes to IPQS, and how."""

    method: str  # multipart | json | url
    source: str  # a name for people and for the result files
    sha256: str
    size: int
    path: Path | None = None
    url: str | None = None
    rows: int | None = None  # billed; unknown for a URL


def run(ns: argparse.Namespace, config: Config, console: Console) -> int:
    if ns.type not in config.spool.types:
        # As the daemon and retry: a type (and its price) is used only when configured.
        raise CommandError(EXIT_USAGE, f"--type {ns.type}: not in spool.types "
                                       f"({', '.join(config.spool.types)}); add it there "
                                       "to send files of this type")
    if ns.dry_run:
        return money.dry_run(ns, config, console)
    if len(ns.files) > 1:
        raise CommandError(EXIT_USAGE, "give one FILE (any number with --dry-run)")
    ns.file = ns.files[0] if ns.files else None
    if ns.out is not None and not ns.wait:
        raise CommandError(EXIT_USAGE, "--out needs --wait: without it nothing is downloaded")
    out: Path = ns.out if ns.out is not None else Path(".")
    payload = _payload(ns)  # the arguments first: a missing FILE is said before the key
    require_key(config)
    if ns.wait:
        check_out(out)
    guard = DuplicateGuard.open(config, console, enabled=not ns.no_duplicate_check)
    job_id = new_job_id()
    job = Job(job=job_id, type=ns.type, source=payload.source,
              file_name=upload_name(payload.source, job_id), method=payload.method,
              sha256=payload.sha256, bytes=payload.size, rows=payload.rows)
    submission = Submission(config, console, job, payload, guard, timeout=ns.timeout)
    return asyncio.run(submission.run(wait=ns.wait, out=out))


# -- before anything is sent ----------------------------------------------------------------


def _payload(ns: argparse.Namespace) -> Payload:
    if ns.url is not None:
        if ns.file is not None:
            raise CommandError(EXIT_USAGE, "give FILE or --url, not both")
        return _url_payload(ns.url, "--url")
    if ns.file is None:
        raise CommandError(EXIT_USAGE, "name the FILE to send (or give --url URL)")
    path: Path = ns.file
    if not path.is_file():
        what = ("is a folder: name a file in it" if path.is_dir() else
                "is not a regular file" if path.exists() else "does not exist")
        raise CommandError(EXIT_NOT_FOUND, f"{shown(path)} {what}")
    if path.name.lower().endswith(URL_SUFFIX):
        # Named and hashed as the daemon names and hashes a .url file in its inbox.
        data = path.read_bytes()
        return _url_payload(_url_in(path, data), str(path), source=path.name, data=data)
    facts = inspect_file(path)
    rows, problem = json_rows(path) if ns.json and not facts.problem else (facts.rows, None)
    if (problem := facts.problem or problem) is not None:
        raise CommandError(EXIT_FAILED, f"{shown(path)}: not sent: {problem}")
    return Payload("json" if ns.json else "multipart", path.name, facts.sha256, facts.bytes,
                   path=path, rows=rows)


def _url_payload(url: str, where: str, *, source: str | None = None,
                 data: bytes | None = None) -> Payload:
    url = url.strip()
    parts = urlsplit(url)
    if url_problem(url) is not None:
        raise CommandError(EXIT_USAGE, f"{shown(where)}: needs one http, https or ftp URL, "
                                       f"got {url!r}")
    # A bare --url hashes like a dropped `<name>.url` holding the URL and a newline.
    data = (url + "\n").encode() if data is None else data
    source = source or parts.path.rstrip("/").rsplit("/", 1)[-1] or parts.hostname or "url"
    return Payload("url", source, hashlib.sha256(data).hexdigest(), len(data), url=url)


def _url_in(path: Path, data: bytes) -> str:
    url, problem = url_of(data)
    if url is None:
        raise CommandError(EXIT_USAGE, f"{shown(path)}: {problem}")
    return url


# -- talking to IPQS ------------------------------------------------------------------------


class Submission(Hooks):
    """One submit: upload, then (with --wait) follow the job and fetch its results, all
    through the daemon's :class:`~daemon.job.conversation.Conversation`. What is left here
    is what people see: progress, messages and exit codes."""

    def __init__(self, config: Config, console: Console, job: Job, payload: Payload,
                 guard: DuplicateGuard, *, timeout: float) -> None:
        self.config = config
        self.console = console
        self.job = job
        self.payload = payload
        self.guard = guard
        self.timeout = timeout
        self.reporter: Reporter = reporter_for(console)
        self.patience = Patience(config, timeout, self._retrying)
        # True while an upload may have reached IPQS without our knowing its id.
        self.maybe_sent = False

    def _retrying(self, line: str) -> None:
        self.reporter.note(line)

    async def run(self, *, wait: bool, out: Path) -> int:
        try:
            async with make_client(self.config) as client, self.guard.lease():
                talk = Conversation(client, self.config, self.patience, hooks=self,
                                    save=self._save)
                await self._claim(talk)
                purse = Purse.for_config(self.config, client)
                # The daemon's money guards, before anything is sent.
                await money.admit(purse, self.job, refused=lambda: self.guard.release(self.job))
                answer = await self._upload(talk, purse)
                self._accepted(answer)
                if not wait:
                    return EXIT_OK
                answer = await self._follow(talk)
                saved = await self._fetch(talk, answer, out)
        finally:
            self.reporter.close()
        self._report_results(answer, saved)
        return EXIT_OK

    async def _claim(self, talk: Conversation) -> None:
        """Take the content's marker (looking up an earlier, unresolved upload of it)."""
        try:
            await self.guard.claim(self.job, talk)
        except IpqsError as exc:
            raise failure(exc, f"{self.payload.source} not sent: looking up an earlier "
                               "upload of the same content", self.timeout) from None

    async def _upload(self, talk: Conversation, purse: Purse) -> CsvJob:
        payload = self.payload
        try:
            # Jobs at or below the newest id existed before ours: lookups page no further.
            await talk.learn_newest_id()
            answer = await talk.send(self.job, path=payload.path, url=payload.url,
                                     check=self._unchanged, max_sends=MAX_SENDS)
        except RejectedError as exc:
            # IPQS surely has no job: the refusal answered our POST, and no earlier one was
            # sent (a lost answer that no lookup found may still show up at IPQS).
            if not exc.maybe_sent and self.job.uploads <= 1:
                await self._not_sent(purse)
            raise failure(exc, f"{shown(payload.source)} not accepted", self.timeout) from None
        except CommandError as exc:  # the file changed: nothing more went
            if self.job.uploads == 0:  # nor before
                await self._not_sent(purse)
            else:  # an earlier POST whose answer was lost may yet show up at IPQS
                exc.message += (f"; an earlier upload may be at IPQS as file_name "
                                f"{shown(self.job.file_name)}, so the content stays marked "
                                "as taken")
            raise
        except IpqsError as exc:
            if not (self.maybe_sent or exc.maybe_sent or self.job.uploads > 1):
                await self._not_sent(purse)
                raise failure(exc, f"{shown(payload.source)} not sent", self.timeout) from None
            line = failure(exc, f"{shown(payload.source)}: the upload's answer was lost",
                           self.timeout)
            line.message += (f"; IPQS may have it as file_name {shown(self.job.file_name)}: "
                             "`ipqs-bulkd jobs` lists it and `ipqs-bulkd fetch ID` downloads "
                             "its results; submitting the file again (or dropping it into "
                             "the inbox) looks it up first and never pays twice")
            raise line from None  # maybe sent: its rows stay counted in the budget
        purse.accepted(self.job)
        return answer

    async def _not_sent(self, purse: Purse) -> None:
        self.guard.release(self.job)
        await purse.released(self.job)

    async def _save(self, job: Job) -> None:
        """What the conversation saves: before a POST, the marker says one may go out."""
        if job.state == JobState.UPLOADING:
            await asyncio.to_thread(self.guard.sending, job)

    async def _unchanged(self, job: Job) -> None:
        payload = self.payload
        if payload.method == "multipart" and payload.path is not None \
                and payload.path.stat().st_size != payload.size:
            # Checked before every attempt: a write aborts an upload under way, and the
            # file sent must be the file hashed for the duplicate guard.
            raise CommandError(EXIT_FAILED, f"{shown(payload.path)}: not sent: the file changed "
                                            "after it was read")

    def _accepted(self, answer: CsvJob) -> None:
        self.maybe_sent = False
        self.guard.accepted(self.job)
        self.console.line(f"submitted {shown(self.payload.source)} ({self.job.type}) as IPQS "
                          f"job {answer.id}, file_name {shown(self.job.file_name)}, status "
                          f"{shown(answer.status)}")

    async def _follow(self, talk: Conversation) -> CsvJob:
        """Poll the status until FINISHED (the daemon's intervals and deadline)."""
        return await follow_job(talk, self.job, self.config, self.timeout)

    async def _fetch(self, talk: Conversation, answer: CsvJob, out: Path) -> dict[str, Path]:
        try:
            return await save_results(talk, self.job, answer, out, self.payload.source,
                                      self.reporter)
        except IpqsError as exc:
            raise failure(exc, f"job {self.job.id}: results", self.timeout) from None

    def _report_results(self, answer: CsvJob, saved: dict[str, Path]) -> None:
        report_results(self.console, self.job, answer, saved)

    # -- what the conversation tells people ---------------------------------------------------

    def sending(self, job: Job, note: str | None) -> None:
        if note is not None:
            self.reporter.note(note)

    def upload_started(self, name: str, size: int) -> None:
        self.reporter.upload_started(name, size)

    def upload_progress(self, n_bytes: int) -> None:
        self.reporter.upload_progress(n_bytes)

    def upload_ended(self) -> None:
        self.reporter.upload_ended()

    def answer_lost(self, job: Job, exc: LostAnswerError) -> None:
        self.maybe_sent = True
        self.reporter.note(f"{retry_note('upload', exc)}; looking it up before sending again")

    def looked_up(self, job: Job, found: CsvJob | None) -> None:
        if found is None:
            self.maybe_sent = False
        else:
            self.reporter.note(f"found the upload at IPQS as job {found.id}")

    def status(self, job: Job) -> None:
        self.reporter.status(job.id, job.status)

    def note(self, text: str) -> None:
        self.reporter.note(text)
