"""``ipqs-bulkd fetch ID``: download the results of a job IPQS already has, paying nothing.

The way forward when ``submit --wait`` was interrupted after IPQS accepted the file, or
when ``submit`` says the content was already taken: the job's status is followed with the
daemon's intervals until FINISHED, and the sets named in ``results.sets`` are downloaded
through the daemon's own conversation (:meth:`~daemon.job.conversation.Conversation.fetch`).
``submit --wait`` saves its results with the same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.api import CsvJob, make_client
from daemon.commands.common import (
    DEFAULT_TIMEOUT,
    EXIT_ACCOUNT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CommandError,
    Console,
    Patience,
    exit_help,
    failure,
    human_bytes,
    positive_float,
    require_key,
)
from daemon.commands.progress import Reporter, reporter_for
from daemon.config import Config
from daemon.errors import IpqsError
from daemon.job.conversation import Conversation, Hooks, Verdict
from daemon.shown import shown
from daemon.spool import Job, place_no_clobber

DESCRIPTION = """\
Download the results of a bulk CSV job that IPQS already has, by its IPQS id: nothing is
uploaded and nothing is paid again. Waits until IPQS has finished the job (checking its
status at the daemon's poll intervals), then saves each set named in results.sets as
NAME.<set>.csv in --out. Use it after Ctrl-C during `submit --wait`, or when submit says
the same content was already sent.
"""

EPILOG = f"""\
examples:
  ipqs-bulkd fetch 3868534
  ipqs-bulkd fetch 3868534 --out results/ --name emails

{exit_help(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT, EXIT_UNREACHABLE, EXIT_INTERRUPTED)}"""


def add_parser(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = commands.add_parser(
        "fetch", help="download the results of an existing IPQS job (nothing is sent)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", type=_ipqs_id, metavar="ID", help="the IPQS job id")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="where to put the results (default: the current folder; existing "
                        "files are never replaced)")
    p.add_argument("--name", metavar="NAME",
                   help="the result files' names start with this (default: the id)")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help="keep retrying while IPQS is unreachable for this long "
                        f"(default {DEFAULT_TIMEOUT:g})")
    add_config(p)


def _ipqs_id(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"an IPQS job id is a positive number, not {text!r}")
    return int(text)


def run(ns: argparse.Namespace, config: Config, console: Console) -> int:
    require_key(config)
    check_out(ns.out)
    reporter = reporter_for(console)
    name = ns.name or str(ns.id)
    job = Job(job=f"fetch-{ns.id}", type="", source=name, file_name="", method="",
              id=ns.id, state="submitted")

    async def fetch() -> int:
        try:
            async with make_client(config) as client:
                talk = Conversation(client, config, Patience(config, ns.timeout, reporter.note),
                                    hooks=_Told(reporter))
                answer = await follow_job(talk, job, config, ns.timeout)
                try:
                    saved = await save_results(talk, job, answer, ns.out, name, reporter)
                except IpqsError as exc:
                    raise failure(exc, f"job {ns.id}: results", ns.timeout) from None
        finally:
            reporter.close()
        report_results(console, job, answer, saved)
        return EXIT_OK

    return asyncio.run(fetch())


class _Told(Hooks):
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def status(self, job: Job) -> None:
        self.reporter.status(job.id, job.status)

    def note(self, text: str) -> None:
        self.reporter.note(text)


def check_out(out: Path) -> None:
    """Fail before paying, not after, when the results would have nowhere to go."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(EXIT_USAGE, f"--out {shown(out)}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CommandError(EXIT_USAGE, f"--out {shown(out)}: not writable")


async def follow_job(talk: Conversation, job: Job, config: Config, patience: float) -> CsvJob:
    """Poll the status until FINISHED (the daemon's intervals and deadline)."""
    try:
        answer, verdict = await talk.follow(job)
    except IpqsError as exc:
        raise failure(exc, f"job {job.id} status", patience) from None
    if verdict in (Verdict.ABORTED, Verdict.UNKNOWN):
        raise CommandError(EXIT_FAILED, f"job {job.id}: IPQS reported status "
                                        f"'{shown(answer.status)}' (aborted={answer.aborted})")
    if verdict is Verdict.OVERDUE:
        raise CommandError(EXIT_FAILED, f"job {job.id}: not finished within "
                                        f"{config.poll.deadline_hours:g} h "
                                        "(poll.deadline_hours)")
    return answer


async def save_results(talk: Conversation, job: Job, answer: CsvJob, out: Path, name: str,
                       reporter: Reporter) -> dict[str, Path]:
    """Download each set beside a temporary name, then place it as ``name.<set>.csv``
    without clobbering. Raises what the conversation raises."""
    saved: dict[str, Path] = {}
    temporary: dict[str, Path] = {}

    def target(result_set: str) -> Path:
        return temporary.setdefault(
            result_set, out / f".{name}.{result_set}.{secrets.token_hex(4)}.download")

    async def placed(result_set: str, tmp: Path, size: int) -> None:
        path = await asyncio.to_thread(place_no_clobber, tmp, out, f"{name}.{result_set}.csv")
        reporter.note(f"result set {result_set}: {human_bytes(size)} -> {shown(path)}")
        saved[result_set] = path

    try:
        await talk.fetch(job, answer, target, placed=placed)
    finally:
        for tmp in temporary.values():
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
    return saved


def report_results(console: Console, job: Job, answer: CsvJob, saved: dict[str, Path]) -> None:
    invalid = "-" if answer.invalid_records is None else answer.invalid_records
    console.line(f"job {job.id} {shown(answer.status)}: invalid records {invalid}")
    for result_set, path in saved.items():
        console.line(f"  {result_set}: {shown(path)}")
    if not saved:
        console.line("  no result rows in the sets named in results.sets")
