"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_any(*events: asyncio.Event, within: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``within`` seconds (None: no timer).

    The helper tasks are cancelled and awaited before returning, so none outlives the call.
    """
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=None if within is None else max(within, 0.0),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class Wakeup:
    """A flag that work raises, from any thread, to wake one waiting loop early.

    The spool's blocking methods run in worker threads, where ``asyncio.Event.set`` is not
    safe: once :meth:`bind` has named the loop, a set from another thread is handed to it.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def set(self) -> None:
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self.event.set()  # unbound: nobody waits yet, so the flag is all there is
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self.event.set)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
