"""Year-two housekeeping (issue 14, item 14): retention of outcomes and history, pruning of
duplicate markers, and the low-disk warning."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.config import Config, RetentionConfig, SpoolConfig, UploadConfig
from daemon.housekeeping import DAY, Housekeeper
from daemon.metrics import Metrics
from daemon.spool import Job, Spool
from daemon.spool.notices import new_notice
from tests.support import Sandbox, daemon_config, drop, emails, running, wait_for


def make_spool(root: Path) -> Spool:
    spool = Spool(root, ("email",))
    spool.prepare()
    return spool


def finished(spool: Spool, name: str, outcome: str, *, age_days: float,
             results: bool = True) -> Job:
    """A file put through claim and finish, its record (and files) made ``age_days`` old."""
    path = spool.inbox("email") / name
    path.write_bytes(emails(1, name))
    job = spool.claim("email", path, "multipart")
    assert job is not None
    if results:
        spool.results_dir(job).mkdir()
        (spool.results_dir(job) / "all").write_text("result\n")
        job.results = {"all": "all"}
    job.outcome = outcome
    record = spool.finish(job)
    stamp = time.time() - age_days * DAY
    for item in record.parent.glob(f"{job.final_name}*"):
        os.utime(item, (stamp, stamp))
    return job


def config(**retention: int) -> Config:
    return Config(retention=RetentionConfig(**retention))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_retention_deletes_old_outcomes_with_their_record_and_results(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    finished(spool, "old.csv", "done", age_days=31)
    finished(spool, "young.csv", "done", age_days=29)
    finished(spool, "data.json", "done", age_days=40)  # an input that ends in .json
    finished(spool, "bad.csv", "failed", age_days=8, results=False)
    finished(spool, "recent.csv", "failed", age_days=6, results=False)
    owed = finished(spool, "owed.csv", "done", age_days=90)
    spool.notices.write(new_notice(owed.job, "email", "done", "done/email/owed.csv.json",
                                   spool.owner.name))
    (spool.done("email") / "notes.json").write_text("{}")  # not a record of ours
    os.utime(spool.done("email") / "notes.json", (0, 0))
    metrics = Metrics()
    swept = Housekeeper(spool, config(done_days=30, failed_days=7), metrics).sweep()
    assert (swept.done, swept.failed, swept.history) == (2, 1, 0)
    assert names(spool.done("email")) == [
        "notes.json", "owed.csv", "owed.csv.all.csv", "owed.csv.json",
        "young.csv", "young.csv.all.csv", "young.csv.json"]
    assert names(spool.failed("email")) == ["recent.csv", "recent.csv.json"]
    assert metrics.expired.labels("done")._value.get() == 2
    assert metrics.expired.labels("failed")._value.get() == 1


def test_zero_days_keeps_everything_forever(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    finished(spool, "ancient.csv", "done", age_days=3650)
    finished(spool, "bad.csv", "failed", age_days=3650)
    swept = Housekeeper(spool, config(), Metrics()).sweep()
    assert swept.total() == 0
    assert len(names(spool.done("email"))) == 3 and len(names(spool.failed("email"))) == 3


def test_history_days_deletes_old_records_of_retried_files(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    history = spool.history("email")
    history.mkdir(parents=True)
    for stem, age in (("a.csv.20250101T000000Z", 100), ("a.csv.20261129T000000Z", 1)):
        (history / f"{stem}.json").write_text(json.dumps(
            {"job": "j", "results": {"all": "a.csv.all.csv"}}))
        (history / f"{stem}.all.csv").write_text("r\n")
        for name in (f"{stem}.json", f"{stem}.all.csv"):
            os.utime(history / name, (time.time() - age * DAY,) * 2)
    swept = Housekeeper(spool, config(history_days=30), Metrics()).sweep()
    assert swept.history == 1
    assert names(history) == ["a.csv.20261129T000000Z.all.csv", "a.csv.20261129T000000Z.json"]


def test_a_pass_is_bounded_and_the_next_one_continues(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    for i in range(5):
        finished(spool, f"f{i}.csv", "done", age_days=10, results=False)
    keeper = Housekeeper(spool, config(done_days=1), Metrics())
    keeper.max_deletions = 2
    assert keeper.sweep().done == 2
    assert keeper.due()  # cut short: the next round continues
    assert keeper.sweep().done == 2 and keeper.sweep().done == 1
    assert not keeper.due()  # done: the next pass is sweep_seconds away
    assert names(spool.done("email")) == []


def test_markers_older_than_the_duplicate_window_are_pruned(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    window = 24 * 3600.0
    now = time.time()
    spool.markers.mkdir(exist_ok=True)
    made = {"old": now - window - 60, "fresh": now - window + 600}
    for name, created in made.items():
        (spool.markers / name).write_text(json.dumps(
            {"job": name, "id": 7, "created": created}))
    (spool.markers / "torn").write_text("{")  # unreadable, judged by its age
    os.utime(spool.markers / "torn", (now - window - 1,) * 2)
    (spool.markers / ".fresh.1a2b.old").write_text("{}")  # mark()'s aside copy, old
    os.utime(spool.markers / ".fresh.1a2b.old", (now - window - 1,) * 2)
    keeper = Housekeeper(spool, Config(upload=UploadConfig(duplicate_window_hours=24)),
                         Metrics())
    swept = keeper.sweep()
    assert swept.markers == 2
    assert names(spool.markers) == ["fresh"]
    # What is left still guards its content: the daemon's own staleness rule agrees.
    assert not spool.marks.stale(json.loads((spool.markers / "fresh").read_text()), window)


def test_low_disk_is_said_once_and_clears(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    metrics = Metrics()
    # 1 PiB free is more than any test machine has.
    low = Config(spool=SpoolConfig(root=spool.root, min_free_mb=1024**3))
    keeper = Housekeeper(spool, low, metrics)
    with capture_logs() as logs:
        keeper.check_disk()
        keeper.check_disk()
        reason = keeper.low_disk()
        keeper.min_free = 0  # as if space were freed
        keeper.check_disk()
    assert reason is not None and "under spool.min_free_mb (1073741824)" in reason
    assert [e["event"] for e in logs] == ["low_disk", "disk_space_ok"]
    assert keeper.low_disk() is None
    assert metrics.low_disk._value.get() == 0
    assert metrics.spool_free_bytes._value.get() > 0


async def test_the_daemon_applies_retention_and_warns_of_low_disk_staying_ready(
        tmp_path: Path, sandbox: Sandbox) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, ("email",))
    spool.prepare()
    finished(spool, "old.csv", "done", age_days=3)
    cfg = daemon_config(root, sandbox.api_base, spool={"types": ("email",),
                                                       "min_free_mb": 1024**3},
                        retention={"done_days": 2})
    async with running(cfg) as service:
        await wait_for(lambda: not (root / "done/email/old.csv").exists(),
                       what="retention at start")
        ok, why = service.health.ready()
        # A warning, not unready: a sidecar's readiness is its whole pod's.
        assert ok and why.startswith("ready, but: low disk: ")
        assert "low disk" in service.refresh_gauges()
        assert b"ipqs_bulkd_low_disk 1.0" in service.pipe.metrics.render()
        drop(root, "email", "new.csv", emails(2))  # and files still go through
        await wait_for(lambda: (root / "done/email/new.csv.json").exists(), what="new file")
    assert names(root / "done" / "email") == ["new.csv", "new.csv.all.csv", "new.csv.json"]


@pytest.mark.parametrize("key", ["done_days", "failed_days", "history_days"])
def test_retention_days_must_not_be_negative(key: str) -> None:
    with pytest.raises(ValueError, match=f"retention.{key}"):
        RetentionConfig(**{key: -1})
