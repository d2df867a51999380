"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio


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
