"""The duplicate guard, for the daemon and ``submit`` alike: take the content's marker
before anything is sent, and settle by lookup a marker whose fate is open.

A ``submit`` that was interrupted, or whose upload's answer was lost, leaves its marker
*unresolved* (:meth:`~daemon.spool.markers.Markers.unresolved`): IPQS may or may not have
the upload. Whoever meets such a marker next looks its ``file_name`` up, with the same
lookup (and the same patience) as an upload whose answer was lost: found, the content was
paid for and the marker gets its IPQS id; surely absent, nobody paid and the marker goes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from daemon.job.conversation import Conversation
from daemon.spool import Job, Spool
from daemon.spool.markers import DAEMON

log = structlog.get_logger(__name__)

#: A marker replaced again and again while we look each one up is given up on (as taken).
MAX_LOOKUPS = 3


async def take_marker(spool: Spool, talk: Conversation, job: Job, window_seconds: float, *,
                      holder: str = DAEMON) -> dict[str, Any] | None:
    """Claim ``job``'s content; None when it is ours to send, else the earlier marker
    (with its IPQS id when one is known). May look up at IPQS, so it may take a while."""
    earlier = None
    for _ in range(MAX_LOOKUPS):
        earlier = await asyncio.to_thread(spool.mark, job, window_seconds, holder=holder)
        if earlier is None or not spool.marks.unresolved(earlier):
            return earlier
        log.info("marker_lookup", earlier=earlier.get("job"), file_name=earlier.get("file_name"))
        found = await talk.lookup(_as_job(earlier))
        if found is not None:
            log.warning("marker_found_at_ipqs", earlier=earlier.get("job"), id=found.id)
            return await asyncio.to_thread(spool.marks.settle, earlier, found.id)
        log.info("marker_not_found_at_ipqs", earlier=earlier.get("job"))
        await asyncio.to_thread(spool.marks.retire, earlier)
    return earlier


def _as_job(mark: dict[str, Any]) -> Job:
    """The earlier upload, as much of a job as a lookup needs."""
    floor = mark.get("floor_id")
    uploads = mark.get("uploads")
    return Job(job=str(mark.get("job")), type=str(mark.get("type")),
               source=str(mark.get("source")), file_name=str(mark.get("file_name")),
               method=str(mark.get("method") or "multipart"),
               floor_id=floor if isinstance(floor, int) else None,
               uploads=uploads if isinstance(uploads, int) and uploads > 0 else 1)
