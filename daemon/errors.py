"""What can go wrong when talking to IPQS, sorted by what the daemon should do about it.

Every aiohttp exception and every IPQS answer is mapped onto one of these classes in
exactly one place, :mod:`daemon.api`. The rest of the daemon decides by class alone:

* :class:`TransientError`: wait and try again; never fail a file for it.
* :class:`LostAnswerError`: a kind of transient error where the request may have reached
  IPQS (the body went out, the answer never came back). An upload that ends like this must
  not be sent again before the list API shows that IPQS never received it.
* :class:`RejectedError`: IPQS refuses this file; retrying the same request will not help.
* :class:`AccountError`: the key is bad or the account has no credits; pause all uploads,
  fail nothing.

No message built here may contain the API key: callers pass IPQS's own message, which the
client scrubs first (:func:`daemon.api.scrub`).
"""

from __future__ import annotations


class IpqsError(Exception):
    """Base class: an IPQS call did not produce a usable answer."""

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
    """The request was sent but no answer arrived: IPQS may or may not have acted on it."""


class RejectedError(IpqsError):
    """IPQS refused this request (bad file, unknown type, unknown id, dead link...)."""


class AccountError(IpqsError):
    """The account cannot be used right now: invalid key or no credits left."""
