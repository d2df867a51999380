"""The IPQS Bulk CSV API client.

One :class:`IpqsClient` holds one ``aiohttp.ClientSession`` for the whole process. Every
call returns parsed data or raises one of :mod:`daemon.errors`; what an answer means is
decided in :mod:`daemon.api.answers`, what a download is worth in :mod:`daemon.api.download`.

No call follows a redirect (a 3xx is a settings problem, and following one could send the
key elsewhere), and every call has an overall time limit besides the per-read one. Answers
that carry the key (``status_url``) are never kept; download links are handed to the caller
only to be fetched at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import aiohttp
import structlog

from daemon import __version__
from daemon.api.answers import (
    Account,
    Answer,
    CsvJob,
    CsvPage,
    as_int,
    is_not_found,
    judge,
    same_name,
)
from daemon.api.body import BeforeLast, FencedBytes, UploadFile
from daemon.api.download import DownloadPolicy, ResultFile, fetch
from daemon.errors import (
    AccountError,
    IpqsError,
    LookupIncompleteError,
    LostAnswerError,
    TransientError,
)
from daemon.inputs import Inspection
from daemon.logs import scrub

if TYPE_CHECKING:  # config imports RESULT_SETS from this package
    from daemon.config import Config

log = structlog.get_logger(__name__)

LIST_PAGE_SIZE = 50


def make_client(config: Config) -> IpqsClient:
    """The client the daemon and the commands use, built from the ``[api]`` config."""
    api = config.api
    return IpqsClient(api.base_url, api.key, key_in=api.key_in,
                      connect_timeout=api.connect_timeout, read_timeout=api.read_timeout,
                      total_timeout=api.total_timeout_seconds, ca_bundle=api.ca_bundle,
                      download_hosts=api.download_hosts,
                      max_download_bytes=api.max_download_bytes)


class IpqsClient:
    """Async client for the IPQS Bulk CSV API (JSON format).

    ``key_in="path"`` puts the key in the URL as IPQS documents it; ``key_in="header"`` sends
    it as the ``IPQS-KEY`` header and uses the key-less URLs, so proxies never log it.
    ``total_timeout`` bounds each call as a whole (for an upload, from the moment its body
    has gone out), so an answer trickling in byte by byte cannot hold a call forever.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        key_in: str = "path",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        total_timeout: float = 120.0,
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
        self._total = total_timeout
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        )
        base = urlsplit(self._base)
        self._downloads = DownloadPolicy(
            hosts=frozenset({base.hostname or "", *download_hosts}),
            schemes=frozenset({"https", base.scheme}),
            max_bytes=max_download_bytes, total_timeout=total_timeout)
        self._session = session
        self._own_session = session is None
        self._proxies: dict[tuple[str, str], str | None] = {}
        # The key-less status URL is a guess (ipqs-api.md §10.5); once refused, use the path.
        self._status_in_path = key_in == "path"

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

    def _url(self, *parts: str, key_in_path: bool | None = None) -> str:
        in_path = self._key_in == "path" if key_in_path is None else key_in_path
        key = [quote(self._key, safe="")] if in_path else []
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
        before_last: BeforeLast | None = None,
        inspection: Inspection | None = None,
        expect: tuple[int | None, int | None] | None = None,
    ) -> CsvJob:
        """Upload ``path`` as multipart/form-data, streamed, with Content-Length.

        A write to the file while it is sent aborts the upload (the body is then
        incomplete, so IPQS creates nothing): the caller re-checks the file. So does an
        exception from ``before_last``, which is raised here again, unwrapped. Every byte
        sent is fed to ``inspection`` (if given), before ``before_last`` is awaited. With
        ``expect`` (size, mtime_ns), a file that is no longer so is not sent at all
        (:class:`InputChangedError`).
        """
        params = {"file_name": file_name}
        url = self._upload_target(file_type, params)
        body = UploadFile(path, progress, before_last, inspection=inspection, expect=expect)
        try:
            form = aiohttp.FormData()
            form.add_field("file", body, filename=file_name + ".csv")
            data = await self._stoppable(body, "upload", "POST", url, params=params,
                                         data=form, body=body)
            return self._job(data, "upload")
        finally:
            body.release()

    async def upload_rows(self, file_type: str, rows: list[list[str]], file_name: str, *,
                          before_last: BeforeLast | None = None) -> CsvJob:
        """Upload rows as the JSON ``input`` array, sent in chunks (see ``upload_file``
        for ``before_last``)."""
        params = {"file_name": file_name}
        url = self._upload_target(file_type, params)
        body = FencedBytes(json.dumps({"input": rows}).encode(), "application/json",
                           before_last)
        data = await self._stoppable(body, "upload", "POST", url, params=params, data=body,
                                     sent=lambda: body.finished)
        return self._job(data, "upload")

    async def _stoppable(self, fenced: UploadFile | FencedBytes, op: str, method: str,
                         url: str, **kwargs: Any) -> dict[str, Any]:
        """``_request``, raising the reason of a body stopped before its end instead of
        the broken connection that followed."""
        try:
            return await self._request(op, method, url, **kwargs)
        except IpqsError:
            if fenced.stopped is not None:
                raise fenced.stopped.reason from None
            raise

    async def upload_url(self, file_type: str, source_url: str, file_name: str) -> CsvJob:
        """Ask IPQS to fetch the file from ``source_url``."""
        params = {"file_name": file_name, "url": source_url}
        url = self._upload_target(file_type, params)
        data = await self._request("upload", "POST", url, params=params,
                                   sent=lambda: True)
        return self._job(data, "upload")

    async def status(self, csv_id: int) -> CsvJob:
        """The job's current state; once FINISHED, with fresh one-time download links.

        Check :attr:`CsvJob.links_complete_for` before taking a FINISHED answer's missing
        links for empty sets: an incomplete ``downloads`` means "ask again".
        """
        job_id = str(int(csv_id))
        if not self._status_in_path:
            try:
                return self._job(await self._request("status", "GET",
                                                      self._url("status", job_id)))
            except AccountError as exc:
                if not is_not_found(exc):
                    raise
            # The documented form carries the key in the path; say once that we use it.
            self._status_in_path = True
            log.warning("status_url_fallback", reason="key-less status URL answered 404",
                        using="the documented path form (key in the URL)")
        url = self._url("status", job_id, key_in_path=True)
        return self._job(await self._request("status", "GET", url))

    async def list(self, file_type: str | None = None, page: int = 1) -> CsvPage:
        """One page (50 jobs, newest first) of the account's CSV jobs."""
        params = {"page": str(page)}
        if file_type:
            params["type"] = file_type
        data = await self._request("list", "GET", self._url("list"), params=params)
        items = data.get("csvs") if isinstance(data.get("csvs"), list) else []
        return CsvPage(
            csvs=[CsvJob.from_answer(i) for i in items or [] if isinstance(i, dict)],
            page=as_int(data.get("page")) or page,
            total_pages=as_int(data.get("total_pages")) or 0,
            total_csvs=as_int(data.get("total_csvs")) or 0,
        )

    async def find(self, file_name: str, file_type: str | None, *,
                   floor_id: int | None = None, max_pages: int = 200) -> CsvJob | None:
        """Look a job up by its unique ``file_name``, newest first.

        Stops at the end of the list, or once the page reaches ids at or below
        ``floor_id`` (jobs that existed before ours was sent; ids only grow). Without
        ``total_pages``, a short page short of the floor leaves the lookup incomplete.
        """
        for page_no in range(1, max_pages + 1):
            page = await self.list(file_type, page_no)
            for job in page.csvs:
                if job.id is not None and same_name(job.file_name, file_name):
                    return job
            older = [j.id for j in page.csvs if j.id is not None]
            if floor_id is not None and older and min(older) <= floor_id:
                return None
            if not page.csvs or 0 < page.total_pages <= page_no:
                return None
            if not page.total_pages and len(page.csvs) < LIST_PAGE_SIZE:
                # No page count, and a short page that does not reach the floor: maybe
                # the end, maybe a smaller page size. Never "absent" on a guess.
                raise LookupIncompleteError(f"the {file_type or 'job'} list answered without "
                                            "total_pages and ended short of the newest id "
                                            "before the upload")
        raise LookupIncompleteError(
            f"the {file_type or 'job'} list is longer than {max_pages} pages "
            f"({max_pages * LIST_PAGE_SIZE} jobs)"
            + (" and the newest id before the upload is unknown" if floor_id is None
               else f" above id {floor_id}"))

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
        """:meth:`fetch`, returning only the number of bytes saved."""
        return (await self.fetch(url, dest, mode=mode)).bytes

    async def fetch(self, url: str, dest: Path, *, mode: int = 0o640) -> ResultFile:
        """Fetch a one-time result link into ``dest`` and say what was saved.

        Nothing is kept unless it is surely the whole file (see :mod:`daemon.api.download`);
        an HTML page or a cut-off body raises :class:`TransientError`, a refused link
        (expired, used) :class:`RejectedError`: either way, ask the status for a fresh link.
        A link or redirect to a host outside ``api.download_hosts`` raises AccountError.
        """
        return await fetch(self.session, self._downloads, url, dest, mode=mode,
                           ssl_context=self._ssl, proxy_for=self._proxy_for, scrub=self.scrub)

    # -- plumbing -------------------------------------------------------------------------

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
                       sent: Callable[[], bool] | None = None, body: UploadFile | None = None,
                       **kwargs: Any) -> dict[str, Any]:
        """Send one request and return the JSON of a successful answer.

        ``sent`` (or ``body``, for a streamed file) is given for uploads: it tells, after a
        failure, whether the whole body had gone out, i.e. whether IPQS may have created
        the job anyway. The overall time limit starts once the body is out.
        """
        went_out = (lambda: body.finished) if body is not None else sent
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as limit:
                if body is None:
                    limit.reschedule(loop.time() + self._total)
                else:
                    body.on_finished = _start_limit(loop, limit, self._total)
                async with self.session.request(method, url, headers=self._headers(),
                                                proxy=self._proxy_for(url), ssl=self._ssl,
                                                allow_redirects=False, **kwargs) as resp:
                    text = await resp.text(errors="replace")
                    answer = Answer(op, resp.status, text, resp.headers, url,
                                    sent=bool(went_out and went_out()))
        except aiohttp.ClientError as exc:
            raise self._network_error(exc, op, sent=bool(went_out and went_out())) from None
        except TimeoutError:
            cls = LostAnswerError if went_out and went_out() else TransientError
            raise cls(f"{op}: no complete answer within api.total_timeout_seconds "
                      f"({self._total:g} s)", cause="timeout") from None
        return judge(answer, self.scrub)

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


def _start_limit(loop: asyncio.AbstractEventLoop, limit: asyncio.Timeout,
                 seconds: float) -> Callable[[], None]:
    """A callback, safe from aiohttp's reader thread, that starts ``limit`` counting."""
    def arm() -> None:
        # The request may have ended first: then the limit is no longer in force.
        with contextlib.suppress(RuntimeError):
            if limit.when() is None and not limit.expired():
                limit.reschedule(loop.time() + seconds)

    def from_thread() -> None:
        loop.call_soon_threadsafe(arm)

    return from_thread
