"""The one retry policy: capped exponential backoff with full jitter, Retry-After as a floor.

Only :class:`~daemon.errors.TransientError` is retried, never "any exception". The sleep is
injectable (tests assert the waits) and, by default, wakes early when the daemon stops, so a
shutdown never waits out a long backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_random_exponential,
)

from daemon.aio import wait_any
from daemon.errors import LostAnswerError, TransientError


def backoff(initial: float, maximum: float) -> Callable[[RetryCallState], float]:
    """Full-jitter exponential wait, capped at ``maximum``, never below a Retry-After."""
    jitter = wait_random_exponential(multiplier=initial, max=maximum)

    def wait(state: RetryCallState) -> float:
        delay = jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            delay = max(delay, float(retry_after))
        return delay

    return wait


def stoppable_sleep(stop: asyncio.Event) -> Callable[[float], Awaitable[None]]:
    """A sleep that returns as soon as ``stop`` is set."""

    async def sleep(seconds: float) -> None:
        await wait_any(stop, within=seconds)

    return sleep


def retrying(
    *,
    initial: float,
    maximum: float,
    stop: asyncio.Event,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    retry_lost_answers: bool = True,
) -> AsyncRetrying:
    """Retry transient errors until they stop or ``stop`` is set; then the last error is
    raised as it was. With ``retry_lost_answers=False`` a :class:`LostAnswerError` is raised
    at once, for the caller to look the upload up before any new attempt."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.next_action.sleep)

    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, LostAnswerError):
            return retry_lost_answers
        return isinstance(exc, TransientError)

    return AsyncRetrying(
        retry=retry_if_exception(retryable),
        wait=backoff(initial, maximum),
        stop=lambda _state: stop.is_set(),
        sleep=sleep or stoppable_sleep(stop),
        before_sleep=before_sleep,
        reraise=True,
    )
