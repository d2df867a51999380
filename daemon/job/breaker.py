"""The circuit breaker: uploads pause after an account error and resume by themselves once
a probe upload succeeds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.aio import wait_any

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Permit:
    """Leave to send uploads, from :meth:`Breaker.acquire`.

    ``generation`` tells which breaker state the permit was issued in, so that the failures
    of uploads that were already under way when the breaker opened count once, not once
    each.
    """

    probe: bool
    generation: int


class Breaker:
    """Pauses uploads after an account error (bad key, no credits).

    While open, uploads wait. After a delay (doubling up to ``cap``) one upload is let
    through as a probe: success closes the breaker, another account error reopens it. So the
    queue drains by itself once the account works again, and a broken account costs one
    request per probe, not one per file. State changes are logged once, not per file.
    """

    def __init__(self, initial: float = 5.0, cap: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial = initial
        self.cap = cap
        self.clock = clock
        self.reason: str | None = None
        self._delay = initial
        self._probe_at = 0.0
        self._probing = False
        self._generation = 0
        self._changed = asyncio.Event()

    @property
    def paused(self) -> bool:
        return self.reason is not None

    async def acquire(self, stop: asyncio.Event) -> Permit | None:
        """Wait until an upload may go out; None if ``stop`` was set first."""
        while not stop.is_set():
            if self.reason is None:
                return Permit(probe=False, generation=self._generation)
            wait = self._probe_at - self.clock()
            if wait <= 0 and not self._probing:
                self._probing = True
                return Permit(probe=True, generation=self._generation)
            self._changed.clear()
            await wait_any(self._changed, stop, within=None if self._probing else max(wait, 0.05))
        return None

    def allows(self, permit: Permit) -> bool:
        """May this permit still send? Not once the breaker opened after it was issued
        (unless it is the probe): checked right before each POST."""
        return self.reason is None or permit.probe

    def success(self) -> None:
        if self.reason is not None:
            log.info("uploads_resumed", after=self.reason)
        self.reason = None
        self._delay = self.initial
        self._probing = False
        self._generation += 1
        self._changed.set()

    def failure(self, reason: str, permit: Permit | None = None) -> None:
        """An account error. From an upload that started before the breaker last changed
        state (a concurrent one), it changes nothing: only the first verdict counts."""
        if permit is not None and permit.generation != self._generation:
            return
        if self.reason is None:
            log.error("uploads_paused", reason=reason, retry_in=self._delay)
        self.reason = reason
        self._probe_at = self.clock() + self._delay
        self._delay = min(self._delay * 2, self.cap)
        self._probing = False
        self._generation += 1
        self._changed.set()

    def release(self, permit: Permit | None) -> None:
        """The permit's upload ended without a verdict (nothing sent, or transient trouble):
        if it was the probe, let another try."""
        if permit is not None and permit.probe and self._probing \
                and permit.generation == self._generation:
            self._probing = False
            self._changed.set()
