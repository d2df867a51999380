"""The client against the real sandbox: every outcome lands in the right error class."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tenacity import RetryCallState

from daemon.api import CsvJob, IpqsClient
from daemon.errors import AccountError, LostAnswerError, RejectedError, TransientError
from daemon.retry import backoff, retrying
from tests.support import FAKE_KEY, Sandbox, emails, quick_settings, sandbox_server, sha256


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with sandbox_server(quick_settings(tmp_path)) as server:
        yield server


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[IpqsClient]:
    async with IpqsClient(sandbox.api_base, FAKE_KEY, read_timeout=2.0) as ipqs:
        yield ipqs


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "list.csv"
    path.write_bytes(emails(5) + b"broken\n")
    return path


async def test_upload_file_streams_with_content_length(client: IpqsClient, sandbox: Sandbox,
                                                       csv_file: Path) -> None:
    seen: list[int] = []
    job = await client.upload_file("email", csv_file, "my-list", progress=seen.append)
    assert job.id is not None and job.status == "NEW" and job.file_name == "my-list"
    sent_sha = sha256(csv_file.read_bytes())
    assert sum(seen) == csv_file.stat().st_size
    [upload] = sandbox.uploads()
    assert (upload["sha256"], upload["method"], upload["rows"]) == (sent_sha, "multipart", 6)


async def test_upload_rows_and_url(client: IpqsClient, sandbox: Sandbox) -> None:
    rows_job = await client.upload_rows("phone", [["+14155550100"], ["12", "x"]], "rows")
    url_job = await client.upload_url("url", "https://example.com/a.csv", "by-url")
    assert rows_job.type == "phone" and url_job.type == "url"
    methods = [(u["method"], u["file_name"]) for u in sandbox.uploads()]
    assert methods == [("json", "rows"), ("url", "by-url")]


async def test_key_as_header_keeps_it_out_of_urls(sandbox: Sandbox, csv_file: Path) -> None:
    async with IpqsClient(sandbox.api_base, FAKE_KEY, key_in="header") as client:
        job = await client.upload_file("email", csv_file, "header-key")
        assert job.id is not None
        assert (await client.status(job.id)).id == job.id
        page = await client.list("email")
        assert [j.file_name for j in page.csvs] == ["header-key"]
        assert FAKE_KEY not in client._url("status", "1")


async def test_status_then_one_time_links(client: IpqsClient, csv_file: Path,
                                          tmp_path: Path) -> None:
    job = await client.upload_file("email", csv_file, "links")
    assert job.id is not None
    done = await client.status(job.id)
    assert done.status == "FINISHED" and done.invalid_records == 1
    link = done.downloads["all"]
    assert link is not None
    size = await client.download(link, tmp_path / "all.csv")
    assert size == (tmp_path / "all.csv").stat().st_size > 0
    with pytest.raises(RejectedError):
        await client.download(link, tmp_path / "again.csv")
    assert not (tmp_path / "again.csv").exists()
    fresh = (await client.status(job.id)).downloads["all"]
    assert fresh is not None and fresh != link
    await client.download(fresh, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "all.csv").read_bytes()


async def test_list_pages_and_find(client: IpqsClient, sandbox: Sandbox) -> None:
    for n in range(120):
        await client.upload_rows("email", [[f"u{n}@example.com"]], f"job-{n}")
    first = await client.list("email", 1)
    assert (first.total_csvs, first.total_pages, len(first.csvs)) == (120, 3, 50)
    assert first.csvs[0].file_name == "job-119"
    last = await client.list("email", 3)
    assert [j.file_name for j in last.csvs][-1] == "job-0"
    found = await client.find("job-3", "email")
    assert found is not None and found.file_name == "job-3"
    assert await client.find("never-sent", "email") is None
    # With a floor, the lookup stops paging once it reaches older jobs.
    newest = await client.newest_id()
    assert newest is not None
    assert await client.find("job-3", "email", floor_id=newest - 10) is None


@pytest.mark.parametrize(("knob", "value", "cause"), [
    ("error_5xx_rate", 1.0, "http_5xx"),
    ("rate_limit_403_rate", 1.0, "rate_limit"),
    ("rate_limit_429_rate", 1.0, "rate_limit"),
])
async def test_transient_answers(client: IpqsClient, sandbox: Sandbox, knob: str,
                                 value: float, cause: str) -> None:
    setattr(sandbox.state.faults, knob, value)
    sandbox.state.faults.retry_after_seconds = 7
    with pytest.raises(TransientError) as caught:
        await client.list()
    assert caught.value.cause == cause
    assert not isinstance(caught.value, LostAnswerError)
    if cause == "rate_limit":
        assert caught.value.retry_after == 7
    assert FAKE_KEY not in str(caught.value)


async def test_lost_answer_is_told_apart_from_nothing_sent(client: IpqsClient,
                                                           sandbox: Sandbox,
                                                           csv_file: Path) -> None:
    sandbox.state.faults.lost_answer_rate = 1.0
    with pytest.raises(LostAnswerError) as caught:
        await client.upload_file("email", csv_file, "lost")
    assert caught.value.cause == "dropped"
    assert [u["file_name"] for u in sandbox.uploads()] == ["lost"]
    sandbox.state.faults.lost_answer_rate = 0
    found = await client.find("lost", "email")
    assert found is not None


async def test_connection_refused_means_nothing_was_sent(csv_file: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with IpqsClient(f"http://127.0.0.1:{port}/api", FAKE_KEY) as client:
        with pytest.raises(TransientError) as caught:
            await client.upload_file("email", csv_file, "nobody-home")
    assert caught.value.cause == "connect"
    assert not isinstance(caught.value, LostAnswerError)


async def test_timeout_after_the_body_went_out_is_a_lost_answer(sandbox: Sandbox,
                                                                csv_file: Path) -> None:
    sandbox.state.faults.latency_ms = 1500
    async with IpqsClient(sandbox.api_base, FAKE_KEY, read_timeout=0.3) as client:
        with pytest.raises(LostAnswerError) as caught:
            await client.upload_file("email", csv_file, "slow")
        assert caught.value.cause == "timeout"
        with pytest.raises(TransientError) as status_caught:
            await client.status(1)
        assert not isinstance(status_caught.value, LostAnswerError)


async def test_account_errors(client: IpqsClient, sandbox: Sandbox, csv_file: Path) -> None:
    sandbox.state.faults.invalid_key = True
    with pytest.raises(AccountError) as bad_key:
        await client.upload_file("email", csv_file, "k")
    sandbox.state.faults.invalid_key = False
    sandbox.state.faults.credits = 2
    with pytest.raises(AccountError) as no_credits:
        await client.upload_file("email", csv_file, "c")
    for exc in (bad_key.value, no_credits.value):
        assert FAKE_KEY not in str(exc) and exc.message
    assert sandbox.uploads() == []


async def test_rejections(client: IpqsClient, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(RejectedError):
        await client.upload_file("email", empty, "empty")
    with pytest.raises(RejectedError):
        await client.upload_rows("fax", [["x"]], "bad-type")
    with pytest.raises(RejectedError):
        await client.status(999999999)
    with pytest.raises(RejectedError):
        await client.upload_url("email", "gopher://example.com/x", "bad-url")


async def test_downloads_only_from_allowed_hosts(client: IpqsClient, tmp_path: Path) -> None:
    # A setting to fix, not a verdict on the file: it pauses instead of failing paid work.
    for link in ("https://evil.example/download?download=x",
                 "file:///etc/passwd",
                 "ftp://downloads.ipqualityscore.com/x"):
        with pytest.raises(AccountError, match="download_hosts"):
            await client.download(link, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


async def test_download_size_cap(sandbox: Sandbox, csv_file: Path, tmp_path: Path) -> None:
    async with IpqsClient(sandbox.api_base, FAKE_KEY, max_download_bytes=10) as client:
        job = await client.upload_file("email", csv_file, "capped")
        assert job.id is not None
        link = (await client.status(job.id)).downloads["all"]
        assert link is not None
        with pytest.raises(RejectedError, match="max_download_bytes"):
            await client.download(link, tmp_path / "capped.csv")
    assert list(tmp_path.glob("*capped*")) == []


def test_parsing_is_tolerant() -> None:
    job = CsvJob.from_answer({"id": "42", "status": "SOMETHING_NEW", "aborted": None,
                              "invalid_records": None, "downloads": {"all": None, "odd": 3},
                              "unknown_field": [1, 2], "file_name": 7})
    assert (job.id, job.status, job.aborted, job.invalid_records) == (42, "SOMETHING_NEW",
                                                                      None, None)
    assert job.file_name is None and job.downloads == {"all": None}
    assert CsvJob.from_answer({}).id is None


def _state(attempt: int, exc: BaseException) -> RetryCallState:
    state = RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    wait = backoff(1.0, 8.0)
    plain = TransientError("x")
    delays = [wait(_state(n, plain)) for n in range(1, 30) for _ in range(5)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 10  # jittered, not a fixed ladder
    limited = TransientError("x", retry_after=30)
    assert all(wait(_state(1, limited)) >= 30 for _ in range(20))


async def test_retry_policy_retries_only_transient_and_records_waits() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TransientError("busy", retry_after=0.5)
        return "ok"

    stop = asyncio.Event()
    async for attempt in retrying(initial=0.1, maximum=1.0, stop=stop, sleep=sleep):
        with attempt:
            result = await flaky()
    assert result == "ok" and calls == 4
    assert len(waits) == 3 and all(w >= 0.5 for w in waits)

    with pytest.raises(RejectedError):
        async for attempt in retrying(initial=0.1, maximum=1.0, stop=stop, sleep=sleep):
            with attempt:
                raise RejectedError("no")
    assert len(waits) == 3

    with pytest.raises(LostAnswerError):
        async for attempt in retrying(initial=0.1, maximum=1.0, stop=stop, sleep=sleep,
                                      retry_lost_answers=False):
            with attempt:
                raise LostAnswerError("maybe sent")
    assert len(waits) == 3


# Answers the sandbox never gives (proxies, firewalls, odd IPQS replies), from a tiny fake.
ODD_ANSWERS: dict[str, tuple[int, str, str]] = {
    "no-id": (200, "application/json", '{"success": true, "message": "Success"}'),
    "html-400": (400, "text/html", "<html>Bad Request</html>"),
    "timeout-408": (408, "text/plain", "Request Timeout"),
    "proxy-407": (407, "text/plain", "Proxy Authentication Required"),
    "json-413": (413, "application/json", '{"message": "Request Entity Too Large"}'),
    "soft-200": (200, "application/json", '{"message": "Please try again later."}'),
    "account-word": (200, "application/json",
                     '{"success": false, "message": "Row 3: account number malformed"}'),
}


@pytest.fixture
async def odd_ipqs() -> AsyncIterator[str]:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        status, ctype, body = ODD_ANSWERS[request.match_info["case"]]
        return web.Response(status=status, content_type=ctype, text=body)

    app = web.Application()
    app.router.add_route("*", "/{case}/api/json/csv/{tail:.*}", answer)
    app.router.add_route("*", "/{case}/download", answer)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.mark.parametrize(("case", "expected"), [
    ("no-id", LostAnswerError),       # success means a job exists: look it up, never resend
    ("html-400", RejectedError),
    ("timeout-408", TransientError),
    ("proxy-407", AccountError),
    ("json-413", RejectedError),      # not a "soft failure": only HTTP 200 carries those
    ("soft-200", TransientError),
    ("account-word", RejectedError),  # a word about one file must not pause everything
])
async def test_odd_answers_to_an_upload(odd_ipqs: str, csv_file: Path, case: str,
                                        expected: type[Exception]) -> None:
    async with IpqsClient(f"{odd_ipqs}/{case}/api", FAKE_KEY) as client:
        with pytest.raises(expected) as caught:
            await client.upload_file("email", csv_file, "odd")
    assert type(caught.value) is expected
    assert FAKE_KEY not in str(caught.value)


async def test_a_dead_download_link_is_refused_not_an_account_error(odd_ipqs: str,
                                                                     tmp_path: Path) -> None:
    async with IpqsClient(f"{odd_ipqs}/html-400/api", FAKE_KEY) as client:
        with pytest.raises(RejectedError):
            await client.download(f"{odd_ipqs}/html-400/download?download=x", tmp_path / "r")
    async with IpqsClient(f"{odd_ipqs}/timeout-408/api", FAKE_KEY) as client:
        with pytest.raises(TransientError):
            await client.download(f"{odd_ipqs}/timeout-408/download?download=x", tmp_path / "r")
