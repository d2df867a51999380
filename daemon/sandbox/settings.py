"""What the sandbox is started with: timing knobs, the accepted key and the fault knobs.

``SandboxSettings`` is read once when the app is created. ``Faults`` is the exception: the
running sandbox keeps its own copy (``state.faults``) that tests and the admin endpoint
change at runtime, while ``settings.faults`` stays what ``/_sandbox/reset`` returns to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

#: A key for tests. Deliberately not 32 alphanumerics, so it can never be mistaken for,
#: or scanned as, a real IPQS key.
TEST_KEY = "sandbox-test-key-not-a-real-key"

#: The API operations the rate faults and the latency can be aimed at.
OPERATIONS = frozenset({"upload", "status", "list", "download", "account"})

#: Knobs that are probabilities from 0 to 1.
RATE_KNOBS = (
    "error_5xx_rate",
    "rate_limit_403_rate",
    "rate_limit_429_rate",
    "drop_rate",
    "lost_answer_rate",
)


#: Knobs that take one of a few words, with the words they take (the first is the default).
CHOICE_KNOBS: dict[str, tuple[str, ...]] = {
    "answer_form": ("json", "bom", "jsonp", "junk", "html", "empty"),
    "booleans": ("json", "string", "number"),
    "status_case": ("upper", "lower", "title"),
    "downloads_form": ("object", "missing", "empty_list"),
}


@dataclass
class Faults:
    """Fault knobs; mutable at runtime. Every ``*_rate`` is a probability from 0 to 1.

    The order in which they act on a request is documented in :mod:`daemon.sandbox.faults`.
    """

    latency_ms: float = 0
    #: Upload bodies are read no faster than this (a slow link); 0: as fast as they come.
    receive_kib_per_second: float = 0
    error_5xx_rate: float = 0
    rate_limit_403_rate: float = 0
    rate_limit_429_rate: float = 0
    retry_after_seconds: float = 1
    drop_rate: float = 0
    lost_answer_rate: float = 0
    credits: int | None = None
    account_missing: bool = False
    invalid_key: bool = False
    outage: bool = False
    operations: frozenset[str] = OPERATIONS
    seed: int | None = None
    # Odd answers (see daemon.sandbox.odd): what real answers look like after CDNs,
    # gateways and firewalls, or from a less tidy IPQS.
    answer_form: str = "json"
    booleans: str = "json"
    status_case: str = "upper"
    finished_status: str = "FINISHED"
    downloads_form: str = "object"
    truncate_downloads: bool = False
    odd_answers: int | None = None
    redirect_to: str = ""
    trickle_ms: float = 0
    keyless_status: bool = True
    # Delivery faults: results that are paid for but slow to arrive.
    links_dead_seconds: float = 0
    status_soft_failures: int = 0
    null_link_answers: int = 0
    short_results: int = 0

    def check(self) -> None:
        """Raise ``ValueError`` naming the first knob that is out of range."""
        for name in RATE_KNOBS:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        for name, words in CHOICE_KNOBS.items():
            if getattr(self, name) not in words:
                raise ValueError(f"{name} must be one of: {', '.join(words)}")
        if not self.finished_status.strip():
            raise ValueError("finished_status must not be empty")
        if self.odd_answers is not None and self.odd_answers < 0:
            raise ValueError("odd_answers must not be negative")
        if self.redirect_to and not self.redirect_to.startswith(("http://", "https://")):
            raise ValueError("redirect_to must be an http(s) URL or empty")
        for name in ("latency_ms", "retry_after_seconds", "trickle_ms", "links_dead_seconds",
                     "status_soft_failures", "null_link_answers", "short_results",
                     "receive_kib_per_second"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.credits is not None and self.credits < 0:
            raise ValueError("credits must not be negative")
        unknown = self.operations - OPERATIONS
        if unknown:
            raise ValueError(f"operations has unknown names: {', '.join(sorted(unknown))}")

    def as_json(self) -> dict[str, object]:
        """The knobs as a JSON-ready dict (``operations`` as a sorted list)."""
        data: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["operations"] = sorted(self.operations)
        return data


@dataclass
class SandboxSettings:
    """How the sandbox behaves. Every duration is in seconds of the sandbox clock.

    ``public_url`` is the base that ``status_url`` and download links start with (no
    ``/api``); by default it is taken from each request (``scheme://host``). ``spool_dir``
    gets ``jobs/`` and ``incoming/`` folders, emptied at start; by default a temporary
    directory removed at shutdown.
    """

    key: str | None = None
    new_seconds: float = 0.5
    processing_seconds: float = 1.0
    per_row_seconds: float = 0.001
    link_ttl_seconds: float = 900
    public_url: str | None = None
    fetch_urls: bool = False
    spool_dir: Path | None = None
    clock: Callable[[], float] = field(default=time.monotonic)
    #: The first job id handed out; ``run --sandbox`` starts from the time of day, so ids
    #: from different runs do not collide in the records they end up in.
    first_id: int = 3868534
    faults: Faults = field(default_factory=Faults)
