"""Command-line flags for ``ipqs-bulkd sandbox``; the CLI module owns the parser and exits."""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon.sandbox.settings import CHOICE_KNOBS, OPERATIONS, Faults, SandboxSettings


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text}")
    return value


def _credits(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _operations(text: str) -> frozenset[str]:
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = names - OPERATIONS
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown operations: {', '.join(sorted(unknown))}")
    return names


_TIMING_HELP = {
    "new_seconds": "a job stays NEW this long after its upload",
    "processing_seconds": "then PROCESSING this long, plus --per-row-seconds per row, "
                          "then FINISHED",
    "per_row_seconds": "extra PROCESSING time per row of the job",
    "link_ttl_seconds": "a result download link works this long after it is handed out",
}
_RATE_HELP = {
    "error_5xx_rate": "share of requests answered 500, 502 or 503 with an HTML body",
    "rate_limit_403_rate": "share answered 403 success:false, IPQS's rate-limit answer, with "
                           "Retry-After",
    "rate_limit_429_rate": "share answered 429 Too Many Requests, with Retry-After",
    "drop_rate": "share of connections closed without an answer, before anything is done",
    "lost_answer_rate": "share of uploads whose job is created but whose answer is lost "
                        "(the connection closes)",
}


def _base_url(text: str) -> str:
    if text and not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"must be an http(s) URL: {text}")
    return text


def _word(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox flags: where to listen, timing knobs and one flag per fault knob."""
    defaults, knobs = SandboxSettings(), Faults()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on "
                        "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8089, help="port to listen on "
                        "(default: %(default)s)")
    parser.add_argument("--key", help="the only API key accepted (default: any non-empty key)")
    parser.add_argument("--public-url", help="base of status and download URLs (default: "
                        "the scheme and host each request came to)")
    parser.add_argument("--spool-dir", type=Path, help="keep received files here (default: "
                        "a temporary folder, removed at exit)")
    parser.add_argument(
        "--fetch-urls", action="store_true", help="really fetch upload-by-URL links (loopback only)"
    )
    timing = parser.add_argument_group("timing (seconds on the sandbox clock)")
    for name, text in _TIMING_HELP.items():
        timing.add_argument(_flag(name), type=_non_negative, default=getattr(defaults, name),
                            metavar="S", help=f"{text} (default: %(default)s)")
    faults = parser.add_argument_group(
        "faults (a share is a probability from 0 to 1; rates and latency apply to "
        "--fault-operations)")
    faults.add_argument("--latency-ms", type=_non_negative, default=knobs.latency_ms,
                        metavar="MS", help="delay before each answer (default: %(default)s)")
    for name, text in _RATE_HELP.items():
        faults.add_argument(_flag(name), type=_probability, default=0.0, metavar="P",
                            help=f"{text} (default: %(default)s)")
    faults.add_argument(
        "--retry-after-seconds", type=_non_negative, default=knobs.retry_after_seconds,
        metavar="S", help="Retry-After sent with the rate-limit answers (default: %(default)s)"
    )
    faults.add_argument("--credits", type=_credits, help="rows left on the account; an upload "
                        "with more rows is refused (default: unlimited)")
    faults.add_argument(
        "--account-missing", action="store_true", help="answer the account API with 404"
    )
    faults.add_argument("--invalid-key", action="store_true", help="refuse every key")
    faults.add_argument("--outage", action="store_true", help="drop every API connection")
    faults.add_argument(
        "--fault-operations",
        type=_operations,
        default=OPERATIONS,
        metavar="OPS",
        help="comma-separated operations the rate faults, latency and odd answers apply to: "
             f"{', '.join(sorted(OPERATIONS))} (default: all)",
    )
    faults.add_argument("--seed", type=int, help="seed for reproducible fault draws "
                        "(default: a random seed)")
    _add_odd_answers(parser)
    _add_delivery_faults(parser)


def _add_odd_answers(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "odd answers (what CDNs, gateways and an untidy IPQS may send; see daemon.sandbox.odd)")
    knobs = Faults()
    helps = {
        "answer_form": "wrap or replace API answers (html: a 200 text/html page, also on "
                       "downloads)",
        "booleans": "how success and aborted are written",
        "status_case": "the case of status values",
        "downloads_form": "a FINISHED status answer without downloads, or with []",
    }
    for name, words in CHOICE_KNOBS.items():
        group.add_argument(_flag(name), choices=words, default=getattr(knobs, name),
                           help=helps[name] + " (default: %(default)s)")
    group.add_argument("--finished-status", type=_word, default=knobs.finished_status,
                       help="the word for a finished job, e.g. COMPLETED "
                            "(default: %(default)s)")
    group.add_argument("--truncate-downloads", action="store_true",
                       help="send downloads without Content-Length, cut mid-line half-way")
    group.add_argument("--odd-answers", type=_credits,
                       help="how many answers --answer-form, --downloads-form and "
                       "--truncate-downloads act on (default: all)")
    group.add_argument("--redirect-to", type=_base_url, default=None, metavar="URL",
                       help="answer 302 to this base URL, path kept (default: none)")
    group.add_argument("--trickle-ms", type=_non_negative, default=knobs.trickle_ms,
                       help="send answers one byte every N ms, 0 for at once "
                            "(default: %(default)s)")
    group.add_argument("--refuse-keyless-status", action="store_true",
                       help="answer the key-less /status/{id} form with 404")


def _add_delivery_faults(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "paid but slow results (whatever --fault-operations says; see daemon.sandbox.faults)")
    knobs = Faults()
    group.add_argument("--links-dead-seconds", type=_non_negative,
                       default=knobs.links_dead_seconds, metavar="S",
                       help="downloads answer 404 until the job has been FINISHED this long "
                            "(default: %(default)s)")
    counts = {
        "status_soft_failures": "the first N status calls answer success:false, 'An "
                                "internal error occurred.'",
        "null_link_answers": "the first N FINISHED status answers carry null links",
        "short_results": "the first N downloads of an 'all' set lack their last row",
    }
    for name, text in counts.items():
        group.add_argument(_flag(name), type=_credits, default=getattr(knobs, name),
                           metavar="N", help=f"{text} (default: %(default)s)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings_from_args(ns: argparse.Namespace) -> SandboxSettings:
    """Build settings from flags added by :func:`add_arguments` (``host``/``port`` excluded)."""
    faults = Faults(
        latency_ms=ns.latency_ms,
        error_5xx_rate=ns.error_5xx_rate,
        rate_limit_403_rate=ns.rate_limit_403_rate,
        rate_limit_429_rate=ns.rate_limit_429_rate,
        retry_after_seconds=ns.retry_after_seconds,
        drop_rate=ns.drop_rate,
        lost_answer_rate=ns.lost_answer_rate,
        credits=ns.credits,
        account_missing=ns.account_missing,
        invalid_key=ns.invalid_key,
        outage=ns.outage,
        operations=ns.fault_operations,
        seed=ns.seed,
        answer_form=ns.answer_form,
        booleans=ns.booleans,
        status_case=ns.status_case,
        finished_status=ns.finished_status,
        downloads_form=ns.downloads_form,
        truncate_downloads=ns.truncate_downloads,
        odd_answers=ns.odd_answers,
        redirect_to=ns.redirect_to or "",
        trickle_ms=ns.trickle_ms,
        keyless_status=not ns.refuse_keyless_status,
        links_dead_seconds=ns.links_dead_seconds,
        status_soft_failures=ns.status_soft_failures,
        null_link_answers=ns.null_link_answers,
        short_results=ns.short_results,
    )
    return SandboxSettings(
        key=ns.key,
        new_seconds=ns.new_seconds,
        processing_seconds=ns.processing_seconds,
        per_row_seconds=ns.per_row_seconds,
        link_ttl_seconds=ns.link_ttl_seconds,
        public_url=ns.public_url,
        fetch_urls=ns.fetch_urls,
        spool_dir=ns.spool_dir,
        faults=faults,
    )
