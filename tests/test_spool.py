"""The folder protocol, on real folders: claims, records, placement without overwrite."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.spool import FINISHING, Job, Owner, Spool, upload_name
from daemon.spool.markers import MarkerContendedError


def make_spool(root: Path, **kw: object) -> Spool:
    spool = Spool(root, ("email", "url"), **kw)  # type: ignore[arg-type]
    spool.prepare()
    return spool


def drop(spool: Spool, name: str, data: bytes = b"a@example.com\n") -> Path:
    path = spool.inbox("email") / name
    path.write_bytes(data)
    return path


def test_claim_moves_input_and_writes_record_first(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    job = spool.claim("email", drop(spool, "list.csv"), "multipart")
    assert job is not None
    assert not (spool.inbox("email") / "list.csv").exists()
    assert spool.input_path(job).read_bytes() == b"a@example.com\n"
    saved = spool.load(spool.job_dir(job))
    assert saved is not None and saved.source == "list.csv"
    assert job.file_name.startswith("list-")


def test_only_one_of_many_claimers_wins(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    path = drop(spool, "contested.csv")
    others = [Spool(tmp_path, ("email",), owner=Owner("h", n, "t")) for n in range(8)]
    won: list[Job] = []
    barrier = threading.Barrier(len(others))

    def claim(s: Spool) -> None:
        barrier.wait()
        job = s.claim("email", path, "multipart")
        if job is not None:
            won.append(job)

    threads = [threading.Thread(target=claim, args=(s,)) for s in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    # The losers left no job folders behind.
    assert [p.name for p in spool.jobs()] == [won[0].job]


@pytest.mark.slow
def test_a_clash_is_placed_in_constant_looks_among_100000_earlier_clashes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path)
    done = spool.root / "done" / "email"
    done.mkdir(parents=True, exist_ok=True)
    (done / "latest.csv").write_bytes(b"first\n")
    (tmp_path / "other").write_bytes(b"later\n")
    # A year of 5-minute drops of latest.csv, under either naming: hard links are cheap.
    for n in range(1, 50001):
        os.link(done / "latest.csv", done / f"latest-{n}.csv")
        os.link(tmp_path / "other", done / f"latest.20250101T{n:06}-0000{n % 10000:04}.csv")
    job = spool.claim("email", drop(spool, "latest.csv"), "multipart")
    assert job is not None
    spool.inspect(job)
    job.outcome = "done"
    looks: list[str] = []
    real = os.path.lexists

    def lexists(path: Any) -> bool:
        looks.append(str(path))
        return real(path)

    monkeypatch.setattr(os.path, "lexists", lexists)
    started = time.perf_counter()
    record = spool.finish(job)
    elapsed = time.perf_counter() - started
    monkeypatch.undo()
    assert record.name == f"latest.{job.job}.csv.json"
    assert len([p for p in looks if p.startswith(str(done))]) <= 6, looks
    assert elapsed < 1.0


def test_three_drops_of_latest_csv_get_three_names_and_nothing_is_overwritten(
        tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    records, jobs = [], []
    for content in (b"one@example.com\n", b"two@example.com\n", b"three@example.com\n"):
        job = spool.claim("email", drop(spool, "latest.csv", content), "multipart")
        assert job is not None
        spool.inspect(job)
        job.outcome = "done"
        job.results = {"all": "all"}
        (spool.results_dir(job)).mkdir()
        (spool.results_dir(job) / "all").write_bytes(b"result of " + content)
        records.append(spool.finish(job))
        jobs.append(job)
    done = spool.root / "done" / "email"
    second, third = (f"latest.{job.job}.csv" for job in jobs[1:])
    assert sorted(p.name for p in done.iterdir()) == sorted(
        f"{name}{suffix}" for name in ("latest.csv", second, third)
        for suffix in ("", ".json", ".all.csv"))
    assert second[7:22] <= third[7:22]  # the suffix sorts by claim time (to the second)
    assert (done / "latest.csv").read_bytes() == b"one@example.com\n"
    assert (done / third).read_bytes() == b"three@example.com\n"
    assert (done / f"{third}.all.csv").read_bytes() == b"result of three@example.com\n"
    record = json.loads(records[2].read_text())
    assert records[2] == done / f"{third}.json"
    assert record["source"] == "latest.csv" and record["bytes"] == len(b"three@example.com\n")
    assert record["results"] == {"all": f"{third}.all.csv"}
    assert list(spool.jobs()) == []


def test_finish_resumes_after_crash_halfway(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    job = spool.claim("email", drop(spool, "x.csv"), "multipart")
    assert job is not None
    job.outcome = "done"
    job.final_name = "x.csv"
    job.state = FINISHING
    spool.save(job)
    # The crash happened after the input was linked into done/ but before the record.
    os.link(spool.input_path(job), spool.root / "done" / "email" / "x.csv")
    reloaded = spool.load(spool.job_dir(job))
    assert reloaded is not None
    record = spool.finish(reloaded)
    assert record.name == "x.csv.json"
    assert sorted(p.name for p in (spool.root / "done" / "email").iterdir()) == [
        "x.csv", "x.csv.json"]


def test_inspect_finds_certain_refusals(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    cases = {
        b"": "empty",
        b"\n \r\n": "no rows",
        b"a@b.c\x00\n": "binary",
        b"caf\xe9@example.com\n": "not UTF-8",
        b"\xef\xbb\xbfa@example.com\r\nb@example.com": None,
    }
    for n, (data, problem) in enumerate(cases.items()):
        job = spool.claim("email", drop(spool, f"f{n}.csv", data), "multipart")
        assert job is not None
        found = spool.inspect(job)
        assert (found is None) if problem is None else (problem in (found or "")), (data, found)
        assert job.bytes == len(data)


def test_duplicate_marker_is_exclusive_and_expires(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    first = Job(job="j1", type="email", source="a.csv", file_name="a", method="multipart",
                sha256="ab" * 32)
    second = Job(job="j2", type="email", source="b.csv", file_name="b", method="multipart",
                 sha256="ab" * 32)
    (spool.processing / "j1").mkdir()  # j1 is under way
    assert spool.mark(first, 3600) is None
    earlier = spool.mark(second, 3600)
    assert earlier is not None and earlier["job"] == "j1"
    assert spool.mark(first, 3600) is None  # our own marker is not a duplicate
    # Expired: the window is shorter than the marker's age (made during this boot, its
    # age is told by the boot-time clock alone).
    marker = spool.markers / first.sha256  # type: ignore[operator]
    data = json.loads(marker.read_text())
    data["boottime"] -= 3601
    marker.write_text(json.dumps(data))
    assert spool.mark(second, 3600) is None
    assert json.loads(marker.read_text())["job"] == "j2"
    assert spool.mark(second, 0) is None  # window 0 turns the check off


def test_orphaned_by_dead_pid_or_stale_heartbeat(tmp_path: Path) -> None:
    me = make_spool(tmp_path)
    job = Job(job="j", type="email", source="a.csv", file_name="a", method="multipart")
    job.owner = f"{me.owner.host}:999999999:dead"
    assert me.orphaned(job)
    other = Spool(tmp_path, ("email",), owner=Owner("otherhost", 1, "tok"), lease_seconds=60)
    other.heartbeat()
    job.owner = other.owner.name
    now = [1000.0]
    me.leases.monotonic = lambda: now[0]  # our own clock; theirs is never read
    assert not me.orphaned(job)
    now[0] += 59
    other.heartbeat()  # a beat: the lease starts again, from when we saw it change
    now[0] += 59
    assert not me.orphaned(job)
    now[0] += 59
    assert not me.orphaned(job)
    # Their heartbeat stayed unchanged for a whole lease, by our clock: gone.
    now[0] += 2
    assert me.orphaned(job)


def test_upload_name_is_safe_and_unique() -> None:
    assert upload_name("My List (v2).csv", "20260101T000000-abcd1234") == "My_List__v2-abcd1234"
    assert upload_name("\n\u00e9.csv", "x-ffff") == "file-ffff"
    assert len(upload_name("a" * 255, "x-1234")) < 100


def test_a_marker_never_paid_for_dies_with_its_job(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    sha = "cd" * 32
    gone = Job(job="gone", type="email", source="a.csv", file_name="a", method="multipart",
               sha256=sha)
    assert spool.mark(gone, 3600) is None
    # Its job ended without an IPQS id (a crash after it went back to the inbox): stale.
    again = Job(job="again", type="email", source="a.csv", file_name="a", method="multipart",
                sha256=sha)
    (spool.processing / "again").mkdir()
    assert spool.mark(again, 3600) is None
    # Once paid for (an id), the marker holds even after its job is gone.
    again.id = 42
    spool.update_mark(again)
    (spool.processing / "again").rmdir()
    third = Job(job="third", type="email", source="a.csv", file_name="a", method="multipart",
                sha256=sha)
    earlier = spool.mark(third, 3600)
    assert earlier is not None and earlier["id"] == 42


def test_adoption_survives_an_adopter_that_died_half_way(tmp_path: Path) -> None:
    dead = Spool(tmp_path, ("email",), owner=Owner("h", 2**22 + 7, "dead"))
    dead.prepare()
    job = dead.claim("email", drop(dead, "x.csv"), "multipart")
    assert job is not None
    job_dir = dead.job_dir(job)
    me = Spool(tmp_path, ("email",), owner=Owner("h", os.getpid(), "me"))
    # An adopter moved the record aside and died before writing it back.
    crashed = Owner("h", 2**22 + 8, "crashed").name
    (job_dir / "job.json").rename(job_dir / f"job.json.adopt-{crashed}")
    assert me.load(job_dir) is not None  # the record is still found, aside
    won = me.adopt(job_dir)
    assert won is not None and won.owner == me.owner.name
    assert sorted(p.name for p in job_dir.iterdir() if p.name.startswith("job.json")) == [
        "job.json"]


def test_a_record_moved_aside_by_a_live_adopter_is_left_alone(tmp_path: Path) -> None:
    me = make_spool(tmp_path)
    job = me.claim("email", drop(me, "x.csv"), "multipart")
    assert job is not None
    job_dir = me.job_dir(job)
    live = Owner(me.owner.host, 1, "init")  # pid 1 lives as long as the system does
    (job_dir / "job.json").rename(job_dir / f"job.json.adopt-{live.name}")
    assert me.adopt(job_dir) is None


def test_every_change_of_a_job_is_announced(tmp_path: Path) -> None:
    changes: list[str] = []
    spool = make_spool(tmp_path, on_change=lambda: changes.append("changed"))
    job = spool.claim("email", drop(spool, "a.csv"), "multipart")
    assert job is not None and changes  # the claim (its record, then the rename)
    changes.clear()
    spool.save(job)
    assert changes == ["changed"]
    changes.clear()
    spool.unclaim(job)
    assert changes  # put back
    again = spool.claim("email", spool.inbox("email") / "a.csv", "multipart")
    assert again is not None
    again.outcome = "done"
    changes.clear()
    spool.finish(again)
    assert changes and changes[-1] == "changed"


#: Another daemon's marker for the same content, already paid for.
WINNER = {"job": "the-winner", "source": "b.csv", "type": "email", "id": 7,
          "created": time.time()}


def _sshfs_loser(real: Callable[..., Any], winner: Path | None) -> Callable[..., Any]:
    """An ``os.link``/``os.open`` that answers as SSHFS does to the loser of a race: the
    other mount's create lands first (``winner`` is written), then this call says EPERM."""
    linking = real is os.link

    def call(*args: Any, **kw: Any) -> Any:
        target = Path(args[1] if linking else args[0])
        if target.name.startswith("."):  # the temporary file: not part of the race
            return real(*args, **kw)
        if winner is not None:
            winner.write_text(json.dumps(WINNER))
        raise PermissionError(errno.EPERM, "Operation not permitted", str(target))

    return call


def test_a_losing_exclusive_create_that_says_eperm_means_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path / "spool")
    job = Job(job="j1", type="email", source="a.csv", file_name="a", method="multipart",
              sha256="ab" * 32)
    marker = spool.markers / job.sha256  # type: ignore[operator]
    monkeypatch.setattr(os, "link", _sshfs_loser(os.link, marker))
    # The marker is the winner's: this job is told it is a duplicate, nothing overwritten.
    assert spool.mark(job, 3600) == WINNER
    assert json.loads(marker.read_text()) == WINNER
    marker.unlink()
    # No hard links at all and the O_EXCL create loses with EPERM too.
    monkeypatch.setattr(os, "link", _sshfs_loser(os.link, None))
    monkeypatch.setattr(os, "open", _sshfs_loser(os.open, marker))
    assert spool.mark(job, 3600) == WINNER


def test_an_eperm_without_the_file_is_a_real_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path / "spool")
    job = Job(job="j1", type="email", source="a.csv", file_name="a", method="multipart",
              sha256="cd" * 32)
    monkeypatch.setattr(os, "link", _sshfs_loser(os.link, None))
    monkeypatch.setattr(os, "open", _sshfs_loser(os.open, None))
    with pytest.raises(PermissionError):
        spool.mark(job, 3600)


def test_our_own_lease_is_fresh_only_within_a_lease_of_the_last_heartbeat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import clocks

    spool = Spool(tmp_path, ("email",), lease_seconds=60)
    assert not spool.lease_fresh()  # never beat: nothing to vouch for us
    now = [500.0]
    monkeypatch.setattr(clocks, "boottime", lambda: now[0])
    spool.heartbeat()
    now[0] += 50
    assert spool.lease_fresh() and not spool.lease_fresh(margin=10)
    now[0] += 11  # frozen past the lease (the boot clock runs on): replaced, perhaps
    assert not spool.lease_fresh()
    spool.heartbeat()
    assert spool.lease_fresh(margin=59)


def test_an_earlier_daemon_in_this_process_is_gone_once_its_heartbeat_is_released(
        tmp_path: Path) -> None:
    earlier = Spool(tmp_path, ("email",), owner=Owner.current(), lease_seconds=60)
    earlier.heartbeat()
    job = Job(job="j", type="email", source="a.csv", file_name="a", method="multipart",
              owner=earlier.owner.name)
    me = Spool(tmp_path, ("email",), owner=Owner.current(), lease_seconds=60)
    assert me.owner.pid == earlier.owner.pid and not me.orphaned(job)  # its beat is there
    earlier.release()  # it stopped cleanly
    assert me.orphaned(job)


def test_a_marker_replaced_on_every_try_is_never_taken_as_ours(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path)
    job = Job(job="mine", type="email", source="a.csv", file_name="a", method="multipart",
              sha256="ef" * 32)
    tries: list[str] = []

    def another_writer_first(path: Path, data: bytes, mode: int) -> bool:
        # Each time, another writer's marker (of a job gone, never paid) got there first.
        tries.append(f"gone-{len(tries)}")
        path.write_text(json.dumps({"job": tries[-1], "holder": "daemon", "owner": "",
                                    "sending": False, "created": time.time()}))
        return False

    monkeypatch.setattr("daemon.spool.markers.exclusive_write", another_writer_first)
    with pytest.raises(MarkerContendedError):
        spool.mark(job, 3600)  # before: None, "ours", with no marker of ours at all
    assert len(tries) == 3
