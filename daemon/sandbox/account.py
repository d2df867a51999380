"""``/api/{fmt}/account/{key}`` and ``/api/{fmt}/account``: IPQS's Credit Usage API.

Fidelity assumptions (the OpenAPI gives one example answer and no prose):

* ``credits`` is the remaining balance (IPQS does not say; the daemon assumes the same).
  With unlimited credits (the default) it is :data:`UNLIMITED_CREDITS`.
* Each accepted upload debits its rows (every non-blank line, a header included) and
  adds them to ``usage`` and to the type's ``*_usage`` counter; types without a counter
  of their own (``leaked_*``) count in ``usage`` only. The counters start at 0.
* The key comes in the path, the ``key`` parameter or the ``IPQS-KEY`` header, as for
  the CSV endpoints. ``faults.account_missing`` answers 404, as an API that is not there.
"""

from __future__ import annotations

from aiohttp import web

from daemon.sandbox import answers
from daemon.sandbox.receive import api_key, read_params
from daemon.sandbox.state import SANDBOX

#: What ``credits`` says when the balance is unlimited: more than any test can spend.
UNLIMITED_CREDITS = 1_000_000_000

#: The per-product counters of the official answer, in its order.
USAGE_FIELDS = (
    "proxy_usage", "email_usage", "fingerprint_usage", "mobile_sdk_usage", "url_usage",
    "phone_usage",
)


async def account(request: web.Request) -> web.StreamResponse:
    """The balance and usage counters of the caller's account."""
    state, fmt = request.config_dict[SANDBOX], request.match_info["fmt"]
    if state.faults.account_missing:
        state.fired("account_missing")
        return web.Response(status=404, text="404 Not Found\n", content_type="text/plain")
    params = await read_params(request)
    if not state.key_accepted(api_key(request, params)):
        return answers.failure(fmt, answers.INVALID_KEY)
    credits = state.faults.credits
    usage = state.usage
    payload: dict[str, object] = {
        "success": True,
        "message": "Success",
        "credits": UNLIMITED_CREDITS if credits is None else credits,
        "usage": sum(usage.values()),
        **{name: usage[name.removesuffix("_usage")] for name in USAGE_FIELDS},
        "country_code": "US",
        "request_id": answers.request_id(),
    }
    return answers.answer(fmt, payload)
