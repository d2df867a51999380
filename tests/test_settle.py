"""The settle table on a fake clock: every timing rule, deterministic, without sleeping.

The table does no I/O: each test says what a look "saw" (sizes, mtimes, inodes, writers)
and when, and checks what the table decides. The watcher tests cover the real looking.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from daemon.config import WatchConfig
from daemon.watcher.checks import Check, Probe
from daemon.watcher.settle import Candidate, Notice, Observation, Seen, SettleTable, Verdict

PROC = WatchConfig(settle_seconds=0.1, quiet_seconds=3.0, writer_check="proc",
                   rescan_seconds=30.0, queue_size=8)
QUIET = replace(PROC, writer_check="quiet")
WALL = 1_700_000_000.0  # the wall clock at monotonic 0
ROOM = 8
PATH = Path("/spool/inbox/email/list.csv")


def seen(size: int = 10, inode: int = 7, mtime: float = WALL, kind: str = "regular") -> Seen:
    return Seen(kind, dev=1, inode=inode, size=size, mtime_ns=int(mtime * 1e9))


class Clock:
    """A fake monotonic clock that tests move by hand; the wall clock moves with it."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    @property
    def wall(self) -> float:
        return WALL + self.now


def look(table: SettleTable, clock: Clock, saw: dict[Path, Seen | None],
         writers: frozenset[tuple[int, int]] = frozenset(),
         visible: bool | None = None) -> Verdict:
    """One settle round: plan, "look" (the test says what was seen), apply."""
    plan = table.plan(clock.now, ROOM)
    observed = Observation({p: saw.get(p) for p in plan.paths}, writers, visible, clock.wall)
    return table.apply(plan, observed, clock.now)


def probed(table: SettleTable, clock: Clock, saw: dict[Path, Seen | None],
           answers: dict[Path, Probe], visible: bool | None = None) -> Verdict:
    """One settle round in which the lease probes the table asked for answered ``answers``."""
    plan = table.plan(clock.now, ROOM)
    assert set(answers) <= set(plan.probes), "answered a probe the table did not ask for"
    observed = Observation({p: saw.get(p) for p in plan.paths}, visible=visible,
                           wall=clock.wall, lease=answers)
    return table.apply(plan, observed, clock.now)


def settle_time(table: SettleTable, clock: Clock, file: Seen, step: float = 0.01,
                limit: float = 10.0) -> float:
    """Advance the clock in small steps, looking whenever the table says a file is due,
    until the file settles; hand it off and return when it settled."""
    while clock.now < limit:
        if table.due(clock.now, ROOM):
            verdict = look(table, clock, {PATH: file})
            if verdict.ready:
                table.hand_off(verdict.ready[0])
                return clock.now
        clock.advance(step)
    raise AssertionError("never settled")


def noticed(settings: WatchConfig, file: Seen, clock: Clock) -> SettleTable:
    table = SettleTable(settings, max_pending=100)
    assert table.notice("email", PATH, file, clock.now, clock.wall) is Notice.NEW
    return table


# -- windows ---------------------------------------------------------------------------------


def test_quiet_mode_waits_the_window_for_a_fresh_file() -> None:
    clock = Clock()
    file = seen(mtime=clock.wall)  # written just now
    table = noticed(QUIET, file, clock)
    assert settle_time(table, clock, file) == pytest.approx(QUIET.quiet_seconds, abs=0.011)


def test_quiet_mode_takes_a_long_still_file_after_the_settle_window() -> None:
    clock = Clock()
    file = seen(mtime=clock.wall - 60)  # written a minute ago, renamed in now
    table = noticed(QUIET, file, clock)
    assert settle_time(table, clock, file) == pytest.approx(QUIET.settle_seconds, abs=0.011)


def test_quiet_mode_gives_no_mtime_credit_with_polling() -> None:
    # Network file systems: the server's clock is not ours, so mtimes are not trusted.
    clock = Clock()
    file = seen(mtime=clock.wall - 60)
    table = noticed(replace(QUIET, force_polling=True), file, clock)
    assert settle_time(table, clock, file) >= QUIET.quiet_seconds


def test_proc_mode_waits_only_the_settle_window() -> None:
    clock = Clock()
    file = seen()
    table = noticed(PROC, file, clock)
    assert settle_time(table, clock, file) == pytest.approx(PROC.settle_seconds, abs=0.011)


@pytest.mark.parametrize("how", ["append", "replace"])
def test_change_during_settling_restarts_the_window(how: str) -> None:
    settings = replace(QUIET, quiet_seconds=0.6)
    clock = Clock()
    table = noticed(settings, seen(size=6), clock)
    clock.advance(0.3)  # the writer pauses, well inside the window
    inode = 7 if how == "append" else 8
    changed = seen(size=18, inode=inode, mtime=clock.wall)
    table.mark_dirty("email", PATH)  # the event for the change
    assert look(table, clock, {PATH: changed}).ready == []
    assert table.due(0.6 + 0.29, ROOM) == []  # the first window would have ended at 0.6
    [entry] = table.due(0.3 + 0.6, ROOM)  # the window restarted from the change
    assert entry.candidate() == Candidate("email", PATH, 18, changed.mtime_ns, inode)
    assert settle_time(table, clock, changed) - 0.3 >= 0.6 - 1e-9


def test_a_writer_holding_the_file_open_keeps_it_pending() -> None:
    clock = Clock()
    file = seen()
    table = noticed(PROC, file, clock)
    clock.advance(PROC.settle_seconds)
    held = look(table, clock, {PATH: file}, writers=frozenset({file.key}), visible=True)
    assert held.ready == []
    assert table.due(clock.now + PROC.settle_seconds - 0.01, ROOM) == []
    clock.advance(5.0)  # still open, unchanged, for a long time
    assert look(table, clock, {PATH: file}, writers=frozenset({file.key})).ready == []
    clock.advance(PROC.settle_seconds + 0.001)  # the writer let go
    assert [e.path for e in look(table, clock, {PATH: file}).ready] == [PATH]


def test_auto_mode_uses_the_quiet_window_once_writers_cannot_be_seen() -> None:
    clock = Clock()
    file = seen()
    table = SettleTable(replace(PROC, writer_check="auto"), max_pending=100)
    table.checks.refuse("no CAP_LEASE")  # where no lease can be taken, /proc decides
    table.probed(True)
    assert table.window() == PROC.settle_seconds
    table.notice("email", PATH, file, clock.now, clock.wall)
    clock.advance(PROC.settle_seconds)
    verdict = look(table, clock, {PATH: file}, visible=False)  # one process went unreadable
    assert verdict.visibility_changed and verdict.ready == []
    assert table.window() == PROC.quiet_seconds
    assert settle_time(table, clock, file) >= PROC.quiet_seconds


# -- what is due, and when ---------------------------------------------------------------------


def test_due_is_oldest_first_and_bounded_by_room() -> None:
    clock = Clock()
    table = SettleTable(PROC, max_pending=100)
    paths = [PATH.with_name(f"{n}.csv") for n in range(5)]
    for n, path in enumerate(paths):
        table.notice("email", path, seen(inode=n), clock.advance(0.01), clock.wall)
    assert table.next_due(clock.now, ROOM) == pytest.approx(0.06)
    clock.advance(1.0)
    assert [e.path for e in table.due(clock.now, 3)] == paths[:3]
    assert table.due(clock.now, 0) == []
    assert table.next_due(clock.now, 0) is None  # no room: only a take or release wakes


def test_an_idle_table_needs_no_timer() -> None:
    clock = Clock()
    table = noticed(PROC, seen(), clock)
    clock.advance(1.0)
    [entry] = look(table, clock, {PATH: seen()}).ready
    table.hand_off(entry)
    assert table.next_due(clock.now, ROOM) is None
    assert not table.has_work(clock.now + 1000, ROOM)


def test_a_file_gone_or_replaced_by_a_non_file_is_dropped() -> None:
    clock = Clock()
    table = SettleTable(PROC, max_pending=100)
    other = PATH.with_name("other.csv")
    table.notice("email", PATH, seen(), clock.now, clock.wall)
    table.notice("email", other, seen(inode=9), clock.now, clock.wall)
    clock.advance(1.0)
    verdict = look(table, clock, {PATH: None, other: seen(inode=9, kind="fifo")})
    assert verdict.ready == []
    assert [(p, s.kind if s else None) for p, s in verdict.dropped] == [
        (PATH, None), (other, "fifo")]
    assert table.pending_count() == 0


def test_a_look_that_failed_changes_nothing() -> None:
    clock = Clock()
    table = noticed(PROC, seen(), clock)
    table.mark_dirty("email", PATH.with_name("new.csv"))
    clock.advance(1.0)
    first = table.plan(clock.now, ROOM)  # ...and the look raised: apply is never called
    again = table.plan(clock.now, ROOM)
    assert again.paths == first.paths == [PATH, PATH.with_name("new.csv")]


# -- hand-off and release -----------------------------------------------------------------------


def test_in_flight_is_not_offered_again_until_released() -> None:
    clock = Clock()
    table = noticed(PROC, seen(), clock)
    clock.advance(1.0)
    [entry] = look(table, clock, {PATH: seen()}).ready
    assert table.hand_off(entry).path == PATH
    assert table.in_flight_count() == 1
    assert table.notice("email", PATH, seen(inode=8), clock.now, clock.wall) is Notice.KNOWN
    assert table.oldest_noticed() == 0.0  # settled but not released still counts as waiting
    table.mark_dirty("email", PATH)  # a new file of that name, while the claim runs
    assert PATH not in table.plan(clock.now, ROOM).paths
    assert table.release(PATH)
    assert not table.release(PATH)  # a second release is a no-op
    assert table.oldest_noticed() is None
    assert table.plan(clock.now, ROOM).paths == [PATH]  # looked at again, now


def test_no_room_leaves_files_for_a_later_scan() -> None:
    clock = Clock()
    table = SettleTable(PROC, max_pending=4)
    outcomes = [table.notice("email", PATH.with_name(f"{n}.csv"), seen(inode=n), clock.now,
                             clock.wall) for n in range(6)]
    assert outcomes.count(Notice.NEW) == 4 and outcomes[4:] == [Notice.NO_ROOM] * 2
    assert table.backlog and not table.needs_refill()
    clock.advance(1.0)
    for entry in look(table, clock, {PATH.with_name(f"{n}.csv"): seen(inode=n)
                                     for n in range(4)}).ready:
        table.hand_off(entry)
        table.release(entry.path)
    assert table.needs_refill()  # the load fell to half the bound: scan again
    table.scan_started()
    table.scan_finished(truncated=False)
    assert not table.backlog


def test_non_regular_and_gone_paths_are_not_noticed() -> None:
    table = SettleTable(PROC, max_pending=100)
    assert table.notice("email", PATH, None, 0.0, WALL) is Notice.KNOWN
    assert table.notice("email", PATH, seen(kind="symlink"), 0.0, WALL) is Notice.NOT_REGULAR
    assert table.load() == 0


# -- lease probes (daemon.watcher.checks) ----------------------------------------------------

LEASE = replace(PROC, writer_check="lease")
AUTO = replace(PROC, writer_check="auto")


@pytest.mark.parametrize("settings", [LEASE, AUTO], ids=["lease", "auto"])
def test_a_lease_probe_holds_a_file_while_a_writer_has_it_open(settings: WatchConfig) -> None:
    clock = Clock()
    file = seen()
    table = noticed(settings, file, clock)
    assert table.window() == settings.settle_seconds  # a writer would be seen: no quiet wait
    for _ in range(3):  # a writer paused far longer than quiet_seconds: still held
        clock.advance(settings.quiet_seconds)
        verdict = probed(table, clock, {PATH: file}, {PATH: Probe.WRITER})
        assert verdict.ready == []
    assert verdict.held_back == []  # counted once, on the first probe that saw the writer
    clock.advance(settings.settle_seconds + 0.001)  # the writer closed the file
    assert [e.path for e in probed(table, clock, {PATH: file}, {PATH: Probe.FREE}).ready] == [PATH]


def test_the_first_writer_seen_by_a_lease_is_reported_once() -> None:
    clock = Clock()
    table = noticed(LEASE, seen(), clock)
    clock.advance(LEASE.settle_seconds)
    assert probed(table, clock, {PATH: seen()}, {PATH: Probe.WRITER}).held_back == [PATH]


def test_a_probe_asked_for_and_not_answered_never_hands_a_file_on() -> None:
    clock = Clock()
    file = seen()
    table = noticed(AUTO, file, clock)
    for _ in range(5):
        clock.advance(AUTO.quiet_seconds)
        assert look(table, clock, {PATH: file}).ready == []


def test_a_file_system_without_leases_falls_back_alone_and_is_reported_once() -> None:
    clock = Clock()
    local, remote = seen(), replace(seen(inode=8), dev=2)
    other = PATH.with_name("remote.csv")
    table = SettleTable(AUTO, max_pending=100)
    table.notice("email", PATH, local, clock.now, clock.wall)
    table.notice("email", other, remote, clock.now, clock.wall)
    clock.advance(AUTO.settle_seconds)
    verdict = probed(table, clock, {PATH: local, other: remote},
                     {PATH: Probe.FREE, other: Probe.UNSUPPORTED})
    assert [e.path for e in verdict.ready] == [PATH]  # the lease saw no writer: settled
    assert {(c.dev, c.check) for c in verdict.choices} == {(1, Check.LEASE), (2, Check.QUIET)}
    assert verdict.refused is None
    table.hand_off(verdict.ready[0])
    # dev 2 now waits for the quiet window, with no probe asked for
    assert table.plan(clock.now + AUTO.settle_seconds, ROOM).due == []
    clock.advance(AUTO.quiet_seconds)
    plan = table.plan(clock.now, ROOM)
    assert plan.probes == {} and plan.targets == frozenset({remote.key})
    verdict = probed(table, clock, {other: remote}, {})
    assert [e.path for e in verdict.ready] == [other] and verdict.choices == []


def test_a_refused_lease_falls_back_everywhere_and_says_so_once() -> None:
    clock = Clock()
    file = seen()
    table = noticed(LEASE, file, clock)
    clock.advance(LEASE.settle_seconds)
    verdict = probed(table, clock, {PATH: file}, {PATH: Probe.DENIED}, visible=True)
    assert verdict.ready == [] and verdict.refused is not None and "CAP_LEASE" in verdict.refused
    assert [c.check for c in verdict.choices] == [Check.QUIET]  # "lease" never falls back to /proc
    assert table.window() == LEASE.quiet_seconds
    assert table.plan(clock.now + 1.0, ROOM).due == []
    clock.advance(LEASE.quiet_seconds)
    verdict = look(table, clock, {PATH: file})
    assert verdict.ready and verdict.refused is None and verdict.choices == []


def test_auto_falls_back_to_proc_where_it_sees_everyone() -> None:
    table = SettleTable(AUTO, max_pending=100)
    table.probed(True)
    assert table.check() is Check.LEASE
    table.checks.refuse("no CAP_LEASE")
    assert table.check() is Check.PROC and table.window() == AUTO.settle_seconds
    table.probed(False)
    assert table.check() is Check.QUIET and table.window() == AUTO.quiet_seconds


def test_a_file_that_cannot_be_opened_for_a_probe_waits_for_the_quiet_window() -> None:
    clock = Clock()
    file = seen()
    table = noticed(LEASE, file, clock)
    clock.advance(LEASE.settle_seconds)
    assert probed(table, clock, {PATH: file}, {PATH: Probe.BLIND}).ready == []
    assert table.window() == LEASE.settle_seconds  # other files still get a lease
    assert settle_time(table, clock, file) >= LEASE.quiet_seconds


def test_quiet_and_proc_modes_never_probe() -> None:
    for settings in (QUIET, PROC):
        clock = Clock()
        table = noticed(settings, seen(), clock)
        clock.advance(settings.quiet_seconds)
        plan = table.plan(clock.now, ROOM)
        assert plan.due and plan.probes == {}
