"""The one owner of a daemon's in-flight bookkeeping: which jobs it is running now, which
it left in processing/ for later, and how many ended in done/ and failed/."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType


class InFlight:
    """Jobs this daemon is running. Every stage reports through these methods; nothing else
    changes the sets, so "idle" and the batch's exit status read one consistent picture."""

    def __init__(self) -> None:
        self._active: set[str] = set()
        self._left: set[str] = set()
        self._outcomes = {"done": 0, "failed": 0}
        self.idle = asyncio.Event()  # set whenever the last running job is forgotten

    def started(self, job_id: str) -> None:
        """The job is ours to run from now on (registered before its folder exists, so a
        recovery sweep never mistakes a claim under way for a job left behind)."""
        self._active.add(job_id)
        self.idle.clear()

    def finished(self, job_id: str, outcome: str) -> None:
        """The job reached done/ or failed/."""
        self._outcomes[outcome] += 1
        self.forget(job_id, left_behind=False)

    def forget(self, job_id: str, *, left_behind: bool = False) -> None:
        """The job is no longer this daemon's business; ``left_behind`` when it stays in
        processing/ (a batch run did not complete it)."""
        if left_behind:
            self._left.add(job_id)
        else:
            self._left.discard(job_id)
        self._active.discard(job_id)
        if not self._active:
            self.idle.set()

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._active

    def count(self) -> int:
        """Jobs running now."""
        return len(self._active)

    def left_count(self) -> int:
        """Jobs left in processing/ without an outcome."""
        return len(self._left)

    @property
    def outcomes(self) -> Mapping[str, int]:
        """Files finished so far, by outcome (read-only)."""
        return MappingProxyType(self._outcomes)
