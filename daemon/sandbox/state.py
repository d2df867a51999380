"""The sandbox's memory: jobs, one-time download links, the upload log, its clock and stats.

Fidelity assumptions:

* Job ids start at ``settings.first_id`` (default 3868534, the OpenAPI example) and only
  grow, also across a reset, so an id is never handed out twice by one sandbox.
* A job is NEW for ``new_seconds`` after upload, then PROCESSING for ``processing_seconds
  + rows * per_row_seconds``, then FINISHED; no job is ever aborted.
* ``rows`` (for timing, credits and the upload log) counts every non-blank line, a header
  row included.
* A download token is used up when its download starts, not when the client has it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import secrets
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from daemon.sandbox.answers import ALPHANUMERICS
from daemon.sandbox.results import (
    ResultSummary,
    generate_results,
    result_file_name,
    result_path,
)
from daemon.sandbox.settings import SandboxSettings
from daemon.sandbox.spool import SpooledFile

TOKEN_LENGTH = 256

NEW, PROCESSING, FINISHED = "NEW", "PROCESSING", "FINISHED"


@dataclass
class Job:
    """One accepted upload."""

    id: int
    key: str
    type: str
    file_name: str
    rows: int
    created_at: float  # on the sandbox clock
    directory: Path
    results: asyncio.Task[ResultSummary] | None = None

    @property
    def input_path(self) -> Path:
        """The file as received (JSON rows and fabricated URL content as CSV)."""
        return self.directory / "input.csv"


@dataclass(frozen=True)
class Link:
    """What a download token opens, until ``expires_at`` on the sandbox clock."""

    path: Path
    file_name: str
    expires_at: float
    finished_at: float = 0.0  # when its job finished, on the sandbox clock


@dataclass
class Stats:
    """Counters since start or the last reset.

    ``requests`` and ``abandoned`` (the client went away before the answer) count per
    operation; ``faults`` counts each fault that acted on a request, per kind.
    """

    requests: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    abandoned: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        """The counters as plain dicts."""
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "abandoned": dict(self.abandoned),
        }


class SandboxState:
    """Everything the running sandbox knows; the value of the ``SANDBOX`` app key."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.faults = dataclasses.replace(settings.faults)
        self.uploads: list[dict[str, object]] = []
        self.jobs: dict[int, Job] = {}
        self.links: dict[str, Link] = {}
        self.stats = Stats()
        self.usage: Counter[str] = Counter()  # rows charged per type, for the account API
        self.http: aiohttp.ClientSession | None = None  # only when fetch_urls is on
        self._offset = 0.0
        self._next_id = settings.first_id
        self._spool: Path | None = None
        self._rng = random.Random(self.faults.seed)
        self._rng_seed = self.faults.seed

    # -- clock ---------------------------------------------------------------------

    def now(self) -> float:
        """The sandbox clock: the settings' clock plus every :meth:`advance`."""
        return self.settings.clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the sandbox clock forward."""
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        self._offset += seconds

    @property
    def offset(self) -> float:
        """How far :meth:`advance` has moved the clock in total."""
        return self._offset

    # -- faults --------------------------------------------------------------------

    def chance(self, rate: float) -> bool:
        """Draw against ``rate``; no draw is made for a zero rate, so seeded runs stay put."""
        return rate > 0 and self._generator().random() < rate

    def pick(self, choices: tuple[int, ...]) -> int:
        """A random choice from the fault generator."""
        return self._generator().choice(choices)

    def reseed(self) -> None:
        """Restart the fault draws from ``faults.seed``, even if it has not changed."""
        self._rng, self._rng_seed = random.Random(self.faults.seed), self.faults.seed

    def _generator(self) -> random.Random:
        if self.faults.seed != self._rng_seed:
            self.reseed()  # a test may set faults.seed directly at runtime
        return self._rng

    def fired(self, fault: str) -> None:
        """Count a fault that acted on a request."""
        self.stats.faults[fault] += 1

    # -- keys and credits ----------------------------------------------------------

    def key_accepted(self, key: str) -> bool:
        """Whether ``key`` may use the API now."""
        if self.faults.invalid_key:
            self.fired("invalid_key")
            return False
        expected = self.settings.key
        if expected is None:
            return bool(key)
        return secrets.compare_digest(key.encode(), expected.encode())

    def take_credits(self, rows: int, file_type: str = "") -> bool:
        """Charge ``rows`` credits to ``file_type``'s usage; False (and nothing charged)
        when too few are left."""
        left = self.faults.credits
        if left is not None and rows > left:
            self.fired("credits")
            return False
        if left is not None:
            self.faults.credits = left - rows
        self.usage[file_type] += rows
        return True

    # -- jobs ----------------------------------------------------------------------

    def incoming_path(self) -> Path:
        """A fresh path for an upload being received."""
        return self._spool_root() / "incoming" / f"{uuid.uuid4().hex}.part"

    def create_job(
        self,
        key: str,
        file_type: str,
        file_name: str,
        spooled: SpooledFile,
        method: str,
        url: str | None,
    ) -> Job:
        """Adopt a received file as a new job and record it in the upload log."""
        job_id, self._next_id = self._next_id, self._next_id + 1
        directory = self._spool_root() / "jobs" / str(job_id)
        directory.mkdir(parents=True)
        job = Job(job_id, key, file_type, file_name, spooled.rows, self.now(), directory)
        spooled.path.rename(job.input_path)
        self.jobs[job_id] = job
        self.uploads.append(_log_entry(job, spooled, method, url))
        return job

    def seed_jobs(self, key: str, file_type: str, count: int) -> None:
        """Add ``count`` jobs of ``file_type`` at once, without files, as if uploaded long
        ago (for tests of long job lists; they are not in the upload log)."""
        seeded = self._spool_root() / "seeded"
        for _ in range(count):
            job_id, self._next_id = self._next_id, self._next_id + 1
            self.jobs[job_id] = Job(job_id, key, file_type, f"seeded-{job_id}", 1,
                                    self.now(), seeded)

    def find_job(self, key: str, job_id: int | None) -> Job | None:
        """The caller's job with this id; None for a missing, unknown or foreign id."""
        job = self.jobs.get(job_id) if job_id is not None else None
        return job if job is not None and job.key == key else None

    def jobs_of(self, key: str, file_type: str | None) -> list[Job]:
        """The caller's jobs, newest first, optionally of one type."""
        mine = [j for j in self.jobs.values() if j.key == key and file_type in (None, j.type)]
        return sorted(mine, key=lambda job: job.id, reverse=True)

    def stage(self, job: Job) -> str:
        """NEW, PROCESSING or FINISHED, by the sandbox clock."""
        now = self.now()
        if now - job.created_at < self.settings.new_seconds:
            return NEW
        return PROCESSING if now < self.finished_at(job) else FINISHED

    def finished_at(self, job: Job) -> float:
        """When the job is (or was) FINISHED, on the sandbox clock."""
        timing = self.settings
        busy = timing.processing_seconds + job.rows * timing.per_row_seconds
        return job.created_at + timing.new_seconds + busy

    async def results(self, job: Job) -> ResultSummary:
        """The job's result sets, generated once, off the event loop, on first request."""
        if job.results is None:
            job.results = asyncio.create_task(
                asyncio.to_thread(generate_results, job.type, job.input_path, job.directory),
                name=f"sandbox-results-{job.id}",
            )
        # Shielded: a client that gives up must not leave a job with half-written results.
        return await asyncio.shield(job.results)

    # -- download links ------------------------------------------------------------

    def mint_link(self, base: str, job: Job, result_set: str) -> str:
        """A new one-time link to one result set of a finished job."""
        self._forget_expired_links()
        token = "".join(secrets.choice(ALPHANUMERICS) for _ in range(TOKEN_LENGTH))
        name = result_file_name(job.file_name, job.type, result_set)
        expires_at = self.now() + self.settings.link_ttl_seconds
        self.links[token] = Link(result_path(job.directory, result_set), name, expires_at,
                                 self.finished_at(job))
        return f"{base}/download?{urlencode({'download': token, 'filename': name})}"

    def link_dead(self, token: str) -> bool:
        """Whether ``faults.links_dead_seconds`` still refuses this link (not used up)."""
        link = self.links.get(token)
        dead_for = self.faults.links_dead_seconds
        return link is not None and dead_for > 0 and self.now() < link.finished_at + dead_for

    def redeem(self, token: str) -> Link | None:
        """Use up a token; None when it is unknown, used or expired."""
        link = self.links.pop(token, None)
        if link is None or self.now() >= link.expires_at:
            return None
        return link

    def _forget_expired_links(self) -> None:
        now = self.now()
        for token in [t for t, link in self.links.items() if now >= link.expires_at]:
            del self.links[token]

    # -- lifetime ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Hold the spool folders (and the URL-fetching session) while the app runs."""
        async with contextlib.AsyncExitStack() as stack:
            root = self.settings.spool_dir
            if root is None:
                temporary = tempfile.TemporaryDirectory(prefix="ipqs-sandbox-")
                root = Path(stack.enter_context(temporary))
            self._spool = root
            await asyncio.to_thread(self._empty_spool)
            if self.settings.fetch_urls:
                self.http = await stack.enter_async_context(_fetch_session())
            # Runs first on the way out: results still being written need their folders.
            stack.push_async_callback(self._stop)
            yield

    async def _stop(self) -> None:
        await self._settle_results()
        self.http, self._spool = None, None

    async def reset(self) -> None:
        """Forget jobs, links, the upload log, stats and usage; faults back to the settings'."""
        await self._settle_results()
        self.jobs.clear()
        self.links.clear()
        self.uploads.clear()
        self.stats = Stats()
        self.usage.clear()
        self.faults = dataclasses.replace(self.settings.faults)
        self.reseed()
        await asyncio.to_thread(self._empty_spool)

    async def _settle_results(self) -> None:
        pending = [job.results for job in self.jobs.values() if job.results is not None]
        await asyncio.gather(*pending, return_exceptions=True)

    def _empty_spool(self) -> None:
        root = self._spool_root()
        for folder in (root / "jobs", root / "incoming"):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)

    def _spool_root(self) -> Path:
        if self._spool is None:
            raise RuntimeError("the sandbox app is not running")
        return self._spool


SANDBOX: web.AppKey[SandboxState] = web.AppKey("sandbox", SandboxState)


def _fetch_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, connect=10))


def _log_entry(job: Job, spooled: SpooledFile, method: str, url: str | None) -> dict[str, object]:
    return {
        "id": job.id,
        "type": job.type,
        "file_name": job.file_name,
        "sha256": spooled.sha256,
        "bytes": spooled.size,
        "rows": spooled.rows,
        "method": method,
        "url": url,
        "received_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "key_hint": job.key[-4:],
    }
