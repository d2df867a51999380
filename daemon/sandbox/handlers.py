"""The emulated IPQS Bulk CSV endpoints: upload, status, list and download.

Fidelity assumptions, beyond those in the modules these handlers use:

* The default ``file_name`` is ``{type}_{YYYY-MM-DD HH:MM:SS}`` in UTC.
* In status and list answers ``aborted`` is ``false`` at every stage; only the upload
  answer has ``null`` (as the OpenAPI schemas type them). Status answers have no
  ``status_url``. ``invalid_records`` is 0 until the job is FINISHED.
* A job belongs to the key that uploaded it; asking with another key gets the same
  answer as an unknown id ("Invalid CSV ID."), so ids of other accounts cannot be probed.
* List pages hold 50 jobs, newest first; ``total_pages`` is ``ceil(total_csvs / 50)``
  (0 with no jobs); a page past the end is a success with an empty ``csvs``.
* A dead download link (used, expired or unknown) is answered HTTP 200 with a JSON
  ``success: false`` body, IPQS's usual failure convention; a client must check the
  Content-Type (``text/csv`` for a real download) rather than the status code.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from urllib.parse import quote

from aiohttp import hdrs, web

from daemon.sandbox import answers, odd
from daemon.sandbox.faults import DropConnection
from daemon.sandbox.receive import (
    Incoming,
    Refused,
    api_key,
    link_of,
    read_params,
    receive_upload,
    spool_link,
    whole_number,
)
from daemon.sandbox.results import RESULT_SETS
from daemon.sandbox.spool import SpooledFile
from daemon.sandbox.state import FINISHED, NEW, SANDBOX, Job, SandboxState

PAGE_SIZE = 50
#: The file types IPQS accepts (its OpenAPI enum). The emulator keeps its own copy: it
#: stands for IPQS, not for the daemon.
FILE_TYPES = ("proxy", "email", "phone", "url", "leaked_email", "leaked_password",
              "leaked_username")


def public_base(request: web.Request) -> str:
    """The base of status and download URLs: the configured one, else this request's."""
    configured = request.config_dict[SANDBOX].settings.public_url
    return configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"


def status_url(request: web.Request, fmt: str, job: Job) -> str:
    """Where to ask for a job's status; real IPQS puts the key in it."""
    return f"{public_base(request)}/api/{fmt}/csv/{job.key}/status/{job.id}"


async def upload(request: web.Request) -> web.StreamResponse:
    """``/api/{fmt}/csv/{key}/{type}/upload`` and ``/api/{fmt}/csv/upload``."""
    state = request.config_dict[SANDBOX]
    incoming = Incoming()
    try:
        await receive_upload(request, incoming, state.incoming_path(),
                             kib_per_second=state.faults.receive_kib_per_second)
        return await _accept(request, state, incoming)
    finally:
        incoming.discard()


async def _accept(request: web.Request, state: SandboxState, incoming: Incoming) -> web.Response:
    fmt, params = request.match_info["fmt"], incoming.params
    key = api_key(request, params)
    if not state.key_accepted(key):
        return answers.failure(fmt, answers.INVALID_KEY)
    file_type = request.match_info.get("type") or params.get("type", "")
    if file_type not in FILE_TYPES:
        return answers.failure(fmt, answers.INVALID_TYPE)
    try:
        spooled, method = await _content(state, incoming, file_type)
    except Refused as refused:
        return answers.failure(fmt, str(refused))
    if not state.take_credits(spooled.rows, file_type):
        return answers.failure(fmt, answers.NO_CREDITS)
    file_name = params.get("file_name") or _default_name(file_type)
    job = state.create_job(key, file_type, file_name, spooled, method, link_of(params))
    if "upload" in state.faults.operations and state.chance(state.faults.lost_answer_rate):
        state.fired("lost_answer")
        raise DropConnection  # the job exists; only the answer is lost
    return answers.answer(fmt, _upload_payload(request, fmt, job))


async def _content(
    state: SandboxState, incoming: Incoming, file_type: str
) -> tuple[SpooledFile, str]:
    """The stored file and the method it came by; ``Refused`` when there is none fit."""
    if incoming.problem is not None:
        raise Refused(incoming.problem)
    if incoming.file is not None and incoming.method is not None:
        spooled, method = incoming.file, incoming.method
    elif (url := link_of(incoming.params)) is not None:
        spooled = await spool_link(url, file_type, state.incoming_path(), state.http)
        incoming.file, method = spooled, "url"
    else:
        raise Refused(answers.NO_FILE)
    if not spooled.is_text:
        raise Refused(answers.NOT_CSV)
    if spooled.rows == 0:
        raise Refused(answers.EMPTY_FILE)
    return spooled, method


def _default_name(file_type: str) -> str:
    return f"{file_type}_{datetime.now(UTC):%Y-%m-%d %H:%M:%S}"


def _upload_payload(request: web.Request, fmt: str, job: Job) -> dict[str, object]:
    return {
        "message": "Success",
        "success": True,
        **_job_fields(job, NEW, aborted=None, invalid_records=0),
        "status_url": status_url(request, fmt, job),
        "downloads": dict.fromkeys(RESULT_SETS),
        "request_id": answers.request_id(),
        "api_version": answers.API_VERSION,
    }


def _job_fields(
    job: Job, stage: str, *, aborted: bool | None, invalid_records: int
) -> dict[str, object]:
    return {
        "id": job.id,
        "file_name": job.file_name,
        "type": job.type,
        "strictness": 0,
        "status": stage,
        "aborted": aborted,
        "invalid_records": invalid_records,
    }


async def status(request: web.Request) -> web.StreamResponse:
    """``/api/{fmt}/csv/{key}/status/{id}``, ``.../csv/status/{id}`` and ``.../csv/status``."""
    state, fmt = request.config_dict[SANDBOX], request.match_info["fmt"]
    params = await read_params(request)
    key = api_key(request, params)
    if not state.key_accepted(key):
        return answers.failure(fmt, answers.INVALID_KEY)
    job = state.find_job(key, whole_number(request.match_info.get("id") or params.get("id")))
    if job is None:
        return answers.failure(fmt, answers.INVALID_ID)
    stage = state.stage(job)
    downloads: dict[str, str | None] = dict.fromkeys(RESULT_SETS)
    invalid_records = 0
    if stage == FINISHED:
        summary = await state.results(job)
        invalid_records = summary.invalid_records
        base = public_base(request)
        published = state.faults.null_link_answers == 0  # else finished, but no links yet
        if not published:
            state.faults.null_link_answers -= 1
            state.fired("null_links")
        for name, count in summary.counts.items():
            # IPQS mints fresh one-time links on every status call of a finished job.
            downloads[name] = state.mint_link(base, job, name) if count and published else None
    payload = {
        "message": "Success",
        "success": True,
        **_job_fields(job, stage, aborted=False, invalid_records=invalid_records),
        "downloads": downloads,
        "request_id": answers.request_id(),
        "api_version": answers.API_VERSION,
    }
    return answers.answer(fmt, payload)


async def list_jobs(request: web.Request) -> web.StreamResponse:
    """``/api/{fmt}/csv/{key}/list`` and ``/api/{fmt}/csv/list``."""
    state, fmt = request.config_dict[SANDBOX], request.match_info["fmt"]
    params = await read_params(request)
    if not state.key_accepted(key := api_key(request, params)):
        return answers.failure(fmt, answers.INVALID_KEY)
    file_type = params.get("type") or None
    if file_type is not None and file_type not in FILE_TYPES:
        return answers.failure(fmt, answers.INVALID_TYPE)
    page = whole_number(params.get("page") or "1")
    if page is None or page < 1:
        return answers.failure(fmt, answers.INVALID_PAGE)
    jobs = state.jobs_of(key, file_type)
    shown = jobs[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    payload = {
        "message": "Success",
        "success": True,
        "csvs": [await _list_item(request, state, fmt, job) for job in shown],
        "total_csvs": len(jobs),
        "total_pages": math.ceil(len(jobs) / PAGE_SIZE),
        "page": page,
        "request_id": answers.request_id(),
        "api_version": answers.API_VERSION,
    }
    return answers.answer(fmt, payload)


async def _list_item(
    request: web.Request, state: SandboxState, fmt: str, job: Job
) -> dict[str, object]:
    stage = state.stage(job)
    # A finished job's invalid_records must agree with its status answer.
    invalid_records = (await state.results(job)).invalid_records if stage == FINISHED else 0
    fields = _job_fields(job, stage, aborted=False, invalid_records=invalid_records)
    return {**fields, "status_url": status_url(request, fmt, job)}


DOWNLOAD_CHUNK = 256 * 1024


async def download(request: web.Request) -> web.StreamResponse:
    """``/download?download=TOKEN&filename=NAME``: one result file, once."""
    state = request.config_dict[SANDBOX]
    token = request.query.get("download", "")
    if state.link_dead(token):
        state.fired("dead_link")
        return web.Response(status=404, text="404: Not Found")
    link = state.redeem(token)
    if link is None:
        return answers.failure("json", answers.LINK_DEAD)
    headers = {
        hdrs.CONTENT_TYPE: "text/csv; charset=UTF-8",
        # RFC 6266 form: the name is the client's own file_name and may hold anything.
        hdrs.CONTENT_DISPOSITION: f"attachment; filename*=UTF-8''{quote(link.file_name)}",
        "X-Powered-By": answers.POWERED_BY,
    }
    odd_answer = await odd.odd_download(request, state, headers, link.path)
    if odd_answer is not None:
        return odd_answer
    if state.faults.short_results > 0 and link.path.stem == "all":
        state.faults.short_results -= 1
        state.fired("short_results")
        data = await asyncio.to_thread(link.path.read_bytes)
        return web.Response(body=_without_last_row(data), headers=headers)
    # Streamed by hand rather than with FileResponse, so the file is closed even when the
    # client goes away mid-transfer (a daemon killed during a download).
    response = web.StreamResponse(headers=headers)
    response.content_length = link.path.stat().st_size
    # Opened and closed on the loop (both quick): a cancelled thread could leak the handle.
    handle = link.path.open("rb")
    try:
        await response.prepare(request)
        while chunk := await asyncio.to_thread(handle.read, DOWNLOAD_CHUNK):
            await response.write(chunk)
        await response.write_eof()
    finally:
        handle.close()
    return response


def _without_last_row(data: bytes) -> bytes:
    """The file cut at the end of its last-but-one line: whole lines, nothing to see."""
    cut = data.rstrip(b"\r\n").rfind(b"\n")
    return data[:cut + 1] if cut >= 0 else data
