"""The circuit breaker and the checks right before an upload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.job.breaker import Breaker
from daemon.service import Service
from daemon.spool import Job, Spool
from daemon.watcher import Candidate
from tests.support import daemon_config, drop, emails, quick_settings, sandbox_server


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_counts_concurrent_failures_once_and_lets_one_probe_through() -> None:
    clock, stop = Clock(), asyncio.Event()
    breaker = Breaker(initial=5, cap=60, clock=clock)
    permits = [await breaker.acquire(stop) for _ in range(4)]  # four uploads under way
    for permit in permits:
        breaker.failure("Invalid or unauthorized key.", permit)
    assert breaker.paused
    assert all(not breaker.allows(p) for p in permits if p is not None)
    clock.now = 5.0  # one failure counted: the first probe is due after 5 s, not 40 s
    probe = await asyncio.wait_for(breaker.acquire(stop), 1)
    assert probe is not None and probe.probe
    # A second upload waits while the probe is out...
    waiter = asyncio.create_task(breaker.acquire(stop))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    # ...and a probe that ends without a verdict hands its turn on instead of leaking it.
    breaker.release(probe)
    second = await asyncio.wait_for(waiter, 1)
    assert second is not None and second.probe
    breaker.failure("Invalid or unauthorized key.", second)
    clock.now = 14.9  # doubled: 10 s after the second failure
    assert not (await _acquired_within(breaker, stop, 0.2))
    clock.now = 15.0
    third = await asyncio.wait_for(breaker.acquire(stop), 1)
    assert third is not None
    breaker.success()
    assert not breaker.paused and breaker.allows(third)


async def _acquired_within(breaker: Breaker, stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(breaker.acquire(stop), seconds)
    except TimeoutError:
        return False
    return True


async def test_a_file_rewritten_after_it_settled_goes_back_instead_of_up(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        service = Service(daemon_config(root, sandbox.api_base))
        await asyncio.to_thread(service.spool.prepare)
        path = drop(root, "email", "late.csv", emails(10))
        st = path.stat()
        settled = Candidate("email", path, st.st_size, st.st_mtime_ns, st.st_ino)
        with path.open("ab") as fh:  # a writer came back after the watcher's last look
            fh.write(b"late@example.com\n")
        assert await service.uploader._handle(settled)  # it got a permit and went on
        await service.pipe.client.close()
        assert sandbox.uploads() == []
        assert path.read_bytes() == emails(10) + b"late@example.com\n"  # back, to settle again
        assert [p.name for p in (root / "processing").iterdir()] == [".owners"]


async def test_a_file_that_cannot_be_claimed_does_not_stop_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        drop(root, "email", "stuck.csv", emails(3, "s"))
        for n in range(3):
            drop(root, "email", f"fine-{n}.csv", emails(3, str(n)))
        real_claim = Spool.claim

        def claim(self: Spool, file_type: str, path: Path, *args: object) -> Job | None:
            if path.name == "stuck.csv":  # e.g. EPERM renaming in a sticky shared inbox
                raise PermissionError(1, "Operation not permitted", str(path))
            return real_claim(self, file_type, path, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Spool, "claim", claim)
        service = Service(daemon_config(root, sandbox.api_base))
        status = await service.run(once=True)
    assert not service.crashed
    assert service.pipe.outcomes["done"] == 3 and len(sandbox.uploads()) == 3
    assert (root / "inbox" / "email" / "stuck.csv").exists()  # kept, for a later look
    assert status == 1  # not every file of the batch got its outcome


def test_unclaim_onto_a_taken_name_puts_the_file_back_under_a_free_one(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path, ("email",))
    spool.prepare()
    job = spool.claim("email", drop(tmp_path, "email", "x.csv", b"old@example.com\n"),
                      "multipart")
    assert job is not None
    drop(tmp_path, "email", "x.csv", b"new@example.com\n")  # a new file took the name
    spool.unclaim(job)
    inbox = tmp_path / "inbox" / "email"
    assert sorted(p.name for p in inbox.iterdir()) == ["x-1.csv", "x.csv"]
    assert (inbox / "x.csv").read_bytes() == b"new@example.com\n"
    assert (inbox / "x-1.csv").read_bytes() == b"old@example.com\n"
    assert list(spool.jobs()) == []
