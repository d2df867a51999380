"""The credit guard (fake clock, scripted balances) and its reader against the sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.api import Account, IpqsClient
from daemon.credits import CreditGuard, balance_reader
from daemon.errors import AccountError, TransientError
from tests.support import FAKE_KEY, Sandbox, emails, quick_settings, sandbox_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Balances:
    """The account API, scripted: each read gives the next answer (the last one repeats)."""

    def __init__(self, *answers: int | Exception | None) -> None:
        self.answers = list(answers)
        self.reads = 0

    async def __call__(self) -> int | None:
        answer = self.answers[min(self.reads, len(self.answers) - 1)]
        self.reads += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


def guard(balances: Balances, clock: Clock, reserve: int = 0) -> CreditGuard:
    return CreditGuard(balances, reserve=reserve, refresh_seconds=300,
                       pause_initial_seconds=5, pause_max_seconds=60, clock=clock)


async def test_short_balance_admits_what_it_can_pay_for_then_waits() -> None:
    clock, balances = Clock(), Balances(100)
    credits = guard(balances, clock)
    answers = [await credits.admit(10) for _ in range(15)]
    assert [a.allowed for a in answers] == [True] * 10 + [False] * 5
    assert answers[-1].reason == "paused: credits 0, next file needs 10 + reserve 0"
    assert balances.reads == 1 and credits.paused == answers[-1].reason
    for _ in range(10):
        credits.accepted(10)
    assert (credits.balance, credits.held) == (0, 0)


async def test_the_reserve_is_never_spent_and_a_file_that_never_fits_blocks_no_other() -> None:
    credits = guard(Balances(100), Clock(), reserve=30)
    assert not (await credits.admit(71)).allowed
    assert (await credits.admit(70)).allowed  # the smaller file behind it goes
    wait = await credits.admit(1)
    assert wait.reason == "paused: credits 30, next file needs 1 + reserve 30"
    credits.released(70)  # it was not sent after all
    assert (await credits.admit(40)).allowed


async def test_reads_at_start_every_refresh_and_after_an_account_error() -> None:
    clock, balances = Clock(), Balances(1000, 900, 800)
    credits = guard(balances, clock)
    assert balances.reads == 0  # nothing read before the first question
    assert (await credits.admit(10)).allowed and balances.reads == 1
    credits.accepted(10)
    assert credits.balance == 990  # debited locally between reads
    clock.now += 299
    await credits.admit(10)
    assert balances.reads == 1
    clock.now += 1
    await credits.admit(10)
    assert (balances.reads, credits.balance) == (2, 900)
    credits.account_error()  # e.g. IPQS said "insufficient credits" to an upload
    await credits.admit(10)
    assert (balances.reads, credits.balance) == (3, 800)


async def test_a_pause_rereads_with_backoff_and_resumes_on_a_top_up() -> None:
    clock, balances = Clock(), Balances(5, 5, 5, 5, 5, 5, 5, 500)
    credits = guard(balances, clock)
    assert not (await credits.admit(10)).allowed
    read_at = []
    for _ in range(300):  # ask every second, as a scanning daemon would
        clock.now += 1
        before = balances.reads
        allowed = (await credits.admit(10)).allowed
        if balances.reads > before:
            read_at.append(clock.now - 1000)
        if allowed:
            break
    assert read_at == [5, 15, 35, 75, 135, 195, 255]  # +5, +10, +20, +40, +60, +60, +60
    assert credits.paused is None and credits.balance == 500


async def test_concurrent_questions_share_one_read() -> None:
    balances = Balances(1000)
    credits = guard(balances, Clock())
    answers = await asyncio.gather(*(credits.admit(100) for _ in range(12)))
    assert sum(a.allowed for a in answers) == 10 and balances.reads == 1


@pytest.mark.parametrize("trouble", [AccountError("HTTP 404 from IPQS"), None,
                                     TransientError("not JSON", cause="invalid_answer")])
async def test_an_unreadable_account_api_turns_the_guard_off_warns_once_and_retries(
    trouble: Exception | None,
) -> None:
    clock, balances = Clock(), Balances(trouble, trouble, 20)
    credits = guard(balances, clock)
    with capture_logs() as logs:
        assert all([(await credits.admit(1000)).allowed for _ in range(3)])
        clock.now += 300
        assert (await credits.admit(1000)).allowed  # read again: still unreadable
    assert balances.reads == 2 and not credits.guarding
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["credit_guard_off"]
    clock.now += 300
    assert not (await credits.admit(1000)).allowed  # readable again: guarding again
    assert credits.guarding


async def test_the_pause_is_logged_once_not_per_question() -> None:
    credits = guard(Balances(50), Clock())
    with capture_logs() as logs:
        for _ in range(5):
            await credits.admit(100)
            assert (await credits.admit(10)).allowed
    paused = [e for e in logs if e["event"] == "uploads_paused_for_credits"]
    assert len(paused) == 1 and paused[0]["needs"] == 100


def test_account_answers_are_parsed_leniently() -> None:
    answer = Account.from_answer({"credits": "4999762", "usage": None, "email_usage": "38",
                                  "proxy_usage": 54, "url_usage": "n/a", "success": True})
    assert answer.credits == 4999762 and answer.usage is None
    assert answer.usage_by_product == {"email": 38, "proxy": 54, "url": None}
    assert Account.from_answer({}).credits is None
    assert Account.from_answer({"credits": True}).credits is None


# -- the reader, against the sandbox's account API ----------------------------------------


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with sandbox_server(quick_settings(tmp_path)) as server:
        yield server


@pytest.mark.parametrize("key_in", ["path", "header"])
async def test_the_reader_sees_the_sandbox_balance(sandbox: Sandbox, tmp_path: Path,
                                                   key_in: str) -> None:
    sandbox.state.faults.credits = 100
    listing = tmp_path / "list.csv"
    listing.write_bytes(emails(7))
    async with IpqsClient(sandbox.api_base, FAKE_KEY, key_in=key_in) as client:
        read = balance_reader(client)
        assert await read() == 100
        await client.upload_file("email", listing, "seven")
        assert await read() == 93
        account = await client.account()
        assert account.usage_by_product["email"] == 7 and account.usage == 7


async def test_the_guard_goes_off_when_the_sandbox_has_no_account_api(sandbox: Sandbox) -> None:
    sandbox.state.faults.account_missing = True
    async with IpqsClient(sandbox.api_base, FAKE_KEY) as client:
        with pytest.raises(AccountError):
            await client.account()
        credits = CreditGuard(balance_reader(client), clock=Clock())
        with capture_logs() as logs:
            assert (await credits.admit(10**9)).allowed
    assert not credits.guarding
    assert [e["event"] for e in logs] == ["credit_guard_off"]
    assert FAKE_KEY not in repr(logs)


async def test_an_admission_by_the_last_read_reads_nothing_even_when_a_read_is_due() -> None:
    # Before a body's last chunk: no request over the network while the body holds a
    # connection of its own (a full pool would time the read out and switch the guard off).
    clock, balances = Clock(), Balances(100, 50)
    credits = guard(balances, clock)
    assert (await credits.admit(10)).allowed and balances.reads == 1
    clock.now += 301  # a read is due
    assert (await credits.admit(20, refresh=False)).allowed and balances.reads == 1
    assert not (await credits.admit(71, refresh=False)).allowed  # 100 - 30 held < 71
    assert balances.reads == 1
    assert (await credits.admit(1)).allowed and balances.reads == 2
