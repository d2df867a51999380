"""The one conversation with IPQS about a job: send it once, follow it, fetch its results.

The money rules live here, for the daemon's stages and for ``submit`` alike:

- ``uploading`` is saved before any POST; an upload whose answer was lost is looked up
  through the list API by its unique ``file_name`` before anything is sent again, and only
  "surely absent" (two lookups, a doubling wait apart) allows a new POST;
- status is followed until FINISHED, aborted, or the deadline; a refusal of a status call
  for a job IPQS accepted is a soft failure (ask again later) unless it says the id is
  unknown;
- results are paid for, so they are never given up before the deadline: a FINISHED answer
  without links, or a link that stays refused, means "not ready yet" (:class:`ResultsNotReady`),
  and result links are one-time: a refused link is replaced through a status call.

Callers differ only in how patient they are (:class:`Caller`) and in what they tell
people or metrics along the way (:class:`Hooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from daemon import retry
from daemon.api import CsvJob, IpqsClient
from daemon.config import Config
from daemon.errors import (
    AccountError,
    IpqsError,
    LookupIncompleteError,
    LostAnswerError,
    RejectedError,
    TransientError,
)
from daemon.inputs import Inspection, read_rows
from daemon.job.state import JobState, advance
from daemon.job.verdicts import (
    ResultsNotReady,
    UnknownJob,
    links_ready,
    rows_in_doubt,
    unknown_id,
)
from daemon.spool import Job, utcnow

log = structlog.get_logger(__name__)

T = TypeVar("T")

RUNNING_STATES = ("NEW", "PROCESSING", "QUEUED", "PENDING")
FINISHED = "FINISHED"
#: The lookup wait doubles with each unanswered upload, up to this (or the configured one).
LOOKUP_WAIT_CAP_SECONDS = 3600.0


class Caller(Protocol):
    """Rides out transient trouble of one API call (the daemon: until it stops; ``submit``:
    until ``--timeout``). Only LostAnswerError may be exempted from the retries."""

    async def call(self, what: str, fn: Callable[[], Awaitable[T]], *,
                   retry_lost_answers: bool = True) -> T: ...


class Hooks:
    """What a caller hears along the way; every method does nothing unless overridden."""

    def timed(self, what: str) -> AbstractContextManager[object]:
        """Around each API request (``upload``, ``lookup``, ``status``, ``download``)."""
        return contextlib.nullcontext()

    def sending(self, job: Job, note: str | None) -> None:
        """An upload attempt starts (``note`` says what goes, for url and json)."""

    def upload_started(self, name: str, size: int) -> None: ...

    def upload_progress(self, n_bytes: int) -> None: ...

    def upload_ended(self) -> None: ...

    def sent(self, job: Job) -> None:
        """A file's bytes (multipart or json) reached IPQS and were answered."""

    def answer_lost(self, job: Job, exc: LostAnswerError) -> None: ...

    def looked_up(self, job: Job, found: CsvJob | None) -> None: ...

    def status(self, job: Job) -> None: ...

    def note(self, text: str) -> None: ...


class Verdict(enum.Enum):
    """What a status answer means for the job."""

    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    OVERDUE = "overdue"     # past poll.deadline_hours
    UNKNOWN = "unknown"     # a status IPQS has not documented


async def _no_save(job: Job) -> None:
    return None


#: Run in a worker thread before an upload's last chunk and again on its answer; raises
#: when the job is no longer the caller's to send (see ``Conversation.send``).
Fence = Callable[[Job], None]

#: Awaited once a file's facts (sha256, size, rows) were learnt from its own upload body,
#: just before the last chunk and before the fence; raising stops the body (a duplicate, a
#: file over a money limit), so IPQS gets no whole file.
Inspected = Callable[[Job], Awaitable[None]]


class NotSendable(Exception):
    """A file found, as its body went out, to be nothing IPQS can take (not UTF-8 text,
    binary, no rows): the body was stopped before its end. ``str()`` says why."""


class Orphaned(Exception):
    """IPQS accepted an upload of a job that was no longer ours: a second payment, which
    the caller must record (``answer``) rather than save over the new owner's record."""

    def __init__(self, answer: CsvJob, reason: Exception) -> None:
        super().__init__(f"IPQS job {answer.id} answered a job that is no longer ours: "
                         f"{reason}")
        self.answer = answer


class Conversation:
    """Talks to IPQS about jobs; the job's own state lives in :class:`Job`."""

    def __init__(self, client: IpqsClient, config: Config, caller: Caller, *,
                 stop: asyncio.Event | None = None, hooks: Hooks | None = None,
                 save: Callable[[Job], Awaitable[None]] = _no_save) -> None:
        self.client = client
        self.config = config
        self.caller = caller
        self.stop = stop or asyncio.Event()
        self.hooks = hooks or Hooks()
        self.save = save
        #: The newest IPQS job id seen: lookups for later uploads page back no further.
        self.newest_id: int | None = None
        #: How long a job waits after a lookup that could not finish (paging bound).
        self.incomplete_wait_seconds = LOOKUP_WAIT_CAP_SECONDS
        #: job -> monotonic time before which a lookup's "absent" is not believed.
        self._absent_not_before: dict[str, float] = {}

    def hold_lookups(self, job: Job, seconds: float) -> None:
        """Believe no "absent" for ``job`` for ``seconds``: its previous owner's body may
        still be in flight (an adopted ``uploading`` job)."""
        self._absent_not_before[job.job] = time.monotonic() + seconds

    async def learn_newest_id(self) -> None:
        """Ask IPQS for its newest job id (0 for an account without jobs: every later id
        is above it), the floor that later lookups page back to."""
        newest = await self.caller.call("lookup", self.client.newest_id)
        self.newest_id = 0 if newest is None else newest

    # -- send once ---------------------------------------------------------------------------

    async def send(self, job: Job, *, path: Path | None = None, url: str | None = None,
                   check: Callable[[Job], Awaitable[None]] | None = None,
                   slot: Callable[[], AbstractAsyncContextManager[object]] | None = None,
                   max_sends: int | None = None, fence: Fence | None = None,
                   inspected: Inspected | None = None) -> CsvJob:
        """Get the job to IPQS exactly once; returns IPQS's answer (saved as ``submitted``).

        ``check`` runs before ``uploading`` is saved and before each retried POST (and may
        raise to stop); ``slot`` is held around the save and the POST. ``fence`` runs before
        the last chunk of a file or JSON body (raising stops the body: IPQS gets no whole
        file) and on the answer (raising turns it into :class:`Orphaned`). After
        ``max_sends`` uploads whose answers were lost and which no lookup found, it gives up.

        With ``inspected``, a multipart job still ``claimed`` is read once: its body is
        hashed, checked and counted as it goes out. Before its last chunk the facts are set
        on the job, ``inspected`` is awaited (a file that is no CSV text raises
        :class:`NotSendable` instead), ``uploading`` is saved (not before the POST: until
        then no whole body can reach IPQS), then the fence runs. A body stopped there
        leaves the job as it was, ``claimed``; ``inspected`` must take its checks again
        without harm (a retried POST runs them again).
        """
        sends = 0
        while True:
            if job.state == JobState.UPLOADING:
                found = await self._lookup_sent(job)
                self.hooks.looked_up(job, found)
                if found is not None:
                    log.warning("upload_adopted", id=found.id, file_name=job.file_name)
                    return await self._accepted(job, found)
                if max_sends is not None and sends >= max_sends:
                    raise TransientError(f"the answers to {max_sends} uploads were lost",
                                         cause="dropped")
            sends += 1
            try:
                answer = await self._upload(job, path, url, check, slot, fence, inspected)
            except LostAnswerError as exc:
                log.warning("upload_answer_lost", error=str(exc))
                self.hooks.answer_lost(job, exc)
                continue
            if fence is not None:
                try:
                    await asyncio.to_thread(fence, job)
                except Exception as exc:
                    raise Orphaned(answer, exc) from exc
            return await self._accepted(job, answer)

    async def _upload(self, job: Job, path: Path | None, url: str | None,
                      check: Callable[[Job], Awaitable[None]] | None,
                      slot: Callable[[], AbstractAsyncContextManager[object]] | None,
                      fence: Fence | None = None,
                      inspected: Inspected | None = None) -> CsvJob:
        """Save ``uploading``, then POST (retrying only what surely never arrived)."""
        async with slot() if slot is not None else _nothing():
            if check is not None:
                await check(job)
            if self.newest_id is None:  # unknown (a start during an outage): learn it now,
                # or a lost answer pages back without end. A refusal (a bad key) is left
                # for the POST to meet, which the caller already handles.
                with contextlib.suppress(AccountError, RejectedError):
                    await self.learn_newest_id()
            if not _read_as_sent(job, inspected):
                await self._uploading(job)
            attempts = 0

            async def attempt() -> CsvJob:
                nonlocal attempts
                attempts += 1
                if attempts > 1 and check is not None:
                    await check(job)
                return await self._post(job, path, url, fence, inspected)

            return await self.caller.call("upload", attempt, retry_lost_answers=False)

    async def _uploading(self, job: Job) -> None:
        """Save ``uploading``: from here on a whole body may reach IPQS. Saved first, then
        taken on by ``job``: an interrupted save leaves the job as it was."""
        after = dataclasses.replace(job, upload_started_at=utcnow(), floor_id=self.newest_id,
                                    uploads=job.uploads + 1)
        advance(after, JobState.UPLOADING)
        await self.save(after)
        job.state, job.upload_started_at = after.state, after.upload_started_at
        job.floor_id, job.uploads = after.floor_id, after.uploads

    async def _settle(self, job: Job, inspection: Inspection, inspected: Inspected | None,
                      fence: Fence | None) -> None:
        """A body read whole, before its last chunk: its facts set, the caller's checks,
        ``uploading`` saved; the job's ownership checked before each step that writes."""
        if fence is not None:
            await asyncio.to_thread(fence, job)
        _learn(job, inspection)
        if inspected is not None:
            await inspected(job)
        if fence is not None:  # never save over a new owner's record
            await asyncio.to_thread(fence, job)
        await self._uploading(job)

    async def _post(self, job: Job, path: Path | None, url: str | None,
                    fence: Fence | None = None, inspected: Inspected | None = None) -> CsvJob:
        client, hooks = self.client, self.hooks
        inspection = Inspection() if _read_as_sent(job, inspected) else None
        settling: asyncio.Task[None] | None = None

        async def before_last() -> None:
            nonlocal settling
            if inspection is not None:
                # Read whole now: its facts are known, and until the last chunk goes
                # nothing of it can be a job at IPQS, so ``uploading`` is saved only now.
                # Shielded: if the body is cancelled meanwhile (an early answer, a dropped
                # connection), the checks still finish, or undo what they took.
                settling = asyncio.ensure_future(
                    self._settle(job, inspection, inspected, fence))
                settling.add_done_callback(_retrieve)
                await asyncio.shield(settling)
            if fence is not None:
                await asyncio.to_thread(fence, job)

        if job.method == "url":
            if url is None:
                assert path is not None
                url = (await asyncio.to_thread(path.read_text, "utf-8")).strip()
            hooks.sending(job, f"asking IPQS to fetch {url}")
            await before_last()  # a tiny body: fenced just before it goes
            with hooks.timed("upload"):
                return await client.upload_url(job.type, url, job.file_name)
        assert path is not None
        if job.method == "json":
            rows = await asyncio.to_thread(read_rows, path)
            hooks.sending(job, f"sending {len(rows)} rows of {job.source} as JSON")
            with hooks.timed("upload"):
                answer = await client.upload_rows(job.type, rows, job.file_name,
                                                  before_last=before_last)
        else:
            hooks.sending(job, None)
            hooks.upload_started(job.source, job.bytes or 0)
            expect = None if inspection is None else (job.bytes, job.mtime_ns)
            try:
                with hooks.timed("upload"):
                    answer = await client.upload_file(job.type, path, job.file_name,
                                                      progress=hooks.upload_progress,
                                                      before_last=before_last,
                                                      inspection=inspection, expect=expect)
            except IpqsError:
                # A body cut off while its checks ran: they end first (the next attempt
                # must not race them), and a verdict of theirs wins over the cut.
                verdict = await _outcome(settling)
                if verdict is not None:
                    raise verdict from None
                raise
            finally:
                hooks.upload_ended()
        hooks.sent(job)
        return answer

    async def _lookup_sent(self, job: Job) -> CsvJob | None:
        try:
            return await self.lookup(job)
        except IpqsError as exc:
            # An unanswered lookup (refused, or the account refused) says nothing about the
            # upload: the job may be at IPQS, so it must not go back to its inbox.
            exc.maybe_sent = True
            raise

    async def lookup(self, job: Job) -> CsvJob | None:
        """Is the job at IPQS already? Two "absent" answers, a wait apart, say no: IPQS may
        still have been working on the request we gave up on."""
        base = self.config.upload.lookup_delay_seconds
        # Each unanswered upload doubles the wait (up to an hour) before "absent" is
        # believed: a list that lags behind IPQS's jobs must not become repeated payments.
        delay = min(base * 2 ** max(job.uploads - 1, 0), max(base, LOOKUP_WAIT_CAP_SECONDS))
        find = functools.partial(self._find, job)
        check = 0
        while check < 2:
            wait = delay if check else min(delay, 1.0)
            if check:  # an adopted job's earlier owner may still be sending
                wait = max(wait, self._absent_not_before.get(job.job, 0.0) - time.monotonic())
            await self._pause(wait, "stopping before the lookup was confirmed")
            try:
                found = await self.caller.call("lookup", find)
            except LookupIncompleteError as exc:
                await self._lookup_waits(job, exc)
                check = 0  # two complete lookups, as ever, before "absent" is believed
                continue
            job.waiting = None
            if found is not None:
                return found
            check += 1
        self._absent_not_before.pop(job.job, None)
        log.info("upload_not_found", file_name=job.file_name)
        return None

    async def _lookup_waits(self, job: Job, exc: LookupIncompleteError) -> None:
        """A lookup that could not finish: the job waits (saved, so ``status`` says why),
        and the lookup is tried again after ``incomplete_wait_seconds``; never a resend."""
        hours = self.incomplete_wait_seconds / 3600
        job.waiting = (f"lookup incomplete: {exc.message}; IPQS is asked again every "
                       f"{hours:g} h and the file is not sent again meanwhile; look for "
                       f"file_name {job.file_name} at IPQS (README: Reliability)")
        log.warning("lookup_incomplete", file_name=job.file_name, error=exc.message,
                    wait=self.incomplete_wait_seconds)
        self.hooks.note(job.waiting)
        await self.save(job)
        await self._pause(self.incomplete_wait_seconds, "stopping while a lookup waits")

    async def _pause(self, seconds: float, why: str) -> None:
        await retry.stoppable_sleep(self.stop)(seconds)
        if self.stop.is_set():
            raise TransientError(why, cause="stop")

    async def _find(self, job: Job) -> CsvJob | None:
        try:
            with self.hooks.timed("lookup"):
                return await self.client.find(job.file_name, job.type, floor_id=job.floor_id)
        except RejectedError as exc:
            # A refused list call says nothing about the upload: ask again later, never
            # fail a job that may be paid for.
            raise TransientError(f"lookup of {job.file_name} refused: {exc.message}",
                                 cause="soft_failure", request_id=exc.request_id) from None

    async def _accepted(self, job: Job, answer: CsvJob) -> CsvJob:
        job.id = answer.id
        job.status = answer.status
        advance(job, JobState.SUBMITTED)
        job.submitted_at = utcnow()
        if answer.id is not None:
            self.newest_id = max(self.newest_id or 0, answer.id)
        await self.save(job)
        return answer

    # -- follow ------------------------------------------------------------------------------

    async def status(self, job: Job) -> tuple[CsvJob, Verdict]:
        """One status check (no retries: the caller decides when to look again).

        A refusal that says the id is unknown raises :class:`UnknownJob`; any other refusal
        of a job IPQS accepted is a soft failure, raised as :class:`TransientError`.
        """
        answer = await self._status(job)
        job.invalid_records = answer.invalid_records
        if answer.status != job.status:
            log.info("status_changed", id=job.id, status=answer.status)
            job.status = answer.status
            await self.save(job)  # what `ipqs-bulkd status` shows
        self.hooks.status(job)
        return answer, self._verdict(job, answer)

    async def _status(self, job: Job) -> CsvJob:
        if job.id is None:
            raise AssertionError("a job without an IPQS id cannot be followed")
        try:
            with self.hooks.timed("status"):
                return await self.client.status(job.id)
        except UnknownJob:
            raise
        except RejectedError as exc:
            if unknown_id(exc):
                raise UnknownJob(exc.message, request_id=exc.request_id) from None
            raise TransientError(f"status of job {job.id} refused: {exc.message}",
                                 cause="soft_failure", request_id=exc.request_id) from None

    def _verdict(self, job: Job, answer: CsvJob) -> Verdict:
        if answer.aborted is True:
            return Verdict.ABORTED
        if answer.status == FINISHED:
            return Verdict.FINISHED
        if self.overdue(job):
            return Verdict.OVERDUE
        if answer.status not in (*RUNNING_STATES, None):
            return Verdict.UNKNOWN
        return Verdict.RUNNING

    def overdue(self, job: Job) -> bool:
        """Past ``poll.deadline_hours`` since the upload (or since ``retry --results-only``
        asked again), whatever the job's state: the deadline runs until results are filed."""
        since = job.followed_since or job.submitted_at or job.upload_started_at
        if since is None:
            return False
        started = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
        return time.time() - started > self.config.poll.deadline_hours * 3600

    async def follow(self, job: Job) -> tuple[CsvJob, Verdict]:
        """Check the status at the daemon's growing intervals until it is not RUNNING."""
        cfg = self.config.poll
        interval = cfg.initial_seconds
        while True:
            answer, verdict = await self.caller.call("status", functools.partial(self.status,
                                                                                 job))
            if verdict is not Verdict.RUNNING:
                return answer, verdict
            await retry.stoppable_sleep(self.stop)(interval)
            if self.stop.is_set():
                raise TransientError("stopping while following the job", cause="stop")
            interval = min(interval * cfg.factor, cfg.max_seconds)

    # -- fetch -------------------------------------------------------------------------------

    async def fetch(self, job: Job, answer: CsvJob, target: Callable[[str], Path], *,
                    mode: int = 0o640,
                    placed: Callable[[str, Path, int], Awaitable[None]] | None = None,
                    ) -> CsvJob:
        """Download every configured, non-empty result set to ``target(set)``; ``placed`` is
        told of each. Results not ready yet are asked for again (a fresh status, fresh
        links) for as long as the caller is patient."""
        have: set[str] = set()
        rounds = 0

        async def one_round() -> CsvJob:
            nonlocal answer, rounds
            rounds += 1
            if rounds > 1:
                answer = await self._status(job)
            return await self.fetch_round(job, answer, target, mode=mode, placed=placed,
                                          have=have)

        return await self.caller.call("download", one_round)

    async def fetch_round(self, job: Job, answer: CsvJob, target: Callable[[str], Path], *,
                          mode: int = 0o640,
                          placed: Callable[[str, Path, int], Awaitable[None]] | None = None,
                          have: set[str] | None = None) -> CsvJob:
        """One try at every configured set not in ``have`` (which grows as sets arrive).

        Raises :class:`ResultsNotReady` when the answer publishes no links yet, or a set's
        link is refused even when fresh: the caller asks again later.
        """
        have = set() if have is None else have
        links_ready(answer, self.config.results.sets, job)
        for name in self.config.results.sets:
            if name in have:
                continue
            answer, size = await self.download(job, name, answer, target(name), mode=mode)
            have.add(name)
            if size is not None and placed is not None:
                await placed(name, target(name), size)
        return answer

    async def download(self, job: Job, name: str, answer: CsvJob, dest: Path, *,
                       mode: int = 0o640) -> tuple[CsvJob, int | None]:
        """Fetch one set (None: empty). A link that fails, or a file in doubt, is replaced
        once, at once, by asking for the status again (a link may have been used up); if
        that fails too, the results are not ready (:class:`ResultsNotReady`), and a file
        still in doubt is kept with a ``warning`` on the job."""
        for fresh in (False, True):
            if fresh:
                try:
                    answer = await self._status(job)
                except IpqsError as exc:
                    raise ResultsNotReady(f"result set {name}: no fresh link: "
                                          f"{exc.message}") from None
            link = answer.downloads.get(name)
            if link is None and fresh:
                raise ResultsNotReady(f"result set {name}: its link went in a fresh answer")
            if link is None:
                log.info("result_set_empty", set=name)
                self.hooks.note(f"result set {name}: empty")
                return answer, None
            try:
                with self.hooks.timed("download"):
                    saved = await self.client.fetch(link, dest, mode=mode)
            except IpqsError as exc:
                log.info("download_failed", set=name, error=exc.message, fresh_link=fresh)
                if fresh:
                    raise ResultsNotReady(f"result set {name}: {exc.message}") from None
                continue
            doubt = rows_in_doubt(job, name, saved)
            if doubt is not None and not fresh:
                log.warning("results_in_doubt", set=name, doubt=doubt)
                continue
            if doubt is not None:
                job.warning = f"result set {name}: {doubt}, also with a fresh link; kept as is"
                log.warning("results_kept_in_doubt", set=name, doubt=doubt)
            log.info("results_downloaded", set=name, bytes=saved.bytes, lines=saved.lines)
            return answer, saved.bytes
        raise AssertionError("unreachable: the loop returns or raises")


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark ``task``'s exception as seen: the body it stopped, or :func:`_outcome`, acts on
    it (at shutdown nobody may: the job is then resumed at the next start)."""
    if not task.cancelled():
        task.exception()


async def _outcome(task: asyncio.Task[None] | None) -> BaseException | None:
    """Wait for ``task`` (if any) to end (a cancelled waiter leaves it running); its
    exception, if it raised one."""
    if task is None:
        return None
    await asyncio.wait([task])
    return None if task.cancelled() else task.exception()


def reads_as_sent(job: Job) -> bool:
    """A multipart file not yet ``uploading``: for a caller that checks it once read (the
    daemon), its body is the one read of it, and its money is admitted before its last
    chunk. (Keyed by the state, not by unknown facts: a body stopped or cut off after its
    facts were set is read, and checked, again.)"""
    return job.method == "multipart" and job.state == JobState.CLAIMED


def _read_as_sent(job: Job, inspected: Inspected | None) -> bool:
    return inspected is not None and reads_as_sent(job)


def _learn(job: Job, inspection: Inspection) -> None:
    """Set what the body's one read found on ``job``; raise if IPQS cannot take it."""
    facts = inspection.facts()
    job.sha256, job.bytes, job.rows = facts.sha256, facts.bytes, facts.rows
    if facts.problem is not None:
        raise NotSendable(facts.problem)


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield
