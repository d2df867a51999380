"""The watcher against real folders, real files and real writer processes.

Nothing here sleeps to make a test pass: tests wait on conditions with a deadline. The
only pauses are a writer's own (a writer that pauses is the case being tested).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.watcher import Candidate, Watcher, WatchSettings, is_ignored
from daemon.watcher import scan as scan_module

FAST = WatchSettings(
    settle_seconds=0.1,
    quiet_seconds=0.3,
    writer_check="proc",
    rescan_seconds=30.0,  # long: a test that passes must not owe it to the rescan
    queue_size=8,
)

# Holds the file open for its whole run and pauses after every chunk, the last one too:
# a settle check that only looks at the size would hand the file on during a pause.
WRITER = """
import sys, time
path, chunks, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with open(path, "wb") as out:
    for n in range(chunks):
        out.write(b"%d,someone@example.com\\n" % n * 50)
        out.flush()
        time.sleep(pause)
"""


@pytest.fixture
def inboxes(tmp_path: Path) -> dict[str, Path]:
    """Two inbox folders, not created yet: the watcher must create them."""
    return {t: tmp_path / "inbox" / t for t in ("email", "phone")}


@asynccontextmanager
async def running(watcher: Watcher, stop: asyncio.Event) -> AsyncIterator[asyncio.Task[None]]:
    """Run the watcher for the body of the block; stop it and check it ends promptly."""
    task = asyncio.create_task(watcher.run())
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=3)
        watcher.close()


def make(inboxes: dict[str, Path], settings: WatchSettings = FAST) -> tuple[Watcher, asyncio.Event]:
    stop = asyncio.Event()
    return Watcher(inboxes, settings, stop), stop


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for ``condition`` to hold, failing the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def take(watcher: Watcher, within: float = 5.0) -> Candidate:
    candidate = await asyncio.wait_for(watcher.take(), within)
    assert candidate is not None
    return candidate


async def assert_nothing_more(watcher: Watcher, within: float = 0.4) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watcher.take(), within)


def drop(folder: Path, name: str, data: bytes = b"email\na@example.com\n") -> Path:
    """Deliver a complete file the safe way: write a hidden temp file, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.part"
    temp.write_bytes(data)
    final = folder / name
    temp.rename(final)
    return final


def holds_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (False once it has exited)."""
    target = path.stat()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            st = fd.stat()
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


@contextmanager
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as entries:
        yield entries


def events(entries: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in entries if e["event"] == name]


# -- the happy path -------------------------------------------------------------------------


async def test_renamed_in_file_is_queued_once_and_fast(inboxes: dict[str, Path]) -> None:
    watcher, stop = make(inboxes)
    async with running(watcher, stop):
        await until(inboxes["email"].is_dir)
        started = time.monotonic()
        path = drop(inboxes["email"], "list.csv")
        candidate = await take(watcher)
        latency = time.monotonic() - started
        st = path.stat()
        assert candidate == Candidate("email", path, st.st_size, st.st_mtime_ns, st.st_ino)
        assert latency < 1.5  # typically ~0.2 s: event step plus the settle window
        assert await watcher.scan_once() == 0  # in flight: not offered twice
        await assert_nothing_more(watcher)
        assert watcher.pending_count() == 0
        # Settled but not yet claimed still counts as waiting, until the consumer is done.
        assert watcher.oldest_pending_age() is not None
        watcher.release(path)
        assert watcher.oldest_pending_age() is None


async def test_release_lets_a_reappearing_file_be_offered_again(
    inboxes: dict[str, Path],
) -> None:
    watcher, stop = make(inboxes)  # rescan in 30 s: events and release must do it
    async with running(watcher, stop):
        await until(inboxes["phone"].is_dir)
        drop(inboxes["phone"], "a.csv")
        first = await take(watcher)
        assert watcher.in_flight_count() == 1
        first.path.unlink()  # what a claim does
        drop(inboxes["phone"], "a.csv", b"phone\n15551234567\n")  # before release
        await assert_nothing_more(watcher, 0.3)  # still in flight: not offered twice
        watcher.release(first.path)
        assert watcher.in_flight_count() == 0
        second = await take(watcher)
        assert second.path == first.path
        assert second.size == len(b"phone\n15551234567\n")
        second.path.unlink()
        watcher.release(second.path)
        drop(inboxes["phone"], "a.csv", b"phone\n")  # after release: a plain new file
        assert (await take(watcher)).size == len(b"phone\n")


async def test_ignored_names_are_never_queued(inboxes: dict[str, Path]) -> None:
    names = [".hidden.csv", "a.tmp", "b.part", "c.partial", "d.crdownload", "e.csv~", "F.TMP"]
    for name in names:
        (inboxes["email"] / name).parent.mkdir(parents=True, exist_ok=True)
        (inboxes["email"] / name).write_bytes(b"x\n")
    watcher, stop = make(inboxes)
    async with running(watcher, stop):
        # The ignored files are older than this one: had they counted, they would come first.
        sentinel = drop(inboxes["email"], "sentinel.csv")
        assert (await take(watcher)).path == sentinel
        for name in names:
            (inboxes["email"] / name).write_bytes(b"x\ny\n")  # events for them too
        assert await watcher.scan_once() == 0
        await assert_nothing_more(watcher)
        assert watcher.pending_count() == 0


async def test_rsync_style_temp_file_is_queued_once_with_final_size(
    inboxes: dict[str, Path],
) -> None:
    watcher, stop = make(inboxes)
    async with running(watcher, stop):
        await until(inboxes["email"].is_dir)
        temp = inboxes["email"] / ".big.csv.Xy12Ab"
        with temp.open("wb") as out:
            for n in range(20):
                out.write(b"%d,x@example.com\n" % n * 500)
                out.flush()
        final = inboxes["email"] / "big.csv"
        temp.rename(final)
        candidate = await take(watcher)
        assert candidate.path == final
        assert candidate.size == final.stat().st_size
        await assert_nothing_more(watcher)


# -- what is not a regular file --------------------------------------------------------------


async def test_non_regular_entries_are_skipped_and_logged_once(
    inboxes: dict[str, Path], tmp_path: Path
) -> None:
    folder = inboxes["email"]
    folder.mkdir(parents=True)
    real = tmp_path / "outside.csv"
    real.write_bytes(b"email\nsecret@example.com\n")
    (folder / "link.csv").symlink_to(real)
    (folder / "dangling.csv").symlink_to(tmp_path / "nowhere.csv")
    os.mkfifo(folder / "pipe.csv")  # opening it would hang the watcher
    (folder / "folder.csv").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "sock.csv"))
    expected = {
        "link.csv": "symlink",
        "dangling.csv": "symlink",
        "pipe.csv": "fifo",
        "folder.csv": "directory",
        "sock.csv": "socket",
    }
    watcher, stop = make(inboxes)
    try:
        with logs() as entries:
            async with running(watcher, stop):
                sentinel = drop(folder, "sentinel.csv")
                assert (await take(watcher)).path == sentinel
                for _ in range(2):
                    assert await watcher.scan_once() == 0
                (folder / "pipe.csv").unlink()
                await watcher.scan_once()  # forgets the fifo that went away
                os.mkfifo(folder / "pipe.csv")
                await watcher.scan_once()
                await assert_nothing_more(watcher, 0.2)
    finally:
        sock.close()
    skipped = events(entries, "file_skipped_not_regular")
    logged = sorted((Path(e["path"]).name, e["kind"]) for e in skipped)
    assert logged == sorted([*expected.items(), ("pipe.csv", "fifo")])  # the new fifo again


# -- writers -----------------------------------------------------------------------------------


async def write_slowly(
    path: Path, chunks: int = 3, pause: float = 1.0
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), str(chunks), str(pause)
    )


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(FAST, id="proc"),
        pytest.param(replace(FAST, writer_check="auto"), id="auto"),
        # ~5 s: three 1 s writer pauses, then the 2.5 s quiet window.
        pytest.param(replace(FAST, writer_check="quiet", quiet_seconds=2.5), id="quiet",
                     marks=pytest.mark.slow),
    ],
)
async def test_file_held_open_by_a_pausing_writer_is_never_handed_on_early(
    inboxes: dict[str, Path], settings: WatchSettings
) -> None:
    watcher, stop = make(inboxes, settings)
    async with running(watcher, stop):
        await until(inboxes["email"].is_dir)
        path = inboxes["email"] / "slow.csv"
        writer = await write_slowly(path)
        try:
            candidate = await take(watcher, within=15)
            still_writing = holds_open(writer.pid, path)
        finally:
            assert await asyncio.wait_for(writer.wait(), 10) == 0
        assert not still_writing
        assert candidate.size == path.stat().st_size == 3 * 50 * len(b"0,someone@example.com\n")
        await assert_nothing_more(watcher, 0.3)


@pytest.mark.parametrize("how", ["append", "replace"])
async def test_change_during_settling_restarts_the_window(
    inboxes: dict[str, Path], how: str
) -> None:
    settings = replace(FAST, writer_check="quiet", quiet_seconds=0.6)
    watcher, stop = make(inboxes, settings)
    async with running(watcher, stop):
        path = drop(inboxes["phone"], "grow.csv", b"phone\n")
        await until(lambda: watcher.pending_count() == 1)
        await asyncio.sleep(0.3)  # the writer pauses, well inside the window
        if how == "append":
            with path.open("ab") as out:
                out.write(b"15551234567\n")
        else:
            drop(inboxes["phone"], "grow.csv", b"phone\n15551234567\n")
        changed = time.monotonic()
        candidate = await take(watcher)
        assert time.monotonic() - changed >= 0.6 - 0.05
        assert candidate.size == len(b"phone\n15551234567\n")
        assert candidate.inode == path.stat().st_ino


async def test_file_deleted_while_pending_is_dropped(inboxes: dict[str, Path]) -> None:
    settings = replace(FAST, writer_check="quiet", quiet_seconds=30.0)
    watcher, stop = make(inboxes, settings)
    async with running(watcher, stop):
        path = drop(inboxes["email"], "oops.csv")
        await until(lambda: watcher.pending_count() == 1)
        age = watcher.oldest_pending_age()
        assert age is not None and age >= 0
        path.unlink()
        await until(lambda: watcher.pending_count() == 0)
        assert watcher.oldest_pending_age() is None
        assert watcher.queued_count() == 0


# -- the folders themselves ---------------------------------------------------------------------


async def test_inbox_deleted_at_runtime_is_recreated_and_watched(
    inboxes: dict[str, Path],
) -> None:
    watcher, stop = make(inboxes)  # rescan in 30 s: only the watch can notice in time
    with logs() as entries:
        async with running(watcher, stop):
            await until(inboxes["email"].is_dir)
            shutil.rmtree(inboxes["email"])
            await until(inboxes["email"].is_dir)
            first = drop(inboxes["email"], "first.csv")
            assert (await take(watcher)).path == first
            second = drop(inboxes["email"], "second.csv")
            assert (await take(watcher, within=3)).path == second
    recreated = events(entries, "inbox_recreated")
    assert [e["type"] for e in recreated] == ["email"]


async def test_force_polling_sees_new_files(inboxes: dict[str, Path]) -> None:
    settings = replace(FAST, force_polling=True, poll_delay_ms=100)
    watcher, stop = make(inboxes, settings)
    async with running(watcher, stop):
        warmup = drop(inboxes["email"], "warmup.csv")  # after this, the watch is running
        assert (await take(watcher)).path == warmup
        path = drop(inboxes["phone"], "polled.csv")
        assert (await take(watcher, within=3)).path == path


# -- many files ---------------------------------------------------------------------------------


async def test_thousands_of_waiting_files_are_delivered_once_within_bounds(
    inboxes: dict[str, Path],
) -> None:
    expected = set()
    for type_, count in (("email", 1500), ("phone", 500)):
        inboxes[type_].mkdir(parents=True)
        for n in range(count):
            path = inboxes[type_] / f"{n:05}.csv"
            path.write_bytes(b"x\n")
            expected.add(path)
    watcher, stop = make(inboxes)  # queue_size=8
    seen: list[Candidate] = []
    most_pending = 0
    async with running(watcher, stop):
        while len(seen) < len(expected):
            candidate = await take(watcher)
            most_pending = max(most_pending, watcher.pending_count())
            seen.append(candidate)
            candidate.path.unlink()  # the claim
            watcher.release(candidate.path)
    paths = [c.path for c in seen]
    assert len(paths) == len(set(paths)) == len(expected)
    assert set(paths) == expected
    assert most_pending <= watcher.max_pending < len(expected)
    first_types = {c.type for c in seen[:64]}
    assert first_types == {"email", "phone"}  # the smaller inbox is not starved


async def test_idle_watcher_does_not_poll_files(
    inboxes: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = 0
    observe = scan_module.observe

    def counting(*args: Any) -> Any:
        nonlocal rounds
        rounds += 1
        return observe(*args)

    monkeypatch.setattr(scan_module, "observe", counting)
    watcher, stop = make(inboxes)
    async with running(watcher, stop):
        path = drop(inboxes["email"], "one.csv")
        assert (await take(watcher)).path == path
        settled_after = rounds
        await asyncio.sleep(0.5)  # idle time, whose absence of work is the point
        assert rounds == settled_after


# -- --once ------------------------------------------------------------------------------------


async def test_scan_once_and_drain_settled_deliver_everything_present(
    inboxes: dict[str, Path],
) -> None:
    for type_ in inboxes:
        inboxes[type_].mkdir(parents=True)
    expected = {drop(inboxes["email"], f"{n}.csv") for n in range(900)}
    expected |= {drop(inboxes["phone"], f"{n}.csv") for n in range(300)}
    watcher, _ = make(inboxes)
    got: list[Path] = []

    async def consume() -> None:
        while True:
            candidate = await take(watcher, within=60)
            got.append(candidate.path)
            candidate.path.unlink()
            watcher.release(candidate.path)

    consumer = asyncio.create_task(consume())
    try:
        assert await watcher.scan_once() == watcher.max_pending < len(expected)
        assert await watcher.scan_once() == 0
        await asyncio.wait_for(watcher.drain_settled(), 20)
        await until(lambda: len(got) == len(expected))
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        watcher.close()
    assert sorted(got) == sorted(expected)
    assert watcher.pending_count() == 0


async def test_scan_once_creates_missing_inboxes(inboxes: dict[str, Path]) -> None:
    watcher, _ = make(inboxes)
    assert await watcher.scan_once() == 0
    assert all(path.is_dir() for path in inboxes.values())
    watcher.close()


# -- lifecycle ----------------------------------------------------------------------------------


async def test_stop_ends_run_promptly_and_close_is_idempotent(inboxes: dict[str, Path]) -> None:
    watcher, stop = make(inboxes)
    with logs() as entries:
        task = asyncio.create_task(watcher.run())
        await until(lambda: all(p.is_dir() for p in inboxes.values()))
        stopped = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 3)
    assert time.monotonic() - stopped < 1.0
    watcher.close()
    watcher.close()
    with pytest.raises(RuntimeError):
        await watcher.run()
    assert [e["mode"] for e in events(entries, "writer_check_mode")] == ["proc"]


def test_settings_are_validated(inboxes: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="writer_check"):
        Watcher(inboxes, replace(FAST, writer_check="sometimes"), asyncio.Event())
    with pytest.raises(ValueError, match="queue_size"):
        Watcher(inboxes, replace(FAST, queue_size=0), asyncio.Event())
    with pytest.raises(ValueError, match="rescan_seconds"):
        Watcher(inboxes, replace(FAST, rescan_seconds=0), asyncio.Event())


# -- names --------------------------------------------------------------------------------------

_NAMES = st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=40)
_SUFFIXES = st.sampled_from([".tmp", ".part", ".partial", ".crdownload", "~", ".TMP", ".Part"])


@given(name=_NAMES, suffix=_SUFFIXES)
def test_temporary_and_hidden_names_are_ignored(name: str, suffix: str) -> None:
    assert is_ignored(name + suffix)
    assert is_ignored("." + name)
    assert is_ignored("~$" + name)  # Office's lock file beside an open document


@given(stem=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,30}", fullmatch=True))
def test_ordinary_csv_names_are_not_ignored(stem: str) -> None:
    assert not is_ignored(stem + ".csv")
    assert not is_ignored(stem + ".url")


QUIET = replace(FAST, writer_check="quiet", quiet_seconds=3.0)


async def test_quiet_mode_takes_a_long_still_file_at_once(inboxes: dict[str, Path]) -> None:
    # Written a minute ago, renamed in now: it has been quiet far longer than the window.
    watcher, stop = make(inboxes, QUIET)
    async with running(watcher, stop):
        await until(inboxes["email"].is_dir)
        staged = inboxes["email"].parent / "staged.csv"
        staged.write_bytes(b"a@example.com\n")
        old = time.time() - 60
        os.utime(staged, (old, old))
        started = time.monotonic()
        staged.rename(inboxes["email"] / "old.csv")
        candidate = await take(watcher, within=2.0)
        assert candidate.path.name == "old.csv"
        assert time.monotonic() - started < QUIET.quiet_seconds


# The quiet window for a fresh file and the lack of mtime credit with polling are timing
# rules of the settle table: tests/test_settle.py checks them on a fake clock.
