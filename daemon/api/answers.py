"""Reading IPQS answers, and the one table that maps them to :mod:`daemon.errors` classes.

Answers pass through CDNs, gateways and firewalls before they reach us, and IPQS asks
clients to read every field as nullable (ipqs-api.md §6). So reading is lenient where that
is safe (a BOM, junk after the JSON object, ``"true"`` for ``true``, ``finished`` for
``FINISHED``) and cautious where money is at stake: an upload whose body went out and whose
answer cannot be read is a *lost answer* (look the job up before any resend), never a plain
transient error that leads to a resend.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from daemon.errors import AccountError, LostAnswerError, RejectedError, TransientError

#: The result sets IPQS offers for download, in the order its status answer lists them.
RESULT_SETS = ("pristine", "clean", "bad", "all")
FINISHED = "FINISHED"
# Status words other services use for "done"; compared after upper-casing.
_FINISHED_WORDS = frozenset({"FINISHED", "COMPLETED", "COMPLETE"})

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})

# Substrings of IPQS failure messages (lower-case) that mean "the account, not this file".
# Whole phrases only: a bare word like "account" would let a message about one file pause
# every upload.
_ACCOUNT_HINTS = ("invalid or unauthorized key", "invalid key", "invalid api key",
                  "insufficient credits", "out of credits", "no credits",
                  "balance is too low", "insufficient balance", "insufficient funds",
                  "exceeded your request quota", "account is disabled",
                  "account has been suspended")
_RATE_HINTS = ("rate limit", "too many requests", "try again later", "temporarily")
# HTTP statuses, by what they say about the request.
_TRANSIENT_STATUS = {403, 408, 425, 429}  # 403 is IPQS's documented rate-limit answer
_ACCOUNT_STATUS = {401, 402, 404, 407}    # key, credits, endpoint or proxy set wrong: pause
_JSONP = re.compile(r"\s*[A-Za-z_$][\w$.]*\s*\(")
EXCERPT = 200


def as_bool(value: Any) -> bool | None:
    """``true``/``1``/``"true"``/``"1"`` as True, their opposites as False, else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else None
    return None


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _links(value: Any) -> tuple[dict[str, str | None], frozenset[str]]:
    """The usable links and the sets IPQS gave an explicit answer for (a link or null)."""
    if not isinstance(value, dict):
        return {}, frozenset()  # missing, [] or garbage: IPQS has not told us yet
    links = {k: v for k, v in value.items()
             if (isinstance(v, str) and v.strip()) or v is None}
    return links, frozenset(links)


def _status(raw: str | None, links: Mapping[str, str | None]) -> str | None:
    if raw is None:
        word = None
    else:
        word = raw.strip().upper()
        word = FINISHED if word in _FINISHED_WORDS else word
    if word != FINISHED and any(links.values()):
        return FINISHED  # links exist only for a finished job, whatever the word says
    return word


@dataclass(frozen=True)
class CsvJob:
    """One bulk CSV job as IPQS describes it. Any field may be None.

    ``status`` is upper-cased, with ``COMPLETED`` and the like read as ``FINISHED``, and
    ``FINISHED`` whenever the answer carries a download link; ``raw_status`` is the word
    as IPQS sent it. ``downloads`` holds links (str) and explicit nulls (an empty set);
    ``downloads_known`` names the sets the answer spoke about at all.
    """

    id: int | None
    file_name: str | None = None
    type: str | None = None
    status: str | None = None
    aborted: bool | None = None
    invalid_records: int | None = None
    downloads: dict[str, str | None] = field(default_factory=dict, repr=False)
    request_id: str | None = None
    raw_status: str | None = None
    downloads_known: frozenset[str] = frozenset()

    @classmethod
    def from_answer(cls, data: dict[str, Any]) -> CsvJob:
        links, known = _links(data.get("downloads"))
        raw = as_str(data.get("status"))
        return cls(
            id=as_int(data.get("id")),
            file_name=as_str(data.get("file_name")),
            type=as_str(data.get("type")),
            status=_status(raw, links),
            aborted=as_bool(data.get("aborted")),
            invalid_records=as_int(data.get("invalid_records")),
            downloads=links,
            request_id=as_str(data.get("request_id")),
            raw_status=raw,
            downloads_known=known,
        )

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def links_complete_for(self, sets: tuple[str, ...] | frozenset[str]) -> bool:
        """Whether the answer says, for every one of ``sets``, either a link or null.

        False for a missing or malformed ``downloads`` (``[]``, ``{}``, a set left out):
        an incomplete answer, to be polled again, never taken for empty results.
        """
        return all(name in self.downloads_known for name in sets)

    @property
    def links_complete(self) -> bool:
        """:meth:`links_complete_for` every result set IPQS documents."""
        return self.links_complete_for(RESULT_SETS)


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
        by_product = {name.removesuffix("_usage"): as_int(value)
                      for name, value in data.items() if name.endswith("_usage")}
        return cls(credits=as_int(data.get("credits")), usage=as_int(data.get("usage")),
                   usage_by_product=by_product, request_id=as_str(data.get("request_id")))


# -- reading a body -------------------------------------------------------------------


def read_json(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text``: after a BOM or a JSONP ``callback(``, and
    ignoring whatever follows it. None when there is none."""
    text = text.lstrip("\ufeff \t\r\n")
    start = 0
    if not text.startswith("{") and (match := _JSONP.match(text)):
        start = match.end()
    try:
        data, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# -- the classification table ---------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What came back for one API call, before it is judged."""

    op: str
    status: int
    text: str
    headers: Mapping[str, str]
    url: str
    sent: bool  # an upload whose body went out: IPQS may have created the job


def judge(answer: Answer, scrub: Any) -> dict[str, Any]:
    """The JSON data of a successful answer, or the error that fits it.

    ``scrub`` masks secrets in text taken from the answer.
    """
    status = answer.status
    excerpt = scrub(answer.text)[:EXCERPT]
    if 300 <= status < 400:
        raise _redirect(answer)
    if status in _TRANSIENT_STATUS or status >= 500:
        # A gateway may answer 5xx for a job the origin created: a sent upload is lost.
        lost = answer.sent and status >= 500
        cls = LostAnswerError if lost else TransientError
        raise cls(f"HTTP {status} from IPQS: {excerpt}", cause=_cause(status),
                  retry_after=retry_after(answer.headers.get("Retry-After")))
    if status in _ACCOUNT_STATUS:
        raise _account_status(status)
    if status != 200:
        raise RejectedError(f"HTTP {status} from IPQS: {excerpt}")
    data = read_json(answer.text)
    if data is None:
        cls = LostAnswerError if answer.sent else TransientError
        raise cls(f"{answer.op}: IPQS answered with something that is not a JSON object: "
                  f"{excerpt!r}", cause="invalid_answer")
    return _verdict(data, answer, excerpt, scrub)


def _verdict(data: dict[str, Any], answer: Answer, excerpt: str, scrub: Any) -> dict[str, Any]:
    success = as_bool(data.get("success"))
    if success is True or as_int(data.get("id")) is not None:
        return data  # an answer that names a job is never a refusal: the job exists
    message = data.get("message")
    text = scrub(message) if isinstance(message, str) and message.strip() else ""
    request_id = as_str(data.get("request_id"))
    lowered = text.lower()
    if any(h in lowered for h in _ACCOUNT_HINTS):
        raise AccountError(text, request_id=request_id)
    rate_limited = any(h in lowered for h in _RATE_HINTS)
    if success is None or rate_limited:
        # A "soft failure" without the usual fields: IPQS says to treat it as temporary.
        # After a sent upload, only "slow down" says that no job was made.
        cls = LostAnswerError if answer.sent and not rate_limited else TransientError
        raise cls(text or f"{answer.op}: answer without a verdict: {excerpt}",
                  cause="soft_failure", request_id=request_id)
    raise RejectedError(text or f"{answer.op} failed; IPQS gave no message: {excerpt}",
                        request_id=request_id)


def _account_status(status: int) -> AccountError:
    error = AccountError(f"HTTP {status} from IPQS: check api.key, api.base_url, the "
                         "account's credits and proxy settings")
    error.http_status = status
    return error


def is_not_found(exc: BaseException) -> bool:
    """Whether ``exc`` is an HTTP 404 (an endpoint form the server does not know)."""
    return isinstance(exc, AccountError) and exc.http_status == 404


def _redirect(answer: Answer) -> AccountError:
    """A 3xx from the API is a settings problem; named by host, never by URL (the URL may
    carry the key)."""
    host = target_host(answer.url, answer.headers.get("Location"))
    error = AccountError(f"{answer.op}: IPQS answered HTTP {answer.status}, a redirect to "
                         f"host {host}; not followed: check api.base_url")
    error.maybe_sent = answer.sent
    return error


def target_host(base: str, location: str | None) -> str:
    """The host a Location header points at (relative ones resolved against ``base``)."""
    if not location:
        return "(none given)"
    try:
        return urlsplit(urljoin(base, location)).hostname or "(none)"
    except ValueError:
        return "(unreadable)"


def _cause(status: int) -> str:
    """The metrics label for a transient HTTP status."""
    return "rate_limit" if status in (403, 429) else f"http_{status // 100}xx"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header, in either of its forms (seconds or HTTP date)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; anything else is not one
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def same_name(listed: str | None, ours: str) -> bool:
    """Is this listed job ours? IPQS may keep the name as given or as the uploaded part's
    file name (``<name>.csv``); case is not trusted either."""
    if listed is None:
        return False
    listed, ours = listed.casefold(), ours.casefold()
    return listed in (ours, ours + ".csv")
