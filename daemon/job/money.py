"""The money guards before a job is sent, for the daemon's uploader and ``submit`` alike.

Three questions, asked in this order once a file's rows are known:

1. the per-file cap (``budget.max_rows_per_file``): a file over it can never be sent as it
   is, so it fails as ``too-large`` before anything else happens;
2. the daily budgets (``budget.max_rows_per_day``, ``..._by_type``): the rows are reserved
   in the spool's :class:`~daemon.spool.ledger.Ledger`, shared by every daemon on it;
3. the balance (``budget.check_credits``): the :class:`~daemon.credits.CreditGuard`.

A file refused by 2 or 3 waits (in its inbox, the caller sees to that) and is asked about
again later; nothing is failed for it. What was admitted is given back when the file is
not sent or IPQS refuses it (:meth:`Purse.released`), and leaves the balance when IPQS
accepts it (:meth:`Purse.accepted`). A day is the UTC calendar day of ``clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import structlog

from daemon.api import IpqsClient
from daemon.config import Config
from daemon.credits import ALLOW, Admission, CreditGuard, balance_reader
from daemon.spool import Job
from daemon.spool.ledger import Ledger, Limits, utc_day

log = structlog.get_logger(__name__)

#: The ledger keeps the folders of this many past days, for people to look at.
KEEP_DAYS = timedelta(days=7)


@dataclass(frozen=True)
class _Held:
    rows: int | None
    day: date


class Purse:
    """Admits jobs against the cap, the daily budgets and the balance (module docstring)."""

    def __init__(self, *, cap: int = 0, ledger: Ledger | None = None,
                 guard: CreditGuard | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cap = cap
        self.ledger = ledger
        self.guard = guard
        self._clock = clock
        self._held: dict[str, _Held] = {}  # job -> what it was admitted with
        # Per type: the day a file of it was refused by a budget, and why.
        self._budget_wait: dict[str, tuple[date, str]] = {}
        self.used: dict[str, int] = {}  # rows reserved today, per type (as last read)
        self._used_day: date | None = None

    @classmethod
    def for_config(cls, config: Config, client: IpqsClient, *,
                   clock: Callable[[], float] = time.time) -> Purse:
        """The guards ``config.budget`` asks for, over the spool at ``spool.root``."""
        budget, upload = config.budget, config.upload
        limits = Limits(budget.max_rows_per_day, dict(budget.max_rows_per_day_by_type))
        ledger = None
        if limits.per_day or any(limits.per_type.values()):
            ledger = Ledger(Path(config.spool.root), limits, file_mode=config.spool.file_mode)
        guard = None
        if budget.check_credits:
            guard = CreditGuard(balance_reader(client), reserve=budget.reserve_credits,
                                pause_initial_seconds=upload.pause_initial_seconds,
                                pause_max_seconds=upload.pause_max_seconds)
        return cls(cap=budget.max_rows_per_file, ledger=ledger, guard=guard, clock=clock)

    def today(self) -> date:
        return utc_day(self._clock())

    # -- the three questions -----------------------------------------------------------

    def too_large(self, rows: int | None) -> str | None:
        """Why a file of ``rows`` can never be sent under the cap (None if it can)."""
        if not self.cap or rows is None or rows <= self.cap:
            return None
        return f"the file has {rows} rows, over budget.max_rows_per_file = {self.cap}"

    async def admit(self, job: Job, *, fresh: bool = True) -> Admission:
        """May ``job`` be sent now? If so, its rows are held (in the ledger and against the
        balance) until :meth:`accepted` or :meth:`released`. ``fresh=False``: judged by
        the balance as last read (and debited since), without reading it again.

        Refused or interrupted (cancelled) half-way, it gives back what it had taken."""
        if job.job in self._held:
            return ALLOW
        day = self.today()
        ledger, admission = self.ledger, None
        try:
            if ledger is not None and not await asyncio.to_thread(
                    ledger.reserve, job.job, job.type, job.rows or 0, day):
                return await self._over_budget(job.type, job.rows, day)
            admission = ALLOW if self.guard is None else await self.guard.admit(
                job.rows, refresh=fresh)
        finally:
            if ledger is not None and not (admission and admission.allowed):
                # Refused, or interrupted (even inside the reserve): give back whatever
                # this job holds today (nothing, if the reserve never took).
                await asyncio.shield(asyncio.to_thread(ledger.release, job.job, day))
        if not admission.allowed:
            await self._read_used_soon(day)
            return admission
        self._held[job.job] = _Held(job.rows, day)
        self._budget_wait.pop(job.type, None)
        await self._read_used_soon(day)
        return ALLOW

    async def would_admit(self, file_type: str, rows: int | None) -> Admission:
        """Would a file of ``rows`` be admitted now? Holds nothing: asked about a file that
        waited, before it is taken out of its inbox again."""
        day = self.today()
        if self.ledger is not None:
            refusal = await asyncio.to_thread(self.ledger.refusal, file_type, rows or 0, day)
            if refusal is not None:
                return self._waiting(file_type, refusal, day)
        if self.guard is not None:
            admission = await self.guard.admit(rows)
            if not admission.allowed:
                return admission
            self.guard.released(rows)
        return ALLOW

    async def fits(self, file_type: str, rows: int) -> bool:
        """Would a file of ``rows`` be admitted now? Holds nothing and logs nothing: asked
        before a file whose rows are not known yet is sent (they are learnt on the way)."""
        day = self.today()
        if self.ledger is not None and await asyncio.to_thread(
                self.ledger.refusal, file_type, rows, day) is not None:
            return False
        return self.guard is None or await self.guard.fits(rows)

    # -- after the answer --------------------------------------------------------------

    def accepted(self, job: Job) -> None:
        """IPQS accepted the job: its rows leave the balance (the ledger keeps them)."""
        held = self._held.pop(job.job, None)
        if self.guard is not None:
            self.guard.accepted(job.rows, held=held is not None)

    async def released(self, job: Job) -> None:
        """The job was not sent, or IPQS refused it: what it held is given back."""
        held = self._held.pop(job.job, None)
        if held is None:
            return
        if self.guard is not None:
            self.guard.released(held.rows)
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.release, job.job, held.day)
            await self._read_used(held.day)

    def forget(self, job: Job) -> None:
        """The job left our hands unsettled (stopped, interrupted, or an earlier upload of
        it may yet show up at IPQS): its hold on the balance ends, and the next read shows
        what was spent; its rows stay in the ledger, as they may have been sent."""
        held = self._held.pop(job.job, None)
        if held is not None and self.guard is not None:
            self.guard.released(held.rows)

    def account_error(self) -> None:
        """IPQS refused the account: read the balance again at the next admission."""
        if self.guard is not None:
            self.guard.account_error()

    # -- for people and metrics --------------------------------------------------------

    @property
    def reason(self) -> str | None:
        """Why uploads wait now (the balance, or today's budget), or None."""
        if self.guard is not None and self.guard.paused is not None:
            return self.guard.paused
        today = self.today()
        for day, why in self._budget_wait.values():
            if day == today:
                return f"waiting until the next UTC day: {why}"
        return None

    @property
    def credits(self) -> int | None:
        """The balance less uploads under way; None when unknown or not checked."""
        return None if self.guard is None else self.guard.free

    def rows_left(self, types: Iterable[str]) -> dict[str, int]:
        """Rows of each type that still fit today's budgets (types without one absent)."""
        if self.ledger is None:
            return {}
        used = self.used if self._used_day == self.today() else {}
        left = {t: self.ledger.limits.left(used, t) for t in types}
        return {t: n for t, n in left.items() if n is not None}

    async def refresh(self) -> None:
        """Read the balance if due, and today's rows from the ledger (at start, and now
        and then, so that gauges and status follow other daemons and the day)."""
        if self.guard is not None:
            await self.guard.refresh()
        if self.ledger is not None:
            today = self.today()
            if self._used_day is not None and self._used_day != today:  # a new day
                await asyncio.to_thread(self.ledger.prune, today - KEEP_DAYS)
            await self._read_used(today)

    async def _read_used_soon(self, day: date) -> None:
        """Read today's rows for the gauges, if there is a ledger; a failed read is
        left to the next one (it must not undo an admission)."""
        if self.ledger is not None:
            with contextlib.suppress(OSError):
                await self._read_used(day)

    async def _read_used(self, day: date) -> None:
        assert self.ledger is not None
        self.used = await asyncio.to_thread(self.ledger.used, day)
        self._used_day = day

    async def _over_budget(self, file_type: str, rows: int | None, day: date) -> Admission:
        assert self.ledger is not None
        refusal = await asyncio.to_thread(self.ledger.refusal, file_type, rows or 0, day)
        await self._read_used(day)
        # None: refused on an entry that cannot be read whole (see the ledger).
        why = refusal or ("daily budget: an entry of today's ledger cannot be read, so "
                          "nothing more is counted today")
        return self._waiting(file_type, why, day)

    def _waiting(self, file_type: str, why: str, day: date) -> Admission:
        if all(waited != day for waited, _ in self._budget_wait.values()):
            log.warning("uploads_waiting_for_budget", reason=why, day=day.isoformat())
        self._budget_wait[file_type] = (day, why)
        return Admission(False, f"waiting until the next UTC day: {why}")
