"""The sandbox, exercised over real HTTP on loopback, as the daemon and curl would use it."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import re
import shutil
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator, validate

from daemon import ALL_TYPES
from daemon.sandbox import (
    SANDBOX,
    TEST_KEY,
    Faults,
    SandboxSettings,
    add_arguments,
    create_app,
    settings_from_args,
)
from daemon.sandbox import answers as msg
from daemon.sandbox.account import UNLIMITED_CREDITS
from daemon.sandbox.admin import is_loopback, loopback_only
from daemon.sandbox.results import RESULT_SETS
from daemon.sandbox.spool import BOM, SpoolWriter

# IPQS's official definition (MIT), vendored so the conformance tests always run.
OPENAPI = Path(__file__).parent / "data" / "ipqs-openapi" / "openapi.bundled.yaml"
UPLOAD_PATH = "/json/csv/{apiKey}/{fileType}/upload"
STATUS_PATH = "/json/csv/{apiKey}/status/{csvId}"
LIST_PATH = "/json/csv/{apiKey}/list"
ACCOUNT_PATH = "/json/account/{apiKey}"

# Good and bad rows together: the official status schema types downloads.bad and .all as
# non-nullable URIs (it was written from a FINISHED example that had both).
EMAILS = b"email,name\r\nalice@example.com,Alice\r\nbob@example.org,Bob\r\n\r\nnot-an-email,X\r\n"

Session = aiohttp.ClientSession
Json = dict[str, Any]


# -- helpers ------------------------------------------------------------------------


@functools.cache
def _spec() -> Json:
    with OPENAPI.open(encoding="utf-8") as handle:
        spec: Json = yaml.safe_load(handle)
    return spec


def assert_schema(
    instance: Json, path: str, method: str, *, nullable_downloads: bool = False
) -> None:
    """Validate an answer against the OpenAPI 200 response schema of ``path``."""
    operation = _spec()["paths"][path][method]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    if nullable_downloads:
        # Before FINISHED every link is null, which the status schema (written from a
        # FINISHED example) does not allow for bad/all.
        schema = json.loads(json.dumps(schema))
        for name in ("bad", "all"):
            schema["properties"]["downloads"]["properties"][name]["nullable"] = True
    validate(instance, schema, cls=OAS30Validator)


def csv_form(content: bytes, field: str = "file", filename: str = "input.csv") -> aiohttp.FormData:
    """A multipart body as ``curl -F file=@input.csv`` builds it."""
    form = aiohttp.FormData()
    form.add_field(field, io.BytesIO(content), filename=filename, content_type="text/csv")
    return form


async def read_answer(response: aiohttp.ClientResponse) -> Json:
    assert response.status == 200, await response.text()
    assert response.headers["X-Powered-By"] == "IPQualityScore"
    assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
    answer: Json = json.loads(await response.read())
    assert re.fullmatch(r"[A-Za-z0-9]{10}", answer["request_id"])
    return answer


async def upload(
    http: Session,
    base: str,
    content: bytes = EMAILS,
    *,
    file_type: str = "email",
    key: str = TEST_KEY,
    query: dict[str, str] | None = None,
) -> Json:
    url = f"{base}/api/json/csv/{key}/{file_type}/upload"
    async with http.post(url, data=csv_form(content), params=query or {}) as response:
        return await read_answer(response)


async def call(http: Session, method: str, url: str, **kwargs: Any) -> Json:
    async with http.request(method, url, **kwargs) as response:
        return await read_answer(response)


async def status(http: Session, base: str, job_id: int | str, key: str = TEST_KEY) -> Json:
    return await call(http, "GET", f"{base}/api/json/csv/{key}/status/{job_id}")


async def admin(http: Session, base: str, path: str, body: Json | None = None) -> Any:
    method = "GET" if body is None else "POST"
    async with http.request(method, f"{base}/_sandbox/{path}", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def fetch(http: Session, link: str) -> tuple[int, str, bytes]:
    async with http.get(link) as response:
        return response.status, response.headers["Content-Type"], await response.read()


def assert_refused(answer: Json, message: str) -> None:
    assert answer["success"] is False
    assert answer["message"] == message
    assert set(answer) == {"success", "message", "request_id"}


def parse_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


async def wait_for(condition: Callable[[], bool], attempts: int = 500) -> None:
    """Poll, for up to about 5 s, a condition the server brings about on its own time."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not come true in time")


def incoming_files(settings: SandboxSettings) -> list[Path]:
    assert settings.spool_dir is not None
    return list((settings.spool_dir / "incoming").iterdir())


@pytest.fixture
async def http() -> AsyncIterator[Session]:
    async with aiohttp.ClientSession() as session:
        yield session


class FakeClock:
    """A clock that only moves when told: tests never wait on real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the official response schemas -------------------------------------------------


async def test_upload_answers_match_the_openapi_schema(sandbox, http):
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    answers = [
        await upload(http, sandbox.url),
        await call(http, "POST", endpoint, json={"input": [["a@b.c"]]}),
        await call(http, "GET", endpoint, params={"url": "https://example.com/x.csv"}),
    ]
    for answer in answers:
        assert_schema(answer, UPLOAD_PATH, "post")


async def test_status_answers_match_the_openapi_schema(sandbox, http):
    sandbox.state.settings.new_seconds = 5
    job = await upload(http, sandbox.url)
    new = await status(http, sandbox.url, job["id"])
    assert new["status"] == "NEW"
    assert_schema(new, STATUS_PATH, "get", nullable_downloads=True)
    sandbox.state.advance(5)
    finished = await status(http, sandbox.url, job["id"])
    assert finished["status"] == "FINISHED"
    assert_schema(finished, STATUS_PATH, "get")


async def test_list_answers_match_the_openapi_schema(sandbox, http):
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/list"
    assert_schema(await call(http, "GET", endpoint), LIST_PATH, "get")
    for _ in range(3):
        await upload(http, sandbox.url)
    listed = await call(http, "GET", endpoint)
    assert len(listed["csvs"]) == 3
    assert_schema(listed, LIST_PATH, "get")


# -- uploads ------------------------------------------------------------------------


@pytest.mark.parametrize("file_type", ["email", "proxy", "phone", "url", "leaked_password"])
async def test_multipart_upload_answers_like_the_openapi_example(sandbox, http, file_type):
    answer = await upload(http, sandbox.url, b"value-1\nvalue-2\n", file_type=file_type)

    assert answer["success"] is True and answer["message"] == "Success"
    assert answer["type"] == file_type and answer["status"] == "NEW"
    assert answer["aborted"] is None and answer["strictness"] == 0
    assert answer["downloads"] == {"pristine": None, "clean": None, "bad": None, "all": None}
    assert answer["status_url"] == (
        f"{sandbox.url}/api/json/csv/{TEST_KEY}/status/{answer['id']}"
    )
    assert re.fullmatch(rf"{file_type}_\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", answer["file_name"])
    [entry] = sandbox.state.uploads
    assert entry["sha256"] == hashlib.sha256(b"value-1\nvalue-2\n").hexdigest()
    assert (entry["method"], entry["rows"], entry["bytes"]) == ("multipart", 2, 16)
    assert entry["key_hint"] == TEST_KEY[-4:] and entry["url"] is None


async def test_ids_increase_and_the_file_part_may_have_any_field_name(sandbox, http):
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    form = aiohttp.FormData()
    form.add_field("note", "first the fields")
    form.add_field("whatever", io.BytesIO(EMAILS), filename="x.csv")
    first = await upload(http, sandbox.url)
    second = await call(http, "POST", url, data=form, params={"file_name": "mine.csv"})

    assert second["id"] == first["id"] + 1
    assert second["file_name"] == "mine.csv"
    assert [u["file_name"] for u in sandbox.state.uploads] == [first["file_name"], "mine.csv"]


async def test_json_rows_upload(sandbox, http):
    body = {"input": [["+1 555 0100 1234", "extra"], ["12"]], "file_name": "phones"}
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/phone/upload"
    answer = await call(http, "POST", url, json=body)

    assert (answer["type"], answer["file_name"]) == ("phone", "phones")
    [entry] = sandbox.state.uploads
    assert (entry["method"], entry["rows"]) == ("json", 2)
    stored = (sandbox.state.jobs[answer["id"]].input_path).read_bytes()
    assert stored == b"+1 555 0100 1234,extra\r\n12\r\n"
    assert entry["sha256"] == hashlib.sha256(stored).hexdigest()


@pytest.mark.parametrize(
    ("how", "file_type"),
    [("query GET", "proxy"), ("form POST", "url"), ("json url", "email"), ("json input", "phone")],
)
async def test_upload_by_url_fabricates_twenty_rows(sandbox, http, how, file_type):
    link = "https://files.example/list.csv?token=abc"
    endpoint = f"{sandbox.url}/api/json/csv/upload"
    params = {"key": TEST_KEY, "type": file_type}
    if how == "query GET":
        answer = await call(http, "GET", endpoint, params={**params, "url": link})
    elif how == "form POST":
        answer = await call(http, "POST", endpoint, data={**params, "url": link})
    else:
        field = "url" if how == "json url" else "input"
        answer = await call(http, "POST", endpoint, json={**params, field: link})

    assert answer["type"] == file_type
    [entry] = sandbox.state.uploads
    assert (entry["method"], entry["url"], entry["rows"]) == ("url", link, 20)


async def test_upload_by_url_is_deterministic(sandbox, http):
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    for _ in range(2):
        await call(http, "GET", endpoint, params={"url": "http://example.com/a.csv"})
    first, second = sandbox.state.uploads
    assert first["sha256"] == second["sha256"]


async def test_upload_by_url_really_fetches_from_loopback_when_enabled(http, start_sandbox):
    served = b"ip\r\n192.0.2.1\r\n198.51.100.7\r\n"

    async def serve_csv(request: web.Request) -> web.Response:
        return web.Response(body=served, content_type="text/csv")

    source = web.Application()
    source.router.add_get("/data.csv", serve_csv)
    source_server = TestServer(source, host="127.0.0.1", port=0)
    await source_server.start_server()
    try:
        base = (await start_sandbox(SandboxSettings(fetch_urls=True))).url
        endpoint = f"{base}/api/json/csv/{TEST_KEY}/proxy/upload"
        good = f"http://127.0.0.1:{source_server.port}/data.csv"
        missing = f"http://127.0.0.1:{source_server.port}/missing.csv"
        answer = await call(http, "POST", endpoint, data={"url": good})
        assert answer["success"] is True
        uploads = await admin(http, base, "uploads")
        assert uploads["uploads"][0]["sha256"] == hashlib.sha256(served).hexdigest()
        for refused in (missing, "http://192.0.2.10/x.csv", "ftp://127.0.0.1/x.csv"):
            answer = await call(http, "POST", endpoint, data={"url": refused})
            assert_refused(answer, msg.FETCH_FAILED)
    finally:
        await source_server.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_real_curl_uploads_with_all_three_methods(sandbox, tmp_path):
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    source = tmp_path / "x.csv"
    source.write_bytes(EMAILS)
    commands = [
        ["-F", f"file=@{source}", endpoint],
        ["-X", "POST", "-H", "Content-Type: application/json", "-d",
         '{"input":[["a@b.c"]]}', endpoint],
        ["--data-urlencode", "url=https://example.com/emails.csv?x=1&y=2", endpoint],
    ]
    for arguments in commands:
        process = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "10", *arguments,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0, err
        assert json.loads(out)["success"] is True, out
    methods = [(u["method"], u["url"]) for u in sandbox.state.uploads]
    assert methods == [
        ("multipart", None), ("json", None), ("url", "https://example.com/emails.csv?x=1&y=2")
    ]
    assert sandbox.state.uploads[0]["sha256"] == hashlib.sha256(EMAILS).hexdigest()


@pytest.mark.parametrize("where", ["path", "query", "form", "json", "header"])
async def test_the_key_can_come_from_the_path_a_parameter_or_the_header(sandbox, http, where):
    base = f"{sandbox.url}/api/json/csv"
    if where == "path":
        kwargs: Json = {"url": f"{base}/{TEST_KEY}/email/upload", "data": csv_form(EMAILS)}
    elif where == "query":
        kwargs = {"url": f"{base}/upload", "params": {"key": TEST_KEY, "type": "email"},
                  "data": csv_form(EMAILS)}
    elif where == "form":
        form = csv_form(EMAILS)
        form.add_field("key", TEST_KEY)
        form.add_field("type", "email")
        kwargs = {"url": f"{base}/upload", "data": form}
    elif where == "json":
        kwargs = {"url": f"{base}/upload",
                  "json": {"key": TEST_KEY, "type": "email", "input": [["a@b.c"]]}}
    else:
        kwargs = {"url": f"{base}/upload", "params": {"type": "email"},
                  "headers": {"IPQS-KEY": TEST_KEY}, "data": csv_form(EMAILS)}
    answer = await call(http, "POST", **kwargs)

    assert answer["success"] is True
    assert f"/csv/{TEST_KEY}/status/" in answer["status_url"]
    job_id = answer["id"]
    header = {"IPQS-KEY": TEST_KEY}
    finished = [
        await call(http, "GET", f"{base}/status/{job_id}", headers=header),
        await call(http, "GET", f"{base}/status", params={"id": job_id, "key": TEST_KEY}),
        await call(http, "POST", f"{base}/status", data={"id": str(job_id), "key": TEST_KEY}),
        await call(http, "POST", f"{base}/{TEST_KEY}/status/{job_id}"),
    ]
    assert {answer["status"] for answer in finished} == {"FINISHED"}
    listed = await call(http, "GET", f"{base}/list", headers=header)
    assert [item["id"] for item in listed["csvs"]] == [job_id]


# -- upload refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", msg.EMPTY_FILE),
        (b"\r\n  \n\t\r\n", msg.EMPTY_FILE),
        (b"a@b.c\n\x00\n", msg.NOT_CSV),
        (b"caf\xe9@example.com\n", msg.NOT_CSV),
    ],
    ids=["empty", "blank-lines", "nul-byte", "not-utf8"],
)
async def test_unusable_files_are_refused(sandbox, http, content, message):
    assert_refused(await upload(http, sandbox.url, content), message)
    assert sandbox.state.uploads == [] and incoming_files(sandbox.state.settings) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": []}, msg.EMPTY_INPUT),
        ({"input": [["a@b.c", 1]]}, msg.BAD_ROWS),
        ({"input": ["a@b.c"]}, msg.BAD_ROWS),
        ({"input": [[""], ["  "]]}, msg.EMPTY_FILE),
        ({}, msg.NO_FILE),
    ],
)
async def test_bad_json_uploads_are_refused(sandbox, http, body, message):
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    assert_refused(await call(http, "POST", url, json=body), message)
    assert sandbox.state.uploads == []


async def test_body_that_is_not_json_is_refused(sandbox, http):
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    headers = {"Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]"):
        assert_refused(await call(http, "POST", url, data=body, headers=headers), msg.BAD_JSON)


async def test_requests_without_a_file_or_with_two_files_are_refused(sandbox, http):
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    two = csv_form(EMAILS)
    two.add_field("second", io.BytesIO(b"x@y.z\n"), filename="b.csv")
    fields_only = aiohttp.FormData({"file_name": "nothing"}, default_to_multipart=True)

    assert_refused(await call(http, "POST", url), msg.NO_FILE)
    assert_refused(await call(http, "POST", url, data=fields_only), msg.NO_FILE)
    assert_refused(await call(http, "POST", url, data=two), msg.MANY_FILES)
    assert sandbox.state.uploads == [] and incoming_files(sandbox.state.settings) == []


@pytest.mark.parametrize(
    "link", ["file:///etc/passwd", "javascript:alert(1)", "example.com/x.csv", "http://"]
)
async def test_links_without_an_allowed_scheme_are_refused(sandbox, http, link):
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    assert_refused(await call(http, "POST", url, data={"url": link}), msg.BAD_URL)


async def test_unknown_type_is_refused(sandbox, http):
    assert_refused(await upload(http, sandbox.url, file_type="bitcoin"), msg.INVALID_TYPE)
    keyless = f"{sandbox.url}/api/json/csv/upload"
    answer = await call(http, "POST", keyless, json={"key": TEST_KEY, "input": [["a"]]})
    assert_refused(answer, msg.INVALID_TYPE)


async def test_multipart_without_content_length_is_refused(sandbox):
    # What a client streaming with chunked transfer encoding sends; IPQS warns against it.
    boundary = "b0undary"
    part = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.csv\"\r\n"
        f"\r\na@b.c\r\n--{boundary}--\r\n"
    ).encode()
    head = (
        f"POST /api/json/csv/{TEST_KEY}/email/upload HTTP/1.1\r\nHost: sandbox\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    body = f"{len(part):x}\r\n".encode() + part + b"\r\n0\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.server.port)
    writer.write(head + body)
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()

    status_line, _, answer = raw.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 200")
    assert_refused(json.loads(answer), msg.NO_CONTENT_LENGTH)
    assert sandbox.state.uploads == []


async def test_invalid_keys_are_refused_everywhere(sandbox, http):
    base = f"{sandbox.url}/api/json/csv"
    job = await upload(http, sandbox.url)
    keyless_upload = await call(http, "POST", f"{base}/upload?type=email", data=csv_form(EMAILS))
    assert_refused(keyless_upload, msg.INVALID_KEY)

    sandbox.state.settings.key = TEST_KEY
    wrong = "some-other-key"
    assert_refused(await upload(http, sandbox.url, key=wrong), msg.INVALID_KEY)
    assert_refused(await status(http, sandbox.url, job["id"], key=wrong), msg.INVALID_KEY)
    assert_refused(await call(http, "GET", f"{base}/{wrong}/list"), msg.INVALID_KEY)
    assert len(sandbox.state.uploads) == 1


@pytest.mark.parametrize("cut", ["inside the file", "after the file"])
async def test_a_multipart_body_cut_short_creates_nothing(sandbox, cut):
    await _send_truncated_upload(sandbox.server.port, file_complete=cut == "after the file")
    await wait_for(lambda: sandbox.state.stats.abandoned["upload"] == 1)
    assert incoming_files(sandbox.state.settings) == []
    assert sandbox.state.uploads == [] and sandbox.state.jobs == {}


async def test_a_body_cut_short_creates_nothing_without_handler_cancellation(sandbox_settings):
    # run_app's default: the handler is not cancelled; reading the body fails instead.
    app = create_app(sandbox_settings)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await _send_truncated_upload(port, file_complete=True)
        state = app[SANDBOX]
        await wait_for(lambda: state.stats.abandoned["upload"] == 1)
        assert incoming_files(sandbox_settings) == []
        assert state.uploads == [] and state.jobs == {}
    finally:
        await runner.cleanup()


async def _send_truncated_upload(port: int, *, file_complete: bool) -> None:
    """Send part of a multipart upload, then close: inside the file, or in a later part."""
    boundary = "cut"
    start_of_body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.csv\"\r\n"
        "\r\n" + "a@b.c\r\n" * 1000
    ).encode()
    if file_complete:
        # A long second part: the part reader looks ahead well past the first boundary.
        start_of_body += (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"more\"; "
            f"filename=\"y.csv\"\r\n\r\n" + "b@c.d\r\n" * 200_000
        ).encode()
    head = (
        f"POST /api/json/csv/{TEST_KEY}/email/upload HTTP/1.1\r\nHost: sandbox\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(start_of_body) + 100_000}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + start_of_body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


# -- status and lifecycle -----------------------------------------------------------


async def test_lifecycle_follows_the_sandbox_clock(sandbox, http):
    clock = FakeClock()
    settings = sandbox.state.settings
    settings.clock, settings.new_seconds = clock, 10
    settings.processing_seconds, settings.per_row_seconds = 20, 1
    job = await upload(http, sandbox.url)  # 4 non-blank lines: 10 s NEW, 24 s PROCESSING

    seen = []
    for step in (0, 9.9, 0.2, 23.7, 0.3):
        sandbox.state.advance(step)
        answer = await status(http, sandbox.url, job["id"])
        seen.append(answer["status"])
        if answer["status"] != "FINISHED":
            assert set(answer["downloads"].values()) == {None}
            assert answer["aborted"] is False and answer["invalid_records"] == 0
            assert "status_url" not in answer
    assert seen == ["NEW", "NEW", "PROCESSING", "PROCESSING", "FINISHED"]


async def test_finished_status_and_its_links(sandbox, http):
    job = await upload(http, sandbox.url)
    answer = await status(http, sandbox.url, job["id"])

    assert answer["status"] == "FINISHED" and answer["aborted"] is False
    assert answer["invalid_records"] == 1
    bad = urlsplit(answer["downloads"]["bad"])
    query = parse_qs(bad.query)
    assert f"{bad.scheme}://{bad.netloc}" == sandbox.url and bad.path == "/download"
    assert re.fullmatch(r"[A-Za-z0-9]{256}", query["download"][0])
    assert query["filename"] == [
        f"{job['file_name']}-IPQualityScore-Email-Verification-Invalid-Results.csv"
    ]
    assert "filename=email_" in answer["downloads"]["bad"]
    assert "+" in answer["downloads"]["bad"] and "%3A" in answer["downloads"]["bad"]


@pytest.mark.parametrize("job_id", ["99", "abc", "3868534.0", "3_868_534", "+3868534"])
async def test_unknown_or_malformed_ids_are_refused(sandbox, http, job_id):
    await upload(http, sandbox.url)
    assert_refused(await status(http, sandbox.url, job_id), msg.INVALID_ID)


async def test_a_job_belongs_to_its_key(sandbox, http):
    job = await upload(http, sandbox.url)
    assert_refused(await status(http, sandbox.url, job["id"], key="another-key"), msg.INVALID_ID)
    other = await call(http, "GET", f"{sandbox.url}/api/json/csv/another-key/list")
    assert other["csvs"] == [] and other["total_csvs"] == 0


# -- downloads and results ----------------------------------------------------------


async def test_download_links_are_one_time_and_fresh_on_every_status(sandbox, http):
    job = await upload(http, sandbox.url)
    first = (await status(http, sandbox.url, job["id"]))["downloads"]
    second = (await status(http, sandbox.url, job["id"]))["downloads"]
    assert first["all"] != second["all"] and first["bad"] != second["bad"]

    code, content_type, body = await fetch(http, first["all"])
    assert (code, content_type) == (200, "text/csv; charset=UTF-8")
    async with http.get(second["all"]) as response:
        assert response.headers["Content-Length"] == str(len(body))
        assert await response.read() == body
    for used in (first["all"], second["all"], f"{sandbox.url}/download?download=nope"):
        async with http.get(used) as response:
            assert_refused(await read_answer(response), msg.LINK_DEAD)


async def test_download_links_expire_after_fifteen_minutes(sandbox, http):
    job = await upload(http, sandbox.url)
    early = (await status(http, sandbox.url, job["id"]))["downloads"]
    late = (await status(http, sandbox.url, job["id"]))["downloads"]
    sandbox.state.advance(899)
    assert (await fetch(http, early["all"]))[0:2] == (200, "text/csv; charset=UTF-8")
    sandbox.state.advance(2)  # 901 s after minting
    async with http.get(late["all"]) as response:
        assert_refused(await read_answer(response), msg.LINK_DEAD)


async def test_results_are_deterministic_and_sorted_into_sets(sandbox, http):
    content = b"\xef\xbb\xbfemail,name\r\n" + b"".join(
        f"user{n}@example.com,N{n}\r\n".encode() for n in range(60)
    ) + b"broken-address,Z\r\n"
    downloaded = []
    for name in ("one", "two"):
        job = await upload(http, sandbox.url, content, query={"file_name": name})
        links = (await status(http, sandbox.url, job["id"]))["downloads"]
        downloaded.append({k: (await fetch(http, v))[2] for k, v in links.items() if v})

    assert downloaded[0] == downloaded[1]
    sets = {name: parse_rows(downloaded[0].get(name, b"")) for name in RESULT_SETS}
    header, *rows = sets["all"]
    assert header[:2] == ["email", "valid"] and "fraud_score" in header
    assert len(rows) == 61  # the header row of the input is not a lookup
    expected = [f"user{n}@example.com" for n in range(60)] + ["broken-address"]
    assert [row[0] for row in rows] == expected
    assert all(row[-1].startswith(("N", "Z")) for row in rows)  # other cells are kept
    score = header.index("fraud_score")
    bad = [r for r in rows if int(r[score]) >= 85 or "@" not in r[0]]
    clean = [r for r in rows if r not in bad]
    assert sets["bad"][1:] == bad
    assert [r[0] for r in bad if "@" not in r[0]] == ["broken-address"]
    assert sets["clean"][1:] == clean
    pristine = [r for r in clean if int(r[score]) < 25]
    assert sets["pristine"][1:] == pristine
    assert bad and clean and pristine  # the input exercises every set


@pytest.mark.parametrize(
    ("content", "names", "tails"),
    [
        (b"email,name,city\r\na@example.com,Ann,Oslo\r\nb@example.com\r\n"
         b"c@example.com,Cy,Rome,extra,more\r\n", ["name", "city", "input_4", "input_5"],
         [["Ann", "Oslo", "", ""], ["", "", "", ""], ["Cy", "Rome", "extra", "more"]]),
        (b"a@example.com,x,y\r\nbroken,z\r\n", ["input_2", "input_3"],
         [["x", "y"], ["z", ""]]),
    ],
)
async def test_result_rows_have_the_header_width_with_several_input_columns(
    sandbox, http, content, names, tails
):
    job = await upload(http, sandbox.url, content)
    links = (await status(http, sandbox.url, job["id"]))["downloads"]
    for name, link in links.items():
        if link is None:
            continue
        header, *rows = parse_rows((await fetch(http, link))[2])
        assert header[-len(names):] == names
        assert rows and all(len(row) == len(header) for row in rows), (header, rows)
        if name == "all":  # the input's own cells, unchanged, in their named columns
            assert [row[-len(names):] for row in rows] == tails


@pytest.mark.parametrize("file_type", ALL_TYPES)
async def test_every_type_gets_named_result_files(sandbox, http, file_type):
    product = {
        "email": "Email-Verification", "proxy": "Proxy-Detection", "phone": "Phone-Validation",
        "url": "URL-Scanner", "leaked_email": "Leaked-Email",
        "leaked_password": "Leaked-Password", "leaked_username": "Leaked-Username",
    }[file_type]
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/{file_type}/upload"
    params = {"url": "https://example.com/x.csv", "file_name": "f"}
    job = await call(http, "GET", endpoint, params=params)
    answer = await status(http, sandbox.url, job["id"])

    # Fabricated content makes every fifth row syntactically invalid where a type can be.
    can_be_invalid = file_type not in ("leaked_password", "leaked_username")
    assert answer["invalid_records"] == (4 if can_be_invalid else 0)
    all_rows = parse_rows((await fetch(http, answer["downloads"]["all"]))[2])
    assert len(all_rows) == 21
    for name, link in answer["downloads"].items():
        label = {"pristine": "Pristine", "clean": "Clean", "bad": "Invalid", "all": "All"}[name]
        if link is not None:
            filename = parse_qs(urlsplit(link).query)["filename"][0]
            assert filename == f"f-IPQualityScore-{product}-{label}-Results.csv"


# -- list ---------------------------------------------------------------------------


async def test_list_pages_newest_first_with_a_type_filter(sandbox, http):
    ids = []
    for n in range(120):
        file_type = "phone" if n % 3 == 0 else "email"
        query = {"file_name": f"f{n}"}
        job = await upload(http, sandbox.url, b"5551234567\n", file_type=file_type, query=query)
        ids.append(job["id"])
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/list"
    pages = [await call(http, "GET", endpoint, params={"page": str(p)}) for p in (1, 2, 3, 4)]

    assert [len(p["csvs"]) for p in pages] == [50, 50, 20, 0]
    assert {(p["total_csvs"], p["total_pages"]) for p in pages} == {(120, 3)}
    assert [p["page"] for p in pages] == [1, 2, 3, 4]
    listed = [item["id"] for page in pages for item in page["csvs"]]
    assert listed == ids[::-1]
    item = pages[0]["csvs"][0]
    assert set(item) == {"id", "file_name", "type", "strictness", "status", "aborted",
                         "invalid_records", "status_url"}
    assert item["aborted"] is False and item["status_url"].endswith(f"/status/{ids[-1]}")
    phones = await call(http, "GET", endpoint, params={"type": "phone"})
    assert (phones["total_csvs"], phones["total_pages"], len(phones["csvs"])) == (40, 1, 40)
    assert {item["type"] for item in phones["csvs"]} == {"phone"}
    default = await call(http, "GET", endpoint)
    assert default["page"] == 1 and default["csvs"] == pages[0]["csvs"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"type": "bitcoin"}, msg.INVALID_TYPE),
        ({"page": "0"}, msg.INVALID_PAGE),
        ({"page": "-3"}, msg.INVALID_PAGE),
        ({"page": "two"}, msg.INVALID_PAGE),
        ({"page": "1_0"}, msg.INVALID_PAGE),
    ],
)
async def test_list_refuses_bad_parameters(sandbox, http, params, message):
    answer = await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list", params=params)
    assert_refused(answer, message)


async def test_empty_list(sandbox, http):
    answer = await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list")
    assert (answer["csvs"], answer["total_csvs"], answer["total_pages"]) == ([], 0, 0)


# -- XML ----------------------------------------------------------------------------


async def test_xml_paths_answer_the_same_fields_in_a_result_element(sandbox, http):
    base = f"{sandbox.url}/api/xml/csv/{TEST_KEY}"
    async with http.post(f"{base}/email/upload", data=csv_form(EMAILS)) as response:
        assert response.headers["Content-Type"] == "text/xml;charset=UTF-8"
        uploaded = ET.fromstring(await response.read())
    assert uploaded.tag == "result"
    job_id = uploaded.findtext("id")
    assert uploaded.findtext("status_url") == f"{base}/status/{job_id}"
    aborted, downloads = uploaded.find("aborted"), uploaded.find("downloads")
    assert aborted is not None and aborted.text is None and len(aborted) == 0  # null
    assert uploaded.findtext("success") == "true"
    assert downloads is not None
    assert [(child.tag, child.text) for child in downloads] == [
        ("pristine", None), ("clean", None), ("bad", None), ("all", None)
    ]
    async with http.get(f"{base}/list") as response:
        listed = ET.fromstring(await response.read())
    assert [csv_item.findtext("id") for csv_item in listed.iter("csv")] == [job_id]
    async with http.get(f"{base}/status/nope") as response:
        refused = ET.fromstring(await response.read())
    assert refused.findtext("message") == msg.INVALID_ID


# -- faults -------------------------------------------------------------------------


async def test_drop_closes_the_connection_before_anything_is_created(sandbox, http):
    sandbox.state.faults.drop_rate = 1
    with pytest.raises(aiohttp.ClientConnectionError):
        await upload(http, sandbox.url)
    # POST: aiohttp silently sends an idempotent (GET) request a second time after a drop.
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "POST", f"{sandbox.url}/api/json/csv/{TEST_KEY}/status/1")
    assert sandbox.state.uploads == [] and sandbox.state.jobs == {}
    stats = await admin(http, sandbox.url, "stats")
    assert stats["requests"] == {"upload": 1, "status": 1}
    assert stats["faults"] == {"drop": 2}
    sandbox.state.faults.drop_rate = 0
    assert (await upload(http, sandbox.url))["success"] is True


async def test_lost_answer_creates_the_job_but_never_answers(sandbox, http):
    sandbox.state.faults.lost_answer_rate = 1
    with pytest.raises(aiohttp.ClientConnectionError):
        await upload(http, sandbox.url, query={"file_name": "lost.csv"})

    [entry] = (await admin(http, sandbox.url, "uploads"))["uploads"]
    assert entry["file_name"] == "lost.csv"
    assert entry["sha256"] == hashlib.sha256(EMAILS).hexdigest()
    # What the daemon does after a lost answer: find the upload again by its file_name.
    listed = await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list")
    assert [item["file_name"] for item in listed["csvs"]] == ["lost.csv"]
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {"lost_answer": 1}


@pytest.mark.parametrize(
    ("code", "knob"), [(403, "rate_limit_403_rate"), (429, "rate_limit_429_rate")]
)
async def test_rate_limits_answer_with_retry_after(sandbox, http, code, knob):
    setattr(sandbox.state.faults, knob, 1)
    sandbox.state.faults.retry_after_seconds = 7
    async with http.get(f"{sandbox.url}/api/json/csv/{TEST_KEY}/list") as response:
        assert response.status == code
        assert response.headers["Retry-After"] == "7"
        answer = await response.json()
    assert answer["success"] is False and answer["message"]
    sandbox.state.faults.retry_after_seconds = 0.25
    endpoint = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
    async with http.post(endpoint, data=csv_form(EMAILS)) as response:
        assert (response.status, response.headers["Retry-After"]) == (code, "0.25")
    assert sandbox.state.uploads == []


async def test_server_errors_pick_500_502_or_503_reproducibly(sandbox, http):
    async def codes() -> list[int]:
        found = []
        for _ in range(30):
            async with http.get(f"{sandbox.url}/api/json/csv/{TEST_KEY}/list") as response:
                found.append(response.status)
                if response.status != 200:
                    assert response.headers["Content-Type"].startswith("text/html")
                    assert str(response.status) in await response.text()
        return found

    await admin(http, sandbox.url, "faults", {"error_5xx_rate": 0.5, "seed": 42})
    first = await codes()
    await admin(http, sandbox.url, "faults", {"seed": 42})  # the same seed starts over
    assert await codes() == first
    await admin(http, sandbox.url, "reset", {})
    await admin(http, sandbox.url, "faults", {"error_5xx_rate": 0.5, "seed": 42})
    assert await codes() == first
    assert set(first) == {200, 500, 502, 503}


async def test_rate_faults_only_hit_the_chosen_operations(sandbox, http):
    sandbox.state.faults.error_5xx_rate = 1
    sandbox.state.faults.operations = frozenset({"download"})
    job = await upload(http, sandbox.url)
    links = (await status(http, sandbox.url, job["id"]))["downloads"]
    assert (await fetch(http, links["all"]))[0] in (500, 502, 503)
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {"error_5xx": 1}


async def test_credits_run_out(sandbox, http):
    sandbox.state.faults.credits = 6
    assert (await upload(http, sandbox.url))["success"] is True  # 4 rows
    assert_refused(await upload(http, sandbox.url), msg.NO_CREDITS)
    assert (await upload(http, sandbox.url, b"a@b.c\nd@e.f\n"))["success"] is True
    assert sandbox.state.faults.credits == 0 and len(sandbox.state.uploads) == 2
    assert (await admin(http, sandbox.url, "faults"))["credits"] == 0


async def test_account_answers_match_the_openapi_schema(sandbox, http):
    answer = await call(http, "GET", f"{sandbox.url}/api/json/account/{TEST_KEY}")
    assert_schema(answer, ACCOUNT_PATH, "get")
    assert answer["credits"] == UNLIMITED_CREDITS and answer["usage"] == 0
    sandbox.state.faults.credits = 50
    await upload(http, sandbox.url)  # 4 email rows, the header line included
    await upload(http, sandbox.url, b"1.2.3.4\n", file_type="proxy")
    await upload(http, sandbox.url, b"a@b.c\n", file_type="leaked_email")
    answer = await call(http, "GET", f"{sandbox.url}/api/json/account/{TEST_KEY}")
    assert_schema(answer, ACCOUNT_PATH, "get")
    assert (answer["credits"], answer["usage"]) == (50 - 4 - 1 - 1, 6)
    assert (answer["email_usage"], answer["proxy_usage"], answer["phone_usage"]) == (4, 1, 0)


async def test_account_takes_the_key_in_the_path_a_parameter_or_the_header(sandbox, http):
    sandbox.state.settings.key = TEST_KEY
    base = f"{sandbox.url}/api/json/account"
    for method, url, kwargs in (
        ("GET", f"{base}/{TEST_KEY}", {}),
        ("GET", base, {"params": {"key": TEST_KEY}}),
        ("POST", base, {"data": {"key": TEST_KEY}}),
        ("GET", base, {"headers": {"IPQS-KEY": TEST_KEY}}),
    ):
        assert (await call(http, method, url, **kwargs))["success"] is True, (method, kwargs)
    assert_refused(await call(http, "GET", f"{base}/wrong-key"), msg.INVALID_KEY)
    assert_refused(await call(http, "GET", base), msg.INVALID_KEY)
    async with http.get(f"{sandbox.url}/api/xml/account/{TEST_KEY}") as response:
        assert ET.fromstring(await response.read()).findtext("credits") == str(UNLIMITED_CREDITS)


async def test_uploads_debit_their_rows_and_the_admin_sets_the_balance(sandbox, http):
    account = f"{sandbox.url}/api/json/account/{TEST_KEY}"
    await admin(http, sandbox.url, "faults", {"credits": 7})
    assert (await upload(http, sandbox.url))["success"] is True  # 4 rows
    refused = await upload(http, sandbox.url)  # 4 rows > 3 left: refused, nothing charged
    assert_refused(refused, "You have insufficient credits to make this query.")
    assert (await call(http, "GET", account))["credits"] == 3
    await admin(http, sandbox.url, "faults", {"credits": 1000})  # a top-up while running
    assert (await upload(http, sandbox.url))["success"] is True
    answer = await call(http, "GET", account)
    assert (answer["credits"], answer["email_usage"]) == (996, 8)
    assert len(sandbox.state.uploads) == 2


async def test_account_missing_fault_answers_404(sandbox, http):
    await admin(http, sandbox.url, "faults", {"account_missing": True})
    async with http.get(f"{sandbox.url}/api/json/account/{TEST_KEY}") as response:
        assert response.status == 404
    assert (await upload(http, sandbox.url))["success"] is True  # only the account API
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {"account_missing": 1}


async def test_invalid_key_fault_refuses_every_call(sandbox, http):
    job = await upload(http, sandbox.url)
    sandbox.state.faults.invalid_key = True
    assert_refused(await upload(http, sandbox.url), msg.INVALID_KEY)
    assert_refused(await status(http, sandbox.url, job["id"]), msg.INVALID_KEY)
    listed = await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list")
    assert_refused(listed, msg.INVALID_KEY)
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {"invalid_key": 3}


async def test_outage_drops_every_api_call_but_not_admin(sandbox, http):
    job = await upload(http, sandbox.url)
    links = (await status(http, sandbox.url, job["id"]))["downloads"]
    sandbox.state.faults.outage = True
    sandbox.state.faults.operations = frozenset()  # outage ignores the operation filter
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: upload(http, sandbox.url),
        lambda: status(http, sandbox.url, job["id"]),
        lambda: fetch(http, links["all"]),
    ]
    for attempt in attempts:
        with pytest.raises(aiohttp.ClientConnectionError):
            await attempt()
    stats = await admin(http, sandbox.url, "stats")
    # aiohttp resends a dropped GET once by itself, so count requests rather than calls.
    dropped = sum(stats["requests"].values()) - 2  # the upload and status before the outage
    assert stats["faults"] == {"outage": dropped} and dropped >= 3


async def test_latency_delays_api_answers_only(sandbox, http):
    sandbox.state.faults.latency_ms = 150
    loop = asyncio.get_running_loop()
    started = loop.time()
    await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list")
    assert loop.time() - started >= 0.15
    await admin(http, sandbox.url, "uploads")
    # Counted once: the admin calls went around the fault middleware.
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {"latency": 1}


# -- odd answers --------------------------------------------------------------------


async def _raw_upload(http: Session, base: str, name: str) -> tuple[int, str, bytes]:
    url = f"{base}/api/json/csv/{TEST_KEY}/email/upload"
    async with http.post(url, data=csv_form(EMAILS), params={"file_name": name},
                         allow_redirects=False) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


@pytest.mark.parametrize(("form", "check"), [
    ("bom", lambda body: body.startswith(b"\xef\xbb\xbf{")),
    ("jsonp", lambda body: body.startswith(b"callback({") and body.endswith(b"});")),
    ("junk", lambda body: body.startswith(b"{") and body.rstrip().endswith(b"-->")),
    ("html", lambda body: body.startswith(b"<!DOCTYPE html>")),
    ("empty", lambda body: body == b""),
])
async def test_answer_forms_act_after_the_job_is_made(sandbox, http, form, check):
    sandbox.state.faults.answer_form = form
    status_code, content_type, body = await _raw_upload(http, sandbox.url, f"f-{form}")
    assert status_code == 200 and check(body)
    assert content_type.startswith("text/html") == (form == "html")
    assert [u["file_name"] for u in sandbox.state.uploads] == [f"f-{form}"]
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {f"answer_{form}": 1}


async def test_booleans_and_status_words_change_their_style(sandbox, http):
    await admin(http, sandbox.url, "faults", {"booleans": "string", "status_case": "title",
                                              "finished_status": "COMPLETED"})
    _, _, body = await _raw_upload(http, sandbox.url, "styled")
    job = json.loads(body)
    assert (job["success"], job["status"], job["aborted"]) == ("true", "New", None)
    done = await status(http, sandbox.url, job["id"])
    assert (done["success"], done["status"], done["aborted"]) == ("true", "Completed", "false")
    sandbox.state.faults.booleans = "number"
    listed = await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list")
    assert listed["success"] == 1 and listed["csvs"][0]["aborted"] == 0


@pytest.mark.parametrize(("form", "shape"), [("missing", None), ("empty_list", [])])
async def test_finished_answers_can_lack_their_downloads(sandbox, http, form, shape):
    job = await upload(http, sandbox.url)
    await admin(http, sandbox.url, "faults", {"downloads_form": form, "odd_answers": 1})
    odd = await status(http, sandbox.url, job["id"])
    assert odd["status"] == "FINISHED" and odd.get("downloads") == shape
    whole = await status(http, sandbox.url, job["id"])  # the count is used up
    assert whole["downloads"]["all"].startswith(sandbox.url)
    assert sandbox.state.faults.odd_answers == 0


async def test_a_truncated_download_has_no_length_and_ends_mid_line(sandbox, http):
    job = await upload(http, sandbox.url)
    links = (await status(http, sandbox.url, job["id"]))["downloads"]
    sandbox.state.faults.truncate_downloads = True
    sandbox.state.faults.odd_answers = 1
    async with http.get(links["all"]) as response:
        assert "Content-Length" not in response.headers
        assert "Transfer-Encoding" not in response.headers
        cut = await response.read()
    whole = (await fetch(http, (await status(http, sandbox.url, job["id"]))["downloads"]["all"]))
    assert whole[0] == 200 and whole[2].startswith(cut) and len(cut) < len(whole[2])
    assert not cut.endswith(b"\n")


async def test_a_download_can_be_an_html_page(sandbox, http):
    job = await upload(http, sandbox.url)
    links = (await status(http, sandbox.url, job["id"]))["downloads"]
    sandbox.state.faults.answer_form = "html"
    code, content_type, body = await fetch(http, links["all"])
    assert (code, content_type.split(";")[0]) == (200, "text/html") and b"<html>" in body


async def test_trickled_answers_take_a_byte_per_interval(sandbox, http):
    sandbox.state.faults.trickle_ms = 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    listed = await call(http, "GET", f"{sandbox.url}/api/json/csv/{TEST_KEY}/list")
    size = len(json.dumps(listed))
    assert loop.time() - started >= size * 0.002 * 0.9
    assert (await admin(http, sandbox.url, "stats"))["faults"] == {"trickle": 1}


async def test_redirects_point_elsewhere_and_do_nothing(sandbox, http):
    sandbox.state.faults.redirect_to = "http://other.invalid/"
    status_code, _, _ = await _raw_upload(http, sandbox.url, "moved")
    url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/status/1?x=1"
    async with http.get(url, allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == f"http://other.invalid/api/json/csv/{TEST_KEY}/status/1?x=1"
    assert status_code == 302 and sandbox.state.uploads == []


async def test_the_keyless_status_form_can_be_refused(sandbox, http):
    job = await upload(http, sandbox.url)
    sandbox.state.faults.keyless_status = False
    keyless = f"{sandbox.url}/api/json/csv/status/{job['id']}"
    async with http.get(keyless, headers={"IPQS-KEY": TEST_KEY}) as response:
        assert response.status == 404
    assert (await status(http, sandbox.url, job["id"]))["success"] is True


async def test_odd_answer_knobs_are_validated(sandbox, http):
    for body in ({"answer_form": "xml"}, {"booleans": True}, {"finished_status": 3},
                 {"redirect_to": "ftp://x"}, {"trickle_ms": -1}, {"odd_answers": -2},
                 {"keyless_status": "no"}, {"finished_status": " "}):
        async with http.post(f"{sandbox.url}/_sandbox/faults", json=body) as response:
            assert response.status == 400, body
    changed = await admin(http, sandbox.url, "faults", {"answer_form": "bom", "odd_answers": 2})
    assert (changed["answer_form"], changed["odd_answers"]) == ("bom", 2)
    await admin(http, sandbox.url, "reset", {})
    assert sandbox.state.faults.answer_form == "json"


# -- admin --------------------------------------------------------------------------


async def test_admin_fault_updates_are_validated_all_or_nothing(sandbox, http):
    update = {"drop_rate": 0.5, "operations": ["upload"]}
    changed = await admin(http, sandbox.url, "faults", update)
    assert changed["drop_rate"] == 0.5 and changed["operations"] == ["upload"]
    bad_updates: list[Any] = [
        {"drop_rate": 2}, {"nope": 1}, {"operations": ["upload", "x"]}, {"credits": -1},
        {"invalid_key": "yes"}, {"latency_ms": True}, {"seed": 1.5},
        {"drop_rate": 0.1, "latency_ms": -1}, [1, 2],
    ]
    for body in bad_updates:
        async with http.post(f"{sandbox.url}/_sandbox/faults", json=body) as response:
            assert response.status == 400, body
            assert (await response.json())["error"]
    assert await admin(http, sandbox.url, "faults") == changed
    assert sandbox.state.faults.operations == frozenset({"upload"})


async def test_admin_clock_and_reset(sandbox, http):
    job = await upload(http, sandbox.url)
    await admin(http, sandbox.url, "faults", {"credits": 100})
    moved = await admin(http, sandbox.url, "clock", {"advance": 30})
    assert moved["offset"] == 30
    async with http.post(f"{sandbox.url}/_sandbox/clock", json={"advance": -1}) as response:
        assert response.status == 400

    assert await admin(http, sandbox.url, "reset", {}) == {"reset": True}
    assert await admin(http, sandbox.url, "uploads") == {"uploads": []}
    cleared = {"requests": {}, "faults": {}, "abandoned": {}}
    assert await admin(http, sandbox.url, "stats") == cleared
    assert (await admin(http, sandbox.url, "faults"))["credits"] is None
    assert_refused(await status(http, sandbox.url, job["id"]), msg.INVALID_ID)
    assert (await upload(http, sandbox.url))["id"] == job["id"] + 1  # ids are never reused


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False), ("203.0.113.9", False), ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False), ("", False), (None, False), ("not an address", False),
    ],
)
def test_loopback_check(peer, allowed):
    assert is_loopback(peer) is allowed


async def test_admin_refuses_a_non_loopback_peer_over_http(sandbox_settings, http):
    @web.middleware
    async def pretend_remote_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request.clone(remote="203.0.113.9"))

    app = create_app(sandbox_settings)
    app.middlewares.insert(0, pretend_remote_peer)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"
        for method, path in [("GET", "uploads"), ("POST", "reset"), ("POST", "faults")]:
            async with http.request(method, f"{base}/_sandbox/{path}", json={}) as response:
                assert response.status == 403
        answer = await call(http, "GET", f"{base}/api/json/csv/{TEST_KEY}/list")
        assert answer["success"] is True  # the API itself serves anyone
    finally:
        await server.close()


async def test_loopback_middleware_on_a_mocked_request():
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    class Transport:
        def __init__(self, peer: str) -> None:
            self.peer = peer

        def get_extra_info(self, name: str, default: object = None) -> object:
            return (self.peer, 4242) if name == "peername" else default

    for peer, expected in (("198.51.100.4", 403), ("127.0.0.1", 200)):
        request = make_mocked_request("GET", "/_sandbox/uploads", transport=Transport(peer))
        assert (await loopback_only(request, handler)).status == expected


# -- streaming ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_200_mb_upload_is_streamed_in_constant_memory(sandbox, http, tmp_path):
    block = b"".join(f"user{n:07d}@example.com,extra,cells\r\n".encode() for n in range(30_000))
    blocks = (200 * 1024 * 1024) // len(block) + 1
    source = tmp_path / "big.csv"
    digest = hashlib.sha256()
    with source.open("wb") as handle:
        for _ in range(blocks):
            handle.write(block)
            digest.update(block)

    tracemalloc.start()
    try:
        with source.open("rb") as handle:
            form = aiohttp.FormData()
            form.add_field("file", handle, filename="big.csv", content_type="text/csv")
            url = f"{sandbox.url}/api/json/csv/{TEST_KEY}/email/upload"
            answer = await call(http, "POST", url, data=form)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert answer["success"] is True
    [entry] = sandbox.state.uploads
    assert entry["bytes"] == blocks * len(block) > 200 * 1024 * 1024
    assert entry["rows"] == blocks * 30_000
    assert entry["sha256"] == digest.hexdigest()
    assert peak < 20 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


@given(
    lines=st.lists(st.text(alphabet=" \t\rab,\x0c", max_size=6), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    bom=st.booleans(),
    final_newline=st.booleans(),
)
def test_rows_are_non_blank_lines_wherever_the_chunks_break(
    tmp_path_factory, lines, cuts, bom, final_newline
):
    text = "\n".join(lines) + ("\n" if final_newline else "")
    data = (BOM if bom else b"") + text.encode()
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]

    with SpoolWriter(tmp_path_factory.mktemp("rows") / "upload.csv") as sink:
        for start, end in itertools.pairwise(bounds):
            sink.write(data[start:end])

    assert sink.result.rows == sum(1 for line in text.split("\n") if line.strip(" \t\r\x0c"))
    assert sink.result.size == len(data) and sink.result.is_text
    assert sink.result.path.read_bytes() == data


# -- settings -----------------------------------------------------------------------


def test_command_line_flags_build_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args([
        "--port", "9000", "--key", "K", "--new-seconds", "0", "--per-row-seconds", "0.5",
        "--drop-rate", "0.25", "--error-5xx-rate", "1", "--credits", "10", "--outage",
        "--fault-operations", "upload,status", "--seed", "7", "--retry-after-seconds", "3",
        "--account-missing",
    ])
    settings = settings_from_args(ns)

    assert (ns.host, ns.port) == ("127.0.0.1", 9000)
    assert (settings.key, settings.new_seconds, settings.per_row_seconds) == ("K", 0, 0.5)
    assert settings.processing_seconds == SandboxSettings().processing_seconds
    assert settings.faults == Faults(
        drop_rate=0.25, error_5xx_rate=1, credits=10, outage=True, seed=7,
        retry_after_seconds=3, operations=frozenset({"upload", "status"}),
        account_missing=True,
    )
    odd = settings_from_args(parser.parse_args([
        "--answer-form", "html", "--booleans", "string", "--status-case", "lower",
        "--finished-status", "COMPLETED", "--downloads-form", "missing", "--odd-answers", "2",
        "--truncate-downloads", "--redirect-to", "http://127.0.0.1:9", "--trickle-ms", "5",
        "--refuse-keyless-status",
    ])).faults
    assert odd == Faults(answer_form="html", booleans="string", status_case="lower",
                         finished_status="COMPLETED", downloads_form="missing", odd_answers=2,
                         truncate_downloads=True, redirect_to="http://127.0.0.1:9",
                         trickle_ms=5, keyless_status=False)
    for bad in (["--drop-rate", "2"], ["--credits", "-1"], ["--fault-operations", "poll"],
                ["--answer-form", "xml"], ["--redirect-to", "ftp://x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_create_app_refuses_impossible_faults():
    with pytest.raises(ValueError, match="drop_rate"):
        create_app(SandboxSettings(faults=Faults(drop_rate=1.5)))
    assert dataclasses.replace(Faults(), latency_ms=5).latency_ms == 5
