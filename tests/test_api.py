"""The client against the real sandbox: every outcome lands in the right error class."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tenacity import RetryCallState

from daemon.api import CsvJob, InputChangedError, IpqsClient, make_client
from daemon.errors import AccountError, LostAnswerError, RejectedError, TransientError
from daemon.retry import backoff, retrying
from tests.support import FAKE_KEY, Sandbox, emails, sha256, wait_for


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
    "balance": (200, "application/json",
                '{"success": false, "message": "Your account balance is too low."}'),
    "http-402": (402, "text/plain", "Payment Required"),
    "bare-false": (200, "application/json", '{"success": false, "request_id": "abc"}'),
    "false-with-id": (200, "application/json", '{"success": "false", "id": 77}'),
    "garbage": (200, "text/plain", "\x00\x01 not json"),
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
    ("soft-200", TransientError),     # "try again later": IPQS made nothing
    ("account-word", RejectedError),  # a word about one file must not pause everything
    ("balance", AccountError),
    ("http-402", AccountError),
    ("bare-false", RejectedError),
    ("garbage", LostAnswerError),
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


# -- answers IPQS might really give (issue 20), each from the sandbox's odd-answer knobs --


@pytest.fixture
async def other_host() -> AsyncIterator[OtherHost]:
    """A second loopback listener: where redirects point. It counts what reaches it."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    seen: list[dict[str, str]] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=b"ip,score\r\n1.2.3.4,5\r\n", content_type="text/csv")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield OtherHost(server.port or 0, seen)
    finally:
        await server.close()


@dataclass
class OtherHost:
    port: int
    seen: list[dict[str, str]]


async def _finished_link(client: IpqsClient, csv_file: Path, name: str) -> tuple[int, str]:
    job = await client.upload_file("email", csv_file, name)
    assert job.id is not None
    link = (await client.status(job.id)).downloads["all"]
    assert link is not None
    return job.id, link


@pytest.mark.parametrize("form", ["bom", "junk", "jsonp"])
async def test_a_wrapped_json_answer_is_read(client: IpqsClient, sandbox: Sandbox,
                                             csv_file: Path, form: str) -> None:
    sandbox.state.faults.answer_form = form
    job = await client.upload_file("email", csv_file, f"wrapped-{form}")
    assert job.id is not None and job.status == "NEW"
    assert (await client.status(job.id)).finished
    assert len(sandbox.uploads()) == 1
    assert sandbox.state.stats.faults[f"answer_{form}"] == 2


@pytest.mark.parametrize("form", ["html", "empty"])
async def test_an_unreadable_answer_to_a_sent_upload_is_a_lost_answer(
        client: IpqsClient, sandbox: Sandbox, csv_file: Path, form: str) -> None:
    sandbox.state.faults.answer_form = form
    sandbox.state.faults.operations = frozenset({"upload"})
    with pytest.raises(LostAnswerError) as caught:
        await client.upload_file("email", csv_file, f"unreadable-{form}")
    assert caught.value.cause == "invalid_answer" and caught.value.maybe_sent
    assert FAKE_KEY not in str(caught.value)
    # IPQS made the job: the lookup the caller must do first finds it.
    [upload] = sandbox.uploads()
    found = await client.find(f"unreadable-{form}", "email")
    assert found is not None and found.id == upload["id"]


@pytest.mark.parametrize("form", ["html", "empty"])
async def test_an_unreadable_status_answer_is_transient(client: IpqsClient, sandbox: Sandbox,
                                                         csv_file: Path, form: str) -> None:
    job = await client.upload_file("email", csv_file, "status-page")
    assert job.id is not None
    sandbox.state.faults.answer_form = form
    with pytest.raises(TransientError) as caught:
        await client.status(job.id)
    assert type(caught.value) is TransientError and caught.value.cause == "invalid_answer"


async def test_a_5xx_to_a_sent_upload_is_a_lost_answer(client: IpqsClient,
                                                       sandbox: Sandbox) -> None:
    sandbox.state.faults.error_5xx_rate = 1.0
    sandbox.state.faults.operations = frozenset({"upload"})
    # JSON rows: the body surely went out before the answer (a multipart body may still be
    # on its way when the 5xx comes, and then nothing can have been made).
    with pytest.raises(LostAnswerError) as caught:
        await client.upload_rows("email", [["a@example.com"]], "gateway")
    assert caught.value.cause == "http_5xx"
    sandbox.state.faults.operations = frozenset({"list"})
    with pytest.raises(TransientError) as listed:
        await client.list()
    assert not isinstance(listed.value, LostAnswerError)


@pytest.mark.parametrize("style", ["string", "number"])
async def test_booleans_as_strings_or_numbers_are_read(client: IpqsClient, sandbox: Sandbox,
                                                      csv_file: Path, style: str) -> None:
    sandbox.state.faults.booleans = style
    job = await client.upload_file("email", csv_file, f"bools-{style}")
    assert job.id is not None  # accepted, never "rejected: Success"
    done = await client.status(job.id)
    assert done.finished and done.aborted is False
    [listed] = (await client.list("email")).csvs
    assert listed.aborted is False and len(sandbox.uploads()) == 1


@pytest.mark.parametrize(("case", "word"), [("lower", "FINISHED"), ("upper", "COMPLETED"),
                                            ("title", "Completed")])
async def test_status_words_are_read_whatever_their_case(client: IpqsClient, sandbox: Sandbox,
                                                        csv_file: Path, case: str,
                                                        word: str) -> None:
    sandbox.state.faults.status_case = case
    sandbox.state.faults.finished_status = word
    job = await client.upload_file("email", csv_file, "cased")
    assert job.id is not None and job.status == "NEW"
    done = await client.status(job.id)
    assert done.status == "FINISHED" and done.finished and done.links_complete
    assert done.raw_status is not None and done.raw_status != "FINISHED"


@pytest.mark.parametrize("form", ["missing", "empty_list"])
async def test_a_finished_answer_without_its_downloads_is_incomplete(
        client: IpqsClient, sandbox: Sandbox, csv_file: Path, form: str) -> None:
    job = await client.upload_file("email", csv_file, "no-links")
    assert job.id is not None
    sandbox.state.faults.downloads_form = form
    sandbox.state.faults.odd_answers = 1
    odd = await client.status(job.id)
    assert odd.finished and odd.downloads == {}
    assert not odd.links_complete and not odd.links_complete_for(("all",))
    again = await client.status(job.id)  # what the caller does: ask again
    assert again.links_complete and again.downloads["all"] is not None


def test_explicit_nulls_are_an_answer_missing_sets_are_not() -> None:
    nulls = CsvJob.from_answer({"id": 1, "status": "FINISHED",
                                "downloads": {"pristine": None, "clean": None, "bad": None,
                                              "all": None}})
    assert nulls.links_complete and nulls.downloads == dict.fromkeys(nulls.downloads_known)
    partial = CsvJob.from_answer({"id": 1, "status": "FINISHED", "downloads": {"all": None}})
    assert partial.links_complete_for(("all",)) and not partial.links_complete_for(("bad",))
    linked = CsvJob.from_answer({"id": 1, "status": "Whatever", "downloads": {"all": "https://x"}})
    assert linked.finished  # a link comes only with a finished job


@pytest.mark.parametrize("key_in", ["path", "header"])
async def test_api_redirects_are_never_followed(sandbox: Sandbox, csv_file: Path,
                                                other_host: OtherHost, key_in: str) -> None:
    sandbox.state.faults.redirect_to = f"http://localhost:{other_host.port}"
    async with IpqsClient(sandbox.api_base, FAKE_KEY, key_in=key_in) as client:
        with pytest.raises(AccountError) as upload:
            await client.upload_file("email", csv_file, "moved")
        with pytest.raises(AccountError) as status:
            await client.status(1)
        with pytest.raises(AccountError):
            await client.list()
    assert other_host.seen == [] and sandbox.uploads() == []
    for caught in (upload.value, status.value):
        text = str(caught)
        assert "host localhost" in text and "/api" not in text and FAKE_KEY not in text
    assert upload.value.maybe_sent and not status.value.maybe_sent


async def test_a_redirect_to_a_host_never_resolved_is_refused(client: IpqsClient,
                                                             sandbox: Sandbox) -> None:
    sandbox.state.faults.redirect_to = "http://never-resolved.invalid"
    with pytest.raises(AccountError, match=r"never-resolved\.invalid"):
        await client.list()


async def test_download_redirects_are_checked_at_every_hop(sandbox: Sandbox, csv_file: Path,
                                                           other_host: OtherHost,
                                                           tmp_path: Path) -> None:
    async with IpqsClient(sandbox.api_base, FAKE_KEY, key_in="header") as client:
        _, link = await _finished_link(client, csv_file, "hops")
        sandbox.state.faults.operations = frozenset({"download"})
        sandbox.state.faults.redirect_to = f"http://localhost:{other_host.port}"
        with pytest.raises(AccountError, match="redirected to http://localhost refused"):
            await client.fetch(link, tmp_path / "hops.csv")
        assert other_host.seen == [] and not (tmp_path / "hops.csv").exists()
        # A hop to an allowed host (the API's own, 127.0.0.1) is followed, without the key.
        sandbox.state.faults.redirect_to = f"http://127.0.0.1:{other_host.port}"
        saved = await client.fetch(link, tmp_path / "hops.csv")
    assert saved.lines == 2 and saved.data_rows == 1
    [request] = other_host.seen
    assert "IPQS-KEY" not in request and FAKE_KEY not in str(request)


async def test_a_download_is_checked_before_it_is_kept(client: IpqsClient, sandbox: Sandbox,
                                                       csv_file: Path, tmp_path: Path) -> None:
    job_id, link = await _finished_link(client, csv_file, "checked")
    dest = tmp_path / "checked.csv"
    sandbox.state.faults.operations = frozenset({"download"})
    sandbox.state.faults.truncate_downloads = True
    with pytest.raises(TransientError, match="mid-line"):
        await client.fetch(link, dest)
    sandbox.state.faults.truncate_downloads = False
    sandbox.state.faults.answer_form = "html"
    with pytest.raises(TransientError, match="HTML"):
        await client.fetch((await client.status(job_id)).downloads["all"] or "", dest)
    assert list(tmp_path.glob("*checked*")) == []
    assert sandbox.state.stats.faults["truncated_download"] == 1
    sandbox.state.faults.answer_form = "json"
    saved = await client.fetch((await client.status(job_id)).downloads["all"] or "", dest)
    # 6 input rows, one header line: what a caller compares with the input's rows.
    assert (saved.lines, saved.data_rows, saved.bytes) == (7, 6, dest.stat().st_size)


async def test_a_trickling_answer_is_cut_by_the_overall_limit(sandbox: Sandbox,
                                                              csv_file: Path,
                                                              tmp_path: Path) -> None:
    from daemon.config import load_config

    config = load_config(None, {"IPQS_API_KEY": FAKE_KEY,
                                "IPQS_BULKD_API_BASE_URL": sandbox.api_base,
                                "IPQS_BULKD_API_TOTAL_TIMEOUT_SECONDS": "0.4"})
    assert config.api.total_timeout_seconds == 0.4
    loop = asyncio.get_running_loop()
    async with make_client(config) as client:
        job_id, link = await _finished_link(client, csv_file, "trickle")
        sandbox.state.faults.trickle_ms = 50  # each byte well within api.read_timeout
        for call, lost in ((lambda: client.status(job_id), False),
                           (lambda: client.upload_file("email", csv_file, "t2"), True),
                           (lambda: client.fetch(link, tmp_path / "t.csv"), False)):
            started = loop.time()
            with pytest.raises(TransientError) as caught:
                await call()
            assert caught.value.cause == "timeout"
            assert isinstance(caught.value, LostAnswerError) is lost
            assert loop.time() - started < 3.0
    assert sandbox.state.stats.faults["trickle"] == 3


async def test_a_refused_keyless_status_falls_back_to_the_path_form_once(
        sandbox: Sandbox, csv_file: Path) -> None:
    from structlog.testing import capture_logs

    sandbox.state.faults.keyless_status = False
    async with IpqsClient(sandbox.api_base, FAKE_KEY, key_in="header") as client:
        job = await client.upload_file("email", csv_file, "fallback")
        assert job.id is not None
        with capture_logs() as logs:
            assert (await client.status(job.id)).finished
            assert (await client.status(job.id)).finished
    assert [e["event"] for e in logs] == ["status_url_fallback"]
    assert sandbox.state.stats.faults["keyless_status_404"] == 1
    assert FAKE_KEY not in str(logs)


def test_lenient_reading() -> None:
    from daemon.api.answers import as_bool, read_json, retry_after

    assert [as_bool(v) for v in (True, 1, "true", " TRUE ", "1", False, 0, "false", "0")] == \
        [True] * 5 + [False] * 4
    assert [as_bool(v) for v in (None, 2, "yes", [], 1.0)] == [None] * 5
    assert read_json('\ufeff{"a": 1}') == {"a": 1}
    assert read_json('cb({"a": 1});') == {"a": 1}
    assert read_json('{"a": 1}\n<!-- x -->') == {"a": 1}
    assert read_json("<html></html>") is None and read_json("") is None
    assert read_json("[1]") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412500.0) == 10.0
    assert retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412600.0) == 0.0
    assert retry_after("2.5") == 2.5 and retry_after("soon") is None


async def test_a_bare_failure_keeps_an_excerpt_and_an_id_is_never_a_refusal(
        odd_ipqs: str, csv_file: Path) -> None:
    async with IpqsClient(f"{odd_ipqs}/bare-false/api", FAKE_KEY) as client:
        with pytest.raises(RejectedError, match='request_id": "abc"'):
            await client.upload_file("email", csv_file, "bare")
    async with IpqsClient(f"{odd_ipqs}/false-with-id/api", FAKE_KEY) as client:
        assert (await client.upload_file("email", csv_file, "has-id")).id == 77
        assert (await client.status(77)).id == 77


class _NotOurs(Exception):
    """What a fence raises in these tests."""


@pytest.mark.parametrize("method", ["multipart", "json"])
async def test_a_body_stopped_before_its_last_chunk_creates_no_job(
        client: IpqsClient, sandbox: Sandbox, tmp_path: Path, method: str) -> None:
    # Several chunks, so the body is well under way when the fence says no.
    big = tmp_path / "big.csv"
    big.write_bytes(emails(200_000))  # ~5 MB
    calls: list[int] = []

    async def fence() -> None:
        calls.append(1)
        raise _NotOurs("taken over")

    async def let_through() -> None:
        calls.append(2)

    with pytest.raises(_NotOurs):
        if method == "multipart":
            await client.upload_file("email", big, "fenced", before_last=fence)
        else:
            rows = [[line] for line in big.read_text().split()]
            await client.upload_rows("email", rows, "fenced", before_last=fence)
    assert calls == [1]
    # The sandbox saw an incomplete body: no job, no upload logged, nothing left received.
    await wait_for(lambda: not list(sandbox.state.incoming_path().parent.glob("*")),
                   what="the partial body removed")
    assert sandbox.state.jobs == {} and sandbox.uploads() == []
    assert list(sandbox.state.incoming_path().parent.glob("*")) == []
    assert (await client.list("email")).total_csvs == 0
    # A fence that lets it through: the same body makes exactly one job.
    job = await client.upload_file("email", big, "let-through", before_last=let_through)
    assert job.id is not None and len(sandbox.uploads()) == 1 and calls == [1, 2]


async def test_the_sandbox_makes_no_job_of_a_body_cut_short(sandbox: Sandbox,
                                                              client: IpqsClient,
                                                              csv_file: Path) -> None:
    # Raw HTTP: the headers promise more bytes than arrive, then the connection closes.
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"cut.csv\"\r\nContent-Type: text/csv\r\n\r\n").encode()
    body = part + emails(1000)
    whole = len(body) + len(f"\r\n--{boundary}--\r\n")
    host, port = sandbox.server.host, sandbox.server.port
    _, writer = await asyncio.open_connection(host, port)
    writer.write((f"POST /api/json/csv/{FAKE_KEY}/email/upload?file_name=cut HTTP/1.1\r\n"
                  f"Host: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                  f"Content-Length: {whole}\r\n\r\n").encode() + body[:-100])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # A whole upload after it: once that one is in, the cut one was long seen to its end.
    await client.upload_file("email", csv_file, "whole")
    await wait_for(lambda: not list(sandbox.state.incoming_path().parent.glob("*")),
                   what="received files cleared")
    assert [job.file_name for job in sandbox.state.jobs.values()] == ["whole"]
    assert [u["file_name"] for u in sandbox.uploads()] == ["whole"]


async def test_a_write_while_the_fence_runs_stops_the_body(
        client: IpqsClient, sandbox: Sandbox, tmp_path: Path) -> None:
    # The checks before the last chunk may take a while (money, the marker, a save): a
    # producer that writes meanwhile must not have the old bytes billed as the file.
    path = tmp_path / "growing.csv"
    path.write_bytes(emails(100_000))

    async def fence() -> None:
        with path.open("ab") as fh:
            fh.write(b"late@example.com\n")

    with pytest.raises(TransientError) as caught:  # nothing whole went: safe to retry
        await client.upload_file("email", path, "growing", before_last=fence)
    assert not isinstance(caught.value, LostAnswerError)
    await wait_for(lambda: not list(sandbox.state.incoming_path().parent.glob("*")),
                   what="the partial body removed")
    assert sandbox.uploads() == [] and sandbox.state.jobs == {}


async def test_a_file_no_longer_as_claimed_is_not_sent_at_all(
        client: IpqsClient, sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "claimed.csv"
    path.write_bytes(emails(10))
    st = path.stat()
    path.write_bytes(emails(11))  # changed after its size and mtime were taken
    with pytest.raises(InputChangedError):
        await client.upload_file("email", path, "claimed", expect=(st.st_size, st.st_mtime_ns))
    assert sandbox.state.stats.requests.get("upload", 0) == 0
