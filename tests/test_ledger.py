"""The daily row budget in the spool: limits, durability, and real processes racing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest

from daemon.spool.ledger import Ledger, Limits, TornEntryError, utc_day

DAY = date(2026, 11, 30)


def test_a_day_is_the_utc_calendar_day():
    assert utc_day(1_796_083_199.0) == date(2026, 11, 30)  # 2026-11-30 23:59:59 UTC
    assert utc_day(1_796_083_200.0) == date(2026, 12, 1)   # midnight UTC, whatever TZ says


def test_reservations_stop_at_the_daily_budget(tmp_path: Path):
    ledger = Ledger(tmp_path, Limits(per_day=50))
    admitted = [ledger.reserve(f"job{n}", "email", 10, DAY) for n in range(10)]
    assert admitted == [True] * 5 + [False] * 5
    assert ledger.used(DAY) == {"email": 50}
    assert ledger.refusal("email", 10, DAY) == (
        "daily budget: 50 of 50 rows used today (UTC), next file needs 10")
    assert ledger.refusal("email", 0, DAY) is None
    assert ledger.used(date(2026, 12, 1)) == {}  # the next UTC day starts from nothing
    assert ledger.reserve("job9", "email", 10, date(2026, 12, 1))


def test_per_type_budgets_and_a_file_that_never_fits_does_not_block_smaller_ones(
    tmp_path: Path,
):
    ledger = Ledger(tmp_path, Limits(per_day=100, per_type={"email": 30}))
    assert not ledger.reserve("huge", "phone", 101, DAY)
    assert ledger.reserve("e1", "email", 20, DAY)
    assert not ledger.reserve("e2", "email", 11, DAY)
    assert ledger.refusal("email", 11, DAY) == (
        "daily email budget: 20 of 30 rows used today (UTC), next file needs 11")
    assert ledger.reserve("e3", "email", 10, DAY)
    assert ledger.reserve("p1", "phone", 70, DAY)
    assert ledger.used(DAY) == {"email": 30, "phone": 70}
    assert ledger.limits.left(ledger.used(DAY), "phone") == 0
    assert Limits().left({}, "email") is None


def test_reserve_is_idempotent_per_job_and_release_gives_rows_back(tmp_path: Path):
    ledger = Ledger(tmp_path, Limits(per_day=25))
    assert ledger.reserve("a", "email", 20, DAY)
    assert ledger.reserve("a", "email", 20, DAY)  # a resumed job: no second reservation
    assert ledger.used(DAY) == {"email": 20}
    assert not ledger.reserve("b", "email", 10, DAY)
    assert ledger.release("a", DAY) == 20
    assert ledger.release("a", DAY) == 0
    assert ledger.used(DAY) == {}
    assert ledger.reserve("b", "email", 10, DAY)
    assert ledger.reserve("a", "email", 15, DAY)  # reserved again after its release
    assert ledger.used(DAY) == {"email": 25}


def test_the_ledger_survives_a_restart_and_is_shared(tmp_path: Path):
    first = Ledger(tmp_path, Limits(per_day=30))
    assert first.reserve("a", "email", 20, DAY)
    second = Ledger(tmp_path, Limits(per_day=30))  # a restart, or a second daemon
    assert second.used(DAY) == {"email": 20}
    assert not second.reserve("b", "phone", 11, DAY)
    assert second.reserve("b", "phone", 10, DAY)
    assert not first.reserve("c", "email", 1, DAY)  # first sees second's entry
    assert first.used(DAY) == {"email": 20, "phone": 10}
    entries = sorted((tmp_path / "budget" / "2026-11-30").iterdir())
    assert [p.name for p in entries] == ["00000001", "00000002"]
    assert json.loads(entries[1].read_text()) == {"job": "b", "type": "phone", "rows": 10}


def test_unknown_rows_count_nothing(tmp_path: Path):
    ledger = Ledger(tmp_path, Limits(per_day=10))
    assert ledger.reserve("link", "url", 0, DAY)
    assert ledger.used(DAY) == {} and not (tmp_path / "budget").exists()


def test_without_hard_links_exclusive_create_still_decides(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    first, second = Ledger(tmp_path, Limits(per_day=15)), Ledger(tmp_path, Limits(per_day=15))
    assert first.reserve("a", "email", 10, DAY)
    assert not second.reserve("b", "email", 10, DAY)
    assert second.reserve("b", "email", 5, DAY)
    assert first.used(DAY) == {"email": 15}
    assert not list((tmp_path / "budget" / "2026-11-30").glob(".*.tmp"))


def test_an_entry_that_cannot_be_read_admits_nothing_more(tmp_path: Path):
    ledger = Ledger(tmp_path, Limits(per_day=100))
    folder = tmp_path / "budget" / "2026-11-30"
    folder.mkdir(parents=True)
    (folder / "00000001").write_bytes(b"")  # a writer without hard links died mid-way
    assert not ledger.reserve("a", "email", 1, DAY)
    with pytest.raises(TornEntryError):
        ledger.used(DAY)


def test_prune_removes_older_days_only(tmp_path: Path):
    ledger = Ledger(tmp_path, Limits(per_day=10))
    for day in (date(2026, 11, 28), date(2026, 11, 29), DAY):
        assert ledger.reserve("a", "email", 1, day)
    (tmp_path / "budget" / "not-a-day").mkdir()
    assert ledger.prune(date(2026, 11, 29)) == 1
    assert sorted(p.name for p in (tmp_path / "budget").iterdir()) == [
        "2026-11-29", "2026-11-30", "not-a-day"]


_RACER = textwrap.dedent("""
    import json, os, sys, time
    from datetime import date
    from pathlib import Path
    from daemon.spool.ledger import Ledger, Limits
    root, name, budget, sizes, go = sys.argv[1:6]
    ledger = Ledger(Path(root), Limits(per_day=int(budget)))
    while not os.path.exists(go):
        time.sleep(0.001)
    won = []
    for n, rows in enumerate(json.loads(sizes)):
        if ledger.reserve(f"{name}-{n}", "email", rows, date(2026, 11, 30)):
            won.append(rows)
    print(json.dumps(won))
""")


def race(tmp_path: Path, budget: int, sizes: list[list[int]]) -> list[list[int]]:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), f"p{i}", str(budget),
             json.dumps(mine), str(go)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
        )
        for i, mine in enumerate(sizes)
    ]
    go.touch()  # the start line: every racer waits for this file
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


def test_two_processes_racing_never_exceed_the_budget(tmp_path: Path):
    won = race(tmp_path, 50, [[10] * 10, [10] * 10])
    assert sum(map(sum, won)) == 50  # exactly 5 of the 20 ten-row files, between them
    assert Ledger(tmp_path, Limits()).used(DAY) == {"email": 50}


def test_four_processes_with_uneven_files_never_exceed_the_budget(tmp_path: Path):
    sizes = [[(7 * n + 13 * i) % 37 + 1 for n in range(150)] for i in range(4)]
    won = race(tmp_path, 1000, sizes)
    total = sum(map(sum, won))
    assert total <= 1000
    assert Ledger(tmp_path, Limits()).used(DAY) == {"email": total}
    assert total >= 1000 - 37  # and it fills up: no admission was lost to the races
