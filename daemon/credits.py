"""The credit guard: never start an upload the account's balance cannot pay for.

The balance comes from IPQS's Credit Usage API (``credits``), taken to be what is left:
IPQS does not document it. It is read at start, every ``refresh_seconds``, and after an
account error; between reads it is debited locally by the rows of each upload.

An upload of R rows is admitted when ``balance - held - R >= reserve``, where ``held`` is
the rows of admitted uploads not yet accepted or released, so uploads running at once
can never together spend past the reserve. When that fails the guard answers "wait"
with a reason (``paused: credits N, next file needs R + reserve M``) and re-reads the
balance with the breaker's backoff, so a top-up is seen soon; it resumes on its own.
A file that can never fit only waits itself: each file is asked about on its own.

When the account API cannot be read (refused, 404, not JSON, no ``credits``) the guard
steps aside: everything is admitted, one warning is logged, and it tries again after
``refresh_seconds``. Pure logic: the clock and the balance reader are injected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from daemon.api import Account
from daemon.errors import IpqsError

log = structlog.get_logger(__name__)

#: Reads the balance; None or an :class:`IpqsError` means "cannot be read".
BalanceReader = Callable[[], Awaitable[int | None]]


@dataclass(frozen=True)
class Admission:
    """The guard's answer for one file: go, or wait with a reason for people."""

    allowed: bool
    reason: str | None = None


ALLOW = Admission(True)


class CreditGuard:
    """Admits uploads against the account's balance (see the module docstring)."""

    def __init__(
        self,
        read_balance: BalanceReader,
        *,
        reserve: int = 0,
        refresh_seconds: float = 300.0,
        pause_initial_seconds: float = 5.0,
        pause_max_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_balance = read_balance
        self._reserve = reserve
        self._refresh = refresh_seconds
        self._pause_initial, self._pause_max = pause_initial_seconds, pause_max_seconds
        self._clock = clock
        self.balance: int | None = None  # last read, minus accepted uploads since
        self.held = 0
        self.paused: str | None = None  # the reason while uploads wait
        self._next_read = 0.0  # read at the first admission
        self._pause_delay = pause_initial_seconds
        self._warned = False
        self._logged: set[int] = set()  # file sizes whose pause is logged since new money
        self._last_read: int | None = None  # the balance as IPQS last told it
        self._reading = asyncio.Lock()

    @property
    def guarding(self) -> bool:
        """Whether the balance is known, so admissions are checked against it."""
        return self.balance is not None

    async def admit(self, rows: int | None, *, refresh: bool = True) -> Admission:
        """May an upload of ``rows`` start? If so its rows are held until
        :meth:`accepted` or :meth:`released`. Unknown rows (a ``.url`` file) count as 1.
        ``refresh=False``: by the balance as last read, even if a read is due."""
        need = 1 if rows is None else rows
        if refresh:
            await self._refresh_if_due()
        if self.balance is None:
            return ALLOW
        if self._room_for(need):
            self.held += need
            self._resume()
            return ALLOW
        return self._wait(need)

    async def fits(self, rows: int) -> bool:
        """Would an upload of ``rows`` be admitted now? Holds nothing, tells nobody."""
        await self._refresh_if_due()
        return self.balance is None or self._room_for(rows)

    def _room_for(self, rows: int) -> bool:
        assert self.balance is not None
        return self.balance - self.held - rows >= self._reserve

    @property
    def free(self) -> int | None:
        """The balance less the rows of admitted uploads under way; None while unknown."""
        return None if self.balance is None else max(self.balance - self.held, 0)

    async def refresh(self) -> None:
        """Read the balance if a read is due (at start, every ``refresh_seconds``...)."""
        await self._refresh_if_due()

    def accepted(self, rows: int | None, *, held: bool = True) -> None:
        """IPQS accepted an upload: its rows leave the balance. ``held`` is False for one
        this guard did not admit (resumed after a restart)."""
        need = 1 if rows is None else rows
        if held:
            self.held = max(0, self.held - need)
        if self.balance is not None:
            self.balance -= need

    def released(self, rows: int | None) -> None:
        """An admitted upload was not accepted (not sent, or refused): give its rows back."""
        self.held = max(0, self.held - (1 if rows is None else rows))

    def account_error(self) -> None:
        """IPQS refused the account (no credits, bad key): read the balance next time."""
        self._next_read = self._clock()

    async def _refresh_if_due(self) -> None:
        async with self._reading:  # uploads asking at once share one read
            if self._clock() < self._next_read:
                return
            await self._read()

    async def _read(self) -> None:
        try:
            balance = await self._read_balance()
        except IpqsError as exc:
            self._unreadable(str(exc))
            return
        if balance is None:
            self._unreadable("the answer has no credits")
            return
        if self.balance is None and self._warned:
            log.info("credit_guard_on", credits=balance)
        if self._last_read is None or balance > self._last_read:
            # New money (or a first read): a file still short is worth a line again. A
            # lower balance is uploads being paid for, which is no news. (Compared with
            # the last read, not the local debits: a read may include uploads whose
            # answers are debited locally afterwards.)
            self._logged.clear()
        self._last_read = balance
        self.balance, self._warned = balance, False
        if self.paused is None:
            self._next_read = self._clock() + self._refresh
        else:  # still short at the last look: look again soon, then less often
            self._pause_delay = min(self._pause_delay * 2, self._pause_max)
            self._next_read = self._clock() + self._pause_delay

    def _unreadable(self, why: str) -> None:
        self.balance, self.paused, self._last_read = None, None, None
        self._next_read = self._clock() + self._refresh
        if not self._warned:
            log.warning("credit_guard_off", error=why,
                        detail="the account API cannot be read: uploads go on unguarded")
            self._warned = True

    def _wait(self, need: int) -> Admission:
        assert self.balance is not None
        # Not below 0: a read taken while uploads are under way may already show some of
        # the rows still held here.
        free = max(self.balance - self.held, 0)
        reason = f"paused: credits {free}, next file needs {need} + reserve {self._reserve}"
        if need not in self._logged:
            # One line per file size and balance read, not per question: a file that can
            # never fit is asked about again on every pass.
            log.warning("uploads_paused_for_credits", credits=free, needs=need,
                        reserve=self._reserve)
            self._logged.add(need)
        if self.paused is None:
            # The breaker's backoff: pause_initial_seconds, doubling to pause_max_seconds,
            # so that a top-up is seen within about pause_max_seconds.
            self._pause_delay = self._pause_initial
            self._next_read = min(self._next_read, self._clock() + self._pause_delay)
        self.paused = reason
        return Admission(False, reason)

    def _resume(self) -> None:
        if self.paused is not None:
            log.info("uploads_resumed_credits", credits=self.balance)
            self.paused = None


class _AccountSource(Protocol):
    async def account(self) -> Account: ...


def balance_reader(client: _AccountSource) -> BalanceReader:
    """The balance as :meth:`daemon.api.IpqsClient.account` reads it."""

    async def read() -> int | None:
        return (await client.account()).credits

    return read
