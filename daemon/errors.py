"""What can go wrong when talking to IPQS, sorted by what the daemon should do about it.

Every aiohttp exception and every IPQS answer is mapped onto one of these classes in
exactly one place, :mod:`daemon.api`. The rest of the daemon decides by class alone:

* :class:`TransientError`: wait and try again; never fail a file for it.
* :class:`LostAnswerError`: a kind of transient error where the request may have reached
  IPQS (the body went out, the answer never came back). An upload that ends like this must
  not be sent again before the list API shows that IPQS never received it.
* :class:`RejectedError`: IPQS refuses this file; retrying the same request will not help.
* :class:`AccountError`: the key is bad, the account has no credits, or a setting points
  somewhere wrong (a redirect, a refused download host); pause all uploads, fail nothing.

``maybe_sent`` is true on any error after which IPQS may hold a job for the request (always
for :class:`LostAnswerError`; also for an :class:`AccountError` raised for a redirect that
answered an upload whose body had gone out): look the job up before sending it again.

No message built here may contain the API key: callers pass IPQS's own message, which the
client scrubs first (:meth:`daemon.api.IpqsClient.scrub`).
"""

from __future__ import annotations


class IpqsError(Exception):
    """Base class: an IPQS call did not produce a usable answer."""

    #: The request may have reached IPQS and created a job (see the module docstring).
    maybe_sent = False
    #: The HTTP status of the answer that caused it, when that alone decided.
    http_status: int | None = None

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class TransientError(IpqsError):
    """Network trouble, a timeout, a 5xx, or a rate limit: try again later.

    ``retry_after`` is the server's Retry-After in seconds, when it sent one; the retry
    policy never waits less than that. ``cause`` is a short stable label for metrics
    (``connect``, ``timeout``, ``http_5xx``, ``rate_limit``, ``dropped``, ``invalid_answer``).
    """

    def __init__(
        self,
        message: str,
        *,
        cause: str = "network",
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.cause = cause
        self.retry_after = retry_after


class LostAnswerError(TransientError):
    """The request was sent but no readable answer arrived: IPQS may or may not have acted
    on it (no answer, a timeout, an unreadable body, a 5xx from a gateway)."""

    maybe_sent = True


class RejectedError(IpqsError):
    """IPQS refused this request (bad file, unknown type, unknown id, dead link...)."""


class LookupIncompleteError(IpqsError):
    """The list API could not say whether an upload arrived: paging stopped at its bound
    (no known newest id to stop at, or more jobs than the bound since). Not retried at
    once: the job waits, never re-sent meanwhile."""


class AccountError(IpqsError):
    """The account cannot be used right now: invalid key or no credits left."""
