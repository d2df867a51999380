"""How the sandbox answers: IPQS's JSON and XML bodies, headers and failure messages.

Fidelity assumptions:

* Failures are HTTP 200 with ``{"success": false, "message": ..., "request_id": ...}``
  (IPQS answers 200 even when ``success`` is false, and puts the reason in ``message``);
  they carry no ``api_version``.
* Only the key and credit messages are IPQS's own wording (seen in third-party code for
  other IPQS APIs); the rest are the sandbox's.
* XML answers hold the JSON fields in a root ``<result>`` element. ``null`` becomes an
  empty element, booleans ``true``/``false``, and each item of an array is an element
  named by the array's name without its final "s" (``<csvs><csv>...</csv></csvs>``).
"""

from __future__ import annotations

import json
import secrets
import string
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from aiohttp import web

API_VERSION = 1
ALPHANUMERICS = string.ascii_letters + string.digits

JSON_TYPE = "application/json; charset=UTF-8"
XML_TYPE = "text/xml;charset=UTF-8"
POWERED_BY = "IPQualityScore"

INVALID_KEY = "Invalid or unauthorized key. Please check the API key and try again."
NO_CREDITS = "You have insufficient credits to make this query."
INVALID_ID = "Invalid CSV ID."
INVALID_TYPE = (
    "Invalid type. Please use one of: proxy, email, phone, url, leaked_email, "
    "leaked_password, leaked_username."
)
INVALID_PAGE = "Invalid page. Please use a whole number of 1 or more."
INTERNAL_ERROR = "An internal error occurred."
LINK_DEAD = "This download link has expired or was already used."
NO_FILE = (
    "No file was received. Send one file as multipart/form-data, a link in 'url', "
    "or rows in a JSON 'input' array."
)
NO_CONTENT_LENGTH = (
    "Multipart uploads must be sent with a Content-Length header. "
    "Please compute the length of the request body and try again."
)
MANY_FILES = "Please upload exactly one file per request."
FIELD_TOO_LARGE = "A form field is too large."
MALFORMED = "The request body could not be read as multipart/form-data."
BAD_JSON = "The request body is not a valid JSON object."
BAD_ROWS = "'input' must be an array of rows, each an array of strings."
EMPTY_INPUT = "'input' holds no rows."
NOT_CSV = "The file is not a valid CSV file: it must be UTF-8 text without NUL bytes."
EMPTY_FILE = "The file is empty: it holds no rows."
BAD_URL = "The url must be a direct link to the file, starting with http://, https:// or ftp://."
FETCH_FAILED = "Unable to download the file from the url provided."
RATE_LIMITED = "You have exceeded your request quota. Please slow down and try again later."
TOO_MANY_REQUESTS = "Too many requests. Please retry after the time given in Retry-After."


def request_id() -> str:
    """A fresh request id: ten random alphanumerics, like IPQS's."""
    return "".join(secrets.choice(ALPHANUMERICS) for _ in range(10))


def answer(
    fmt: str,
    payload: Mapping[str, object],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An API answer in ``fmt`` (``json`` or ``xml``) with IPQS's headers."""
    if fmt == "xml":
        body, content_type = to_xml(payload), XML_TYPE
    else:
        body, content_type = json.dumps(payload).encode(), JSON_TYPE
    all_headers = {"Content-Type": content_type, "X-Powered-By": POWERED_BY, **(headers or {})}
    return web.Response(status=status, body=body, headers=all_headers)


def failure(
    fmt: str, message: str, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A ``success: false`` answer; HTTP 200 unless told otherwise, as IPQS does."""
    payload = {"success": False, "message": message, "request_id": request_id()}
    return answer(fmt, payload, status=status, headers=headers)


def to_xml(payload: Mapping[str, object]) -> bytes:
    """Serialise an answer as ``<result>...</result>`` (see the module docstring)."""
    root = ET.Element("result")
    _fill(root, payload)
    declaration = '<?xml version="1.0" encoding="UTF-8"?>\n'
    return (declaration + ET.tostring(root, encoding="unicode")).encode()


def _fill(parent: ET.Element, payload: Mapping[str, object]) -> None:
    for name, value in payload.items():
        child = ET.SubElement(parent, name)
        if isinstance(value, list):
            for item in value:
                _put(ET.SubElement(child, name.removesuffix("s") or "item"), item)
        else:
            _put(child, value)


def _put(element: ET.Element, value: object) -> None:
    if isinstance(value, Mapping):
        _fill(element, value)
    elif isinstance(value, bool):
        element.text = "true" if value else "false"
    elif value is not None:
        element.text = str(value)
