"""The gate before a body's last chunk: what must hold before a file read as it goes out
(see :meth:`daemon.job.conversation.Conversation.send`) may reach IPQS whole.

In this order, once its facts are known from the body itself: the per-file cap, the money
(the daily budgets and the balance as last read, held until the answer), then the
content's duplicate marker, taken and marked ``sending``; then the file must still be as
claimed. Each refusal is an exception that stops the body, so IPQS gets no whole file;
whatever the gate took is given back first, also when it is interrupted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from daemon.credits import Admission
from daemon.job.money import Purse
from daemon.spool import Job, Spool


class TooLarge(Exception):
    """Over ``budget.max_rows_per_file``: ``str()`` says by how much."""


class WaitsForMoney(Exception):
    """Refused by a daily budget or the balance: the file waits."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.reason or "waiting for money")
        self.admission = admission


class Changed(Exception):
    """The file changed (or went) while its body was read: what was read is not the file."""


class Taken(Exception):
    """The content's duplicate marker is held by ``earlier`` (its marker)."""

    def __init__(self, earlier: dict[str, Any]) -> None:
        super().__init__(f"the same content is taken by job {earlier.get('job')}")
        self.earlier = earlier


async def pass_last_chunk(purse: Purse, spool: Spool, job: Job, window_seconds: float) -> None:
    """Let ``job``'s last chunk go, or raise :class:`TooLarge`, :class:`WaitsForMoney`,
    :class:`Taken` or :class:`Changed`. Taken again for the same job (a retried POST), it
    holds as before."""
    too_large = purse.too_large(job.rows)
    if too_large is not None:
        raise TooLarge(too_large)
    # The balance as last read (less what was spent since): no read over the network
    # while a body waits on a connection of its own (the read is made before the POST).
    admission = await purse.admit(job, fresh=False)
    if not admission.allowed:
        raise WaitsForMoney(admission)
    marked = False
    try:
        earlier = await asyncio.to_thread(spool.mark, job, window_seconds)
        if earlier is not None:
            raise Taken(earlier)
        marked = True
        await asyncio.to_thread(spool.update_mark, job, sending=True)
        # Last: the checks above may have taken a while, and what was read must still be
        # the file as claimed (its size and mtime then), or nothing of it goes.
        if await asyncio.to_thread(spool.changed, job):
            raise Changed("the file changed while it was being sent")
    except BaseException:
        if marked:  # the body stops: nothing of it reaches IPQS
            await asyncio.to_thread(spool.unmark, job)
        await purse.released(job)
        raise
