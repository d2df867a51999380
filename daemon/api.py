"""The IPQS Bulk CSV API client.

One :class:`IpqsClient` holds one ``aiohttp.ClientSession`` for the whole process. Every
call returns parsed data or raises one of :mod:`daemon.errors`; this module is the only
place where aiohttp exceptions and IPQS answers are turned into those classes.

Parsing is tolerant, as IPQS asks of clients: unknown fields are ignored, any field may be
null or missing, and an unknown status value is passed on unchanged. Answers that carry the
key (``status_url``) are never kept; download links are handed to the caller only to be
fetched at once.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import ssl
import stat
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlsplit

import aiohttp

from daemon import __version__
from daemon.errors import (
    AccountError,
    IpqsError,
    LostAnswerError,
    RejectedError,
    TransientError,
)
from daemon.logs import scrub

if TYPE_CHECKING:  # config imports RESULT_SETS from here
    from daemon.config import Config

#: The result sets IPQS offers for download, in the order its status answer lists them.
RESULT_SETS = ("pristine", "clean", "bad", "all")
LIST_PAGE_SIZE = 50
_CHUNK = 1024 * 1024

# Substrings of IPQS failure messages (lower-case) that mean "the account, not this file".
# Whole phrases only: a bare word like "account" would let a message about one file pause
# every upload.
_ACCOUNT_HINTS = ("invalid or unauthorized key", "invalid key", "invalid api key",
                  "insufficient credits", "out of credits", "no credits",
                  "exceeded your request quota", "account is disabled",
                  "account has been suspended")
_RATE_HINTS = ("rate limit", "too many requests", "try again later", "temporarily")
# HTTP statuses, by what they say about the request.
_TRANSIENT_STATUS = {403, 408, 425, 429}  # 403 is IPQS's documented rate-limit answer
_ACCOUNT_STATUS = {401, 404, 407}         # key, endpoint or proxy set wrong: pause


@dataclass(frozen=True)
class CsvJob:
    """One bulk CSV job as IPQS describes it. Any field may be None."""

    id: int | None
    file_name: str | None = None
    type: str | None = None
    status: str | None = None
    aborted: bool | None = None
    invalid_records: int | None = None
    downloads: dict[str, str | None] = field(default_factory=dict, repr=False)
    request_id: str | None = None

    @classmethod
    def from_answer(cls, data: dict[str, Any]) -> CsvJob:
        downloads = data.get("downloads")
        return cls(
            id=_as_int(data.get("id")),
            file_name=_as_str(data.get("file_name")),
            type=_as_str(data.get("type")),
            status=_as_str(data.get("status")),
            aborted=data.get("aborted") if isinstance(data.get("aborted"), bool) else None,
            invalid_records=_as_int(data.get("invalid_records")),
            downloads={k: v for k, v in downloads.items() if isinstance(v, str) or v is None}
            if isinstance(downloads, dict) else {},
            request_id=_as_str(data.get("request_id")),
        )


@dataclass(frozen=True)
class CsvPage:
    """One page of the list API."""

    csvs: list[CsvJob]
    page: int
    total_pages: int
    total_csvs: int


@dataclass(frozen=True)
class Account:
    """The Credit Usage API's answer. Any field may be None.

    ``credits`` is taken to be the remaining balance: IPQS does not say so. ``usage`` is
    the total; ``usage_by_product`` holds each ``<product>_usage`` counter by product.
    """

    credits: int | None
    usage: int | None = None
    usage_by_product: dict[str, int | None] = field(default_factory=dict)
    request_id: str | None = None

    @classmethod
    def from_answer(cls, data: dict[str, Any]) -> Account:
        by_product = {name.removesuffix("_usage"): _as_int(value)
                      for name, value in data.items() if name.endswith("_usage")}
        return cls(credits=_as_int(data.get("credits")), usage=_as_int(data.get("usage")),
                   usage_by_product=by_product, request_id=_as_str(data.get("request_id")))


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class InputChangedError(OSError):
    """The file being uploaded changed under the upload."""


def _open_no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


class _UploadFile(io.FileIO):
    """A file opened for upload that counts and reports what aiohttp reads, and stops if
    the file changes under it.

    aiohttp reads it in a worker thread and takes Content-Length from ``fstat``; when
    ``finished`` is true the whole body has gone to the socket, which is what separates
    "nothing was sent" from "sent, answer lost".
    """

    def __init__(self, path: Path, progress: Callable[[int], None] | None) -> None:
        super().__init__(path, "rb", opener=_open_no_follow)
        if not stat.S_ISREG(os.fstat(self.fileno()).st_mode):
            self.close()
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        self.sent = 0
        st = os.fstat(self.fileno())
        self.size, self._mtime_ns = st.st_size, st.st_mtime_ns
        self._progress = progress

    def read(self, size: int | None = -1, /) -> bytes:
        st = os.fstat(self.fileno())
        if (st.st_size, st.st_mtime_ns) != (self.size, self._mtime_ns):
            # Someone writes to it: stop before IPQS gets a mix of old and new bytes.
            raise InputChangedError(errno.ESTALE, "the file changed while it was being sent")
        # Never more than asked: aiohttp cuts a chunk to the length it still expects.
        chunk = super().read(_CHUNK if size is None or size < 0 else size)
        if chunk:
            self.sent += len(chunk)
            if self._progress is not None:
                self._progress(len(chunk))
        return chunk or b""

    @property
    def finished(self) -> bool:
        return self.sent >= self.size


def make_client(config: Config) -> IpqsClient:
    """The client the daemon and the commands use, built from the ``[api]`` config."""
    api = config.api
    return IpqsClient(api.base_url, api.key, key_in=api.key_in,
                      connect_timeout=api.connect_timeout, read_timeout=api.read_timeout,
                      ca_bundle=api.ca_bundle, download_hosts=api.download_hosts,
                      max_download_bytes=api.max_download_bytes)


class IpqsClient:
    """Async client for the IPQS Bulk CSV API (JSON format).

    ``key_in="path"`` puts the key in the URL as IPQS documents it; ``key_in="header"`` sends
    it as the ``IPQS-KEY`` header and uses the key-less URLs, so proxies never log it.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        key_in: str = "path",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        ca_bundle: str = "",
        download_hosts: Sequence[str] = ("downloads.ipqualityscore.com",),
        max_download_bytes: int = 10 * 1024**3,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._key = key
        self._key_in = key_in
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                              sock_read=read_timeout)
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        )
        base = urlsplit(self._base)
        self._download_hosts = {base.hostname or "", *download_hosts}
        self._download_schemes = {"https", base.scheme}
        self._max_download = max_download_bytes
        self._session = session
        self._own_session = session is None
        self._proxies: dict[tuple[str, str], str | None] = {}

    async def __aenter__(self) -> IpqsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                # No trust_env: it makes aiohttp re-read the environment and ~/.netrc, in
                # two executor jobs, for every request. _proxy_for() reads them once per host.
                trust_env=False,
                headers={"User-Agent": f"ipqs-bulkd/{__version__}"},
            )
        return self._session

    async def close(self) -> None:
        """Close the session if this client created it. Idempotent."""
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # -- URLs ---------------------------------------------------------------------------

    def _proxy_for(self, url: str) -> str | None:
        """HTTPS_PROXY / HTTP_PROXY for ``url`` unless NO_PROXY exempts its host (looked up
        once per scheme and host)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        if key not in self._proxies:
            bypass = bool(parts.hostname) and urllib.request.proxy_bypass(parts.hostname or "")
            self._proxies[key] = None if bypass else urllib.request.getproxies().get(parts.scheme)
        return self._proxies[key]

    def _url(self, *parts: str) -> str:
        key = [quote(self._key, safe="")] if self._key_in == "path" else []
        return "/".join([self._base, "json", "csv", *key, *parts])

    def _headers(self) -> dict[str, str]:
        return {"IPQS-KEY": self._key} if self._key_in == "header" else {}

    def _upload_target(self, file_type: str, params: dict[str, str]) -> str:
        if self._key_in == "path":
            return self._url(file_type, "upload")
        params["type"] = file_type
        return self._url("upload")

    # -- operations -----------------------------------------------------------------------

    async def upload_file(
        self,
        file_type: str,
        path: Path,
        file_name: str,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> CsvJob:
        """Upload ``path`` as multipart/form-data, streamed, with Content-Length.

        A write to the file while it is sent aborts the upload (the body is then
        incomplete, so IPQS creates nothing): the caller re-checks the file.
        """
        params = {"file_name": file_name}
        url = self._upload_target(file_type, params)
        # Opened on the loop (a quick syscall): a cancelled thread could leak the handle.
        body = _UploadFile(path, progress)
        try:
            form = aiohttp.FormData()
            form.add_field("file", body, filename=file_name + ".csv",
                           content_type="text/csv")
            data = await self._request("upload", "POST", url, params=params, data=form,
                                       sent=lambda: body.finished)
            return self._job(data, "upload")
        finally:
            body.close()

    async def upload_rows(self, file_type: str, rows: list[list[str]],
                          file_name: str) -> CsvJob:
        """Upload rows as the JSON ``input`` array."""
        params = {"file_name": file_name}
        url = self._upload_target(file_type, params)
        data = await self._request("upload", "POST", url, params=params, json={"input": rows},
                                   sent=lambda: True)
        return self._job(data, "upload")

    async def upload_url(self, file_type: str, source_url: str, file_name: str) -> CsvJob:
        """Ask IPQS to fetch the file from ``source_url``."""
        params = {"file_name": file_name, "url": source_url}
        url = self._upload_target(file_type, params)
        data = await self._request("upload", "POST", url, params=params,
                                   sent=lambda: True)
        return self._job(data, "upload")

    async def status(self, csv_id: int) -> CsvJob:
        """The job's current state; once FINISHED, with fresh one-time download links."""
        data = await self._request("status", "GET", self._url("status", str(int(csv_id))))
        return self._job(data)

    async def list(self, file_type: str | None = None, page: int = 1) -> CsvPage:
        """One page (50 jobs, newest first) of the account's CSV jobs."""
        params = {"page": str(page)}
        if file_type:
            params["type"] = file_type
        data = await self._request("list", "GET", self._url("list"), params=params)
        items = data.get("csvs") if isinstance(data.get("csvs"), list) else []
        return CsvPage(
            csvs=[CsvJob.from_answer(i) for i in items or [] if isinstance(i, dict)],
            page=_as_int(data.get("page")) or page,
            total_pages=_as_int(data.get("total_pages")) or 0,
            total_csvs=_as_int(data.get("total_csvs")) or 0,
        )

    async def find(self, file_name: str, file_type: str | None, *,
                   floor_id: int | None = None, max_pages: int = 200) -> CsvJob | None:
        """Look a job up by its unique ``file_name``, newest first.

        Stops at the end of the list, or once the page reaches ids at or below
        ``floor_id`` (jobs that existed before ours was sent; ids only grow).
        """
        for page_no in range(1, max_pages + 1):
            page = await self.list(file_type, page_no)
            for job in page.csvs:
                if job.id is not None and _same_name(job.file_name, file_name):
                    return job
            older = [j.id for j in page.csvs if j.id is not None]
            if floor_id is not None and older and min(older) <= floor_id:
                return None
            if not page.csvs or page_no >= page.total_pages:
                return None
        raise TransientError(f"job list longer than {max_pages} pages; lookup incomplete",
                             cause="lookup")

    async def newest_id(self) -> int | None:
        """The id of the account's newest job, or None when it has none."""
        page = await self.list(None, 1)
        ids = [j.id for j in page.csvs if j.id is not None]
        return max(ids) if ids else None

    async def account(self) -> Account:
        """The account's credits and usage, from ``/api/json/account``."""
        key = [quote(self._key, safe="")] if self._key_in == "path" else []
        url = "/".join([self._base, "json", "account", *key])
        return Account.from_answer(await self._request("account", "GET", url))

    async def download(self, url: str, dest: Path, *, mode: int = 0o640) -> int:
        """Fetch a one-time result link into ``dest``: temporary file, length check, rename.

        A refused link (expired, used) raises :class:`RejectedError`; the caller asks for
        the status again to get a fresh one.
        """
        self._check_download_url(url)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            async with self.session.get(url, ssl=self._ssl, proxy=self._proxy_for(url)) as resp:
                await self._check_download_response(resp)
                written = await self._stream_to(resp, tmp, mode)
            await asyncio.to_thread(os.replace, tmp, dest)
            return written
        except aiohttp.ClientError as exc:
            raise self._network_error(exc, "download", sent=True) from None
        except TimeoutError:
            raise TransientError("download timed out", cause="timeout") from None
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)

    # -- plumbing -------------------------------------------------------------------------

    def _check_download_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self._download_schemes or parts.hostname not in self._download_hosts:
            # A setting to fix (api.download_hosts), not a reason to give up paid results.
            raise AccountError(f"download link to {parts.scheme}://{parts.hostname} refused: "
                               "not an allowed download host (api.download_hosts)")

    async def _check_download_response(self, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if status in _TRANSIENT_STATUS or status >= 500:
            raise TransientError(f"download: HTTP {status}", cause=_cause(status),
                                 retry_after=_retry_after(resp.headers.get("Retry-After")))
        if status != 200:
            # 404/410 and the like: the one-time link is dead; a fresh one is a status away.
            raise RejectedError(f"download link refused (HTTP {status})")
        if "json" in resp.content_type:
            try:
                data = json.loads(await resp.text(errors="replace"))
            except ValueError:
                data = {}
            message = data.get("message") if isinstance(data, dict) else None
            raise RejectedError(self.scrub(message if isinstance(message, str) and message
                                           else "download link refused"))
        if resp.content_length is not None and resp.content_length > self._max_download:
            raise RejectedError(f"result file of {resp.content_length} bytes exceeds "
                                "api.max_download_bytes")

    async def _stream_to(self, resp: aiohttp.ClientResponse, tmp: Path, mode: int) -> int:
        written = 0
        fh = _create(tmp, mode)  # on the loop: a cancelled thread could leak the handle
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                written += len(chunk)
                if written > self._max_download:
                    raise RejectedError("result file exceeds api.max_download_bytes")
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(_flush_and_sync, fh)
        finally:
            fh.close()
        if resp.content_length is not None and written != resp.content_length:
            raise TransientError(f"download ended after {written} of {resp.content_length} "
                                 "bytes", cause="dropped")
        return written

    def _job(self, data: dict[str, Any], op: str = "status") -> CsvJob:
        job = CsvJob.from_answer(data)
        if job.id is None:
            # After an upload, "success" means a job exists: without its id we are where a
            # lost answer leaves us, and must look it up rather than send again.
            cls = LostAnswerError if op == "upload" else TransientError
            raise cls(f"IPQS answered {op} success without a job id", cause="invalid_answer",
                      request_id=job.request_id)
        return job

    async def _request(self, op: str, method: str, url: str, *,
                       sent: Callable[[], bool] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Send one request and return the JSON of a successful answer.

        ``sent`` is given for uploads: it tells, after a failure, whether the whole body had
        gone out, i.e. whether IPQS may have created the job anyway.
        """
        try:
            async with self.session.request(method, url, headers=self._headers(),
                                            proxy=self._proxy_for(url),
                                            ssl=self._ssl, **kwargs) as resp:
                data = await self._parse(resp)
        except aiohttp.ClientError as exc:
            raise self._network_error(exc, op, sent=bool(sent and sent())) from None
        except TimeoutError:
            cls = LostAnswerError if sent and sent() else TransientError
            raise cls(f"{op}: no answer within api.read_timeout", cause="timeout") from None
        return self._check(data, op)

    async def _parse(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        """Turn a response into JSON data, raising for HTTP-level trouble.

        Only HTTP 200 carries an IPQS verdict; any other status is classified by the status
        alone, so a proxy's or firewall's error page never fails a file.
        """
        text = await resp.text(errors="replace")
        status = resp.status
        excerpt = self.scrub(text)[:200]
        if status in _TRANSIENT_STATUS or status >= 500:
            raise TransientError(
                f"HTTP {status} from IPQS: {excerpt}",
                cause=_cause(status),
                retry_after=_retry_after(resp.headers.get("Retry-After")),
            )
        if status in _ACCOUNT_STATUS:
            raise AccountError(f"HTTP {status} from IPQS: check api.key, api.base_url and "
                               "proxy settings")
        if status != 200:
            raise RejectedError(f"HTTP {status} from IPQS: {excerpt}")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise TransientError("IPQS answered with something that is not a JSON object",
                                 cause="invalid_answer")
        return data

    def _check(self, data: dict[str, Any], op: str) -> dict[str, Any]:
        if data.get("success") is True:
            return data
        message = self._message(data, f"{op} failed")
        request_id = _as_str(data.get("request_id"))
        lowered = message.lower()
        if any(h in lowered for h in _ACCOUNT_HINTS):
            raise AccountError(message, request_id=request_id)
        if any(h in lowered for h in _RATE_HINTS) or "success" not in data:
            # A "soft failure" without the usual fields: IPQS says to treat it as temporary.
            raise TransientError(message, cause="soft_failure", request_id=request_id)
        raise RejectedError(message, request_id=request_id)

    def _message(self, data: dict[str, Any], default: str) -> str:
        message = data.get("message")
        return self.scrub(message if isinstance(message, str) and message else default)

    def _network_error(self, exc: aiohttp.ClientError, op: str, *, sent: bool) -> IpqsError:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
            # Not going to heal by retrying: a setting is wrong. Pause, say why.
            return AccountError(f"{op}: TLS verification of the IPQS host failed "
                                f"({type(exc).__name__}); check api.ca_bundle and proxies")
        # Connection-phase failures (refused, DNS, connect timeout) never carried a request.
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return TransientError(f"{op}: cannot connect to IPQS ({type(exc).__name__})",
                                  cause="connect")
        if isinstance(exc, aiohttp.ServerTimeoutError):
            cls = LostAnswerError if sent else TransientError
            return cls(f"{op}: no answer within api.read_timeout", cause="timeout")
        cls = LostAnswerError if sent else TransientError
        return cls(f"{op}: connection lost ({type(exc).__name__})", cause="dropped")

    def scrub(self, text: str) -> str:
        """``text`` with this client's key and any secret URL part masked."""
        return scrub(text, [self._key])


def _cause(status: int) -> str:
    """The metrics label for a transient HTTP status."""
    return "rate_limit" if status in (403, 429) else f"http_{status // 100}xx"


def _same_name(listed: str | None, ours: str) -> bool:
    """Is this listed job ours? IPQS may keep the name as given or as the uploaded part's
    file name (``<name>.csv``); case is not trusted either."""
    if listed is None:
        return False
    listed, ours = listed.casefold(), ours.casefold()
    return listed in (ours, ours + ".csv")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; dates are ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _create(path: Path, mode: int) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    os.fchmod(fd, mode)  # O_CREAT's mode is cut by the umask; the setting is meant exactly
    return os.fdopen(fd, "wb")


def _flush_and_sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
