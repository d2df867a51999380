"""Looking up an upload whose answer was lost, when IPQS's job list is long (issue 18.7,
17 "Also"): bounded paging, a clear wait, and no loop."""

from __future__ import annotations

import io
import json
from pathlib import Path

import structlog

from daemon.commands.common import Console
from daemon.commands.status import budget, collect, probe_all, render
from daemon.spool import Spool
from daemon.spool.record import JOB_FILE, load_record
from tests.support import (
    FAKE_KEY,
    daemon_config,
    drop,
    emails,
    quick_settings,
    running,
    sandbox_server,
    wait_for,
)

SEEDED = 10_050  # > 200 pages of 50


async def test_a_lost_answer_lookup_over_a_long_list_is_bounded_and_the_job_waits(
        tmp_path: Path) -> None:
    # Jobs stay NEW: the seeded ones have no files to make results of.
    async with sandbox_server(quick_settings(tmp_path, new_seconds=3600)) as sandbox:
        sandbox.state.seed_jobs(FAKE_KEY, "email", SEEDED)
        root = tmp_path / "spool"
        config = daemon_config(root, sandbox.api_base, spool={"types": ("email",)})
        # As after a start during an outage: "uploading", answer lost, no known newest id.
        spool = Spool(root, config.spool.types)
        spool.prepare()
        job = spool.claim("email", drop(root, "email", "lost.csv", emails(5)), "multipart")
        assert job is not None
        job.state, job.uploads, job.floor_id, job.owner = "uploading", 1, None, None
        spool.save(job)
        record = spool.job_dir(job) / JOB_FILE
        with structlog.testing.capture_logs() as logs:
            async with running(config) as service:
                service.pipe.talk.incomplete_wait_seconds = 1.0  # an hour in production
                await wait_for(lambda: _incomplete(logs) >= 2, timeout=60,
                               what="two bounded lookups, a wait apart")
                lists = sandbox.state.stats.requests["list"]
                waiting = load_record(record)
                report = collect(config, recent=5)  # as `ipqs-bulkd status` builds it
                report["daemon"], report["daemons"] = await probe_all(config)
                report["budget"] = budget(config)
        out = io.StringIO()
        render(report, Console(out, io.StringIO()))
    # 200 pages per lookup (plus the newest-id call at start), never the unbounded loop.
    assert 2 * 200 <= lists <= (_incomplete(logs) + 1) * 200 + 1, lists
    assert sandbox.uploads() == []  # never sent again while it waits
    assert waiting is not None and waiting.state == "uploading"
    assert waiting.waiting is not None and "lookup incomplete" in waiting.waiting
    assert job.file_name in waiting.waiting
    assert f"waiting: {job.job} (lost.csv): lookup incomplete" in out.getvalue()
    [shown] = report["processing"]
    assert json.dumps(shown["waiting"]) and "newest id" in shown["waiting"]


def _incomplete(logs: list[dict[str, object]]) -> int:
    return sum(1 for e in logs if e["event"] == "lookup_incomplete")
