"""Logging set-up and secret redaction.

``configure()`` is called once, by :mod:`daemon.cli`; library modules only do
``log = structlog.get_logger(__name__)``. Output is JSON lines off a terminal and readable
lines on one. Every event, including those of the standard ``logging`` module (aiohttp,
asyncio), passes :func:`redact` last before rendering, so the API key, status URLs
(``/csv/<key>/``), ``key=`` parameters and one-time ``download=`` tokens never reach a log.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from daemon.shown import shown, terminal_safe

MASK = "***"

# IPQS puts the key into URL paths (/csv/<key>/...) and parameters; download links carry a
# one-time bearer token. Each pattern keeps its prefix and masks the secret after it.
_PATTERNS = (
    re.compile(r"(/csv/)(?!upload\b|list\b|status\b)[^/\s?#\"']+"),
    re.compile(r"((?:[?&;\s\"']|^)(?:key|download|api_key|apikey)=)[^&\s\"'#]+", re.IGNORECASE),
    re.compile(r"(ipqs-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+", re.IGNORECASE),
)

_secrets: set[str] = set()


def add_secret(secret: str) -> None:
    """Mask this literal string everywhere from now on (the API key, for one)."""
    if len(secret) >= 4:
        _secrets.add(secret)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret and secret-bearing URL part masked."""
    for secret in (*_secrets, *secrets):
        if secret and secret in text:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_scrub_value(v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return scrub(str(value))


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every value of the event, nested or not."""
    for name, value in event_dict.items():
        event_dict[name] = _scrub_value(value)
    return event_dict


# Composed text whose line breaks are meant (a traceback, a foreign library's message).
_COMPOSED = frozenset({"event", "exception", "stack"})


def shown_values(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor for console logs: names and IPQS strings as :func:`shown`.

    Only for the console renderer: JSON logs keep exact names (JSON escapes them).
    """
    for name, value in event_dict.items():
        if isinstance(value, str):
            event_dict[name] = terminal_safe(value) if name in _COMPOSED else shown(value)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one redacting renderer on ``stream``."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact,
                *(() if use_json else (shown_values,)),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every request line (with keys in paths): keep it off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles says "N changes detected" at info for every drop; our own lines say more.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
