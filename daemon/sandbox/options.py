"""Command-line flags for ``ipqs-bulkd sandbox``; the CLI module owns the parser and exits."""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon.sandbox.settings import OPERATIONS, Faults, SandboxSettings


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox flags: where to listen, timing knobs and one flag per fault knob."""
    defaults, knobs = SandboxSettings(), Faults()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8089, help="port to listen on")
    parser.add_argument("--key", help="the only API key accepted (default: any non-empty key)")
    parser.add_argument("--public-url", help="base of status and download URLs")
    parser.add_argument("--spool-dir", type=Path, help="keep received files here")
    parser.add_argument(
        "--fetch-urls", action="store_true", help="really fetch upload-by-URL links (loopback only)"
    )
    timing = parser.add_argument_group("timing (seconds on the sandbox clock)")
    for name in ("new_seconds", "processing_seconds", "per_row_seconds", "link_ttl_seconds"):
        timing.add_argument(_flag(name), type=_non_negative, default=getattr(defaults, name))
    faults = parser.add_argument_group("faults")
    faults.add_argument("--latency-ms", type=_non_negative, default=knobs.latency_ms)
    for name in ("error_5xx_rate", "rate_limit_403_rate", "rate_limit_429_rate"):
        faults.add_argument(_flag(name), type=_probability, default=0.0)
    faults.add_argument("--drop-rate", type=_probability, default=0.0)
    faults.add_argument("--lost-answer-rate", type=_probability, default=0.0)
    faults.add_argument(
        "--retry-after-seconds", type=_non_negative, default=knobs.retry_after_seconds
    )
    faults.add_argument("--credits", type=_credits, help="rows left (default: unlimited)")
    faults.add_argument(
        "--account-missing", action="store_true", help="answer the account API with 404"
    )
    faults.add_argument("--invalid-key", action="store_true", help="refuse every key")
    faults.add_argument("--outage", action="store_true", help="drop every API connection")
    faults.add_argument(
        "--fault-operations",
        type=_operations,
        default=OPERATIONS,
        help="comma-separated operations the rate faults and latency apply to",
    )
    faults.add_argument("--seed", type=int, help="seed for reproducible fault draws")


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
