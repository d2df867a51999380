"""The health listener of a running daemon: probes and Prometheus metrics, over real HTTP.

Each test runs the sandbox and a :class:`~daemon.service.Service` in-process, with the
health listener on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import Config, ConfigError
from daemon.sandbox.account import UNLIMITED_CREDITS as UNLIMITED
from daemon.service import Service
from tests.support import (
    daemon_config,
    drop,
    emails,
    quick_settings,
    records,
    sandbox_server,
    wait_for,
)

# -- helpers -------------------------------------------------------------------------------


def health_config(root: Path, api_base: str, **sections: dict[str, Any]) -> Config:
    sections.setdefault("health", {})
    sections["health"] = {"enabled": True, "host": "127.0.0.1", "port": 0,
                          **sections["health"]}
    return daemon_config(root, api_base, **sections)


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[str]:
    """Run ``service`` in the background; yield its health base URL once it listens."""
    task = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: task.done() or (service.health_server is not None
                                               and service.health_server.port is not None),
                       what="health listener")
        assert service.health_server is not None and not task.done()
        yield f"http://127.0.0.1:{service.health_server.port}"
    finally:
        service.stop.set()
        await asyncio.wait_for(task, timeout=30)


async def get(url: str) -> tuple[int, str, str]:
    """GET ``url``: status, Content-Type, body."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def ready(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


@dataclass
class Scrape:
    """One parsed ``/metrics`` answer."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """Sum of every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


async def scrape(base: str) -> Scrape:
    status, content_type, text = await get(base + "/metrics")
    assert status == 200
    # Prometheus text format: version 0.0.4, or 1.0.0 from prometheus-client 0.22 on.
    assert content_type.startswith("text/plain; version=")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types)


def sample_value(service: Service, name: str, **labels: str) -> float:
    return service.pipe.metrics.registry.get_sample_value(name, labels) or 0.0


# -- probes --------------------------------------------------------------------------------


async def test_readyz_is_503_until_recovery_is_done_while_healthz_answers(
        tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path), gate="list") as sandbox:
        gate = sandbox.gate
        assert gate is not None
        service = Service(health_config(tmp_path / "spool", sandbox.api_base))
        async with serving(service) as base:
            # The daemon asks for the newest job id before it resumes anything; held here.
            await asyncio.wait_for(gate.arrived.wait(), timeout=30)
            assert await get(base + "/healthz") == (200, "application/json; charset=utf-8",
                                                     '{"status": "ok"}')
            status, body = await ready(base)
            assert status == 503 and body["ready"] is False
            assert "recovering" in body["reason"]

            gate.open()
            await wait_for(lambda: service.health.watching, what="watching")
            assert await ready(base) == (200, {"ready": True, "reason": "ready",
                                               "credits": UNLIMITED,
                                               "waiting": {"unreadable": 0}})


async def test_readyz_is_503_while_an_account_error_pauses_uploads(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        sandbox.state.faults.invalid_key = True
        root = tmp_path / "spool"
        # Probe the account again quickly once paused.
        service = Service(health_config(root, sandbox.api_base, upload={
            "pause_initial_seconds": 0.05, "pause_max_seconds": 0.2}))
        async with serving(service) as base:
            await wait_for(lambda: service.health.watching, what="watching")
            drop(root, "email", "list.csv", emails(3))
            await wait_for(lambda: service.pipe.breaker.paused, what="uploads paused")

            status, body = await ready(base)
            assert status == 503 and body["ready"] is False
            assert body["reason"].startswith("uploads paused: ")
            assert "fake-key" not in body["reason"]
            assert (await scrape(base)).value("ipqs_bulkd_uploads_paused") == 1
            assert (await get(base + "/healthz"))[0] == 200
            # Paused, not failed: the file waits.
            assert records(root, "failed") == {} and records(root, "done") == {}

            sandbox.state.faults.invalid_key = False
            await wait_for(lambda: "list.csv" in records(root, "done"), what="file done")
            status, body = await ready(base)
            assert (status, body["ready"], body["reason"]) == (200, True, "ready")
            assert (await scrape(base)).value("ipqs_bulkd_uploads_paused") == 0


async def test_health_listener_can_be_turned_off(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        config = health_config(tmp_path / "spool", sandbox.api_base,
                               health={"enabled": False})
        service = Service(config)
        task = asyncio.create_task(service.run())
        await wait_for(lambda: service.health.watching or task.done(), what="ready")
        assert service.health_server is None and not task.done()
        service.stop.set()
        assert await asyncio.wait_for(task, timeout=30) == 0


async def test_a_taken_health_port_refuses_to_start_naming_health_port(tmp_path: Path) -> None:
    # Running on without health would fail liveness probes and let `status` read another
    # daemon's /readyz: the second daemon on a port stops at once, as a config error.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with sandbox_server(quick_settings(tmp_path)) as sandbox:
            root = tmp_path / "spool"
            drop(root, "email", "list.csv", emails(2))
            service = Service(health_config(root, sandbox.api_base, health={"port": port}))
            with pytest.raises(ConfigError, match=f"health.port: 127.0.0.1:{port} is already"):
                await asyncio.wait_for(service.run(), timeout=30)
            assert service.health_server is None and sandbox.uploads() == []
            assert (root / "inbox" / "email" / "list.csv").exists()


# -- metrics -------------------------------------------------------------------------------


async def test_metrics_after_a_small_run(tmp_path: Path) -> None:
    # Jobs stay NEW at the sandbox until its clock is advanced: "at IPQS" can be observed.
    settings = quick_settings(tmp_path, new_seconds=3600)
    async with sandbox_server(settings) as sandbox:
        faults = sandbox.state.faults
        faults.operations = frozenset({"upload"})
        faults.retry_after_seconds = 0.01
        faults.rate_limit_429_rate = 1.0
        root = tmp_path / "spool"
        service = Service(health_config(root, sandbox.api_base))
        async with serving(service) as base:
            await wait_for(lambda: service.health.watching, what="watching")
            files = {("email", f"list-{i}.csv"): emails(5 + i, seed=str(i)) for i in range(3)}
            files["phone", "phones.csv"] = b"+14155550100\n+14155550101\n"
            for (file_type, name), data in files.items():
                drop(root, file_type, name, data)
            await wait_for(lambda: sample_value(service, "ipqs_bulkd_retries_total",
                                                operation="upload", cause="rate_limit") >= 3,
                           what="rate-limited uploads retried")
            faults.rate_limit_429_rate = 0.0
            await wait_for(lambda: service.poller.waiting() == 4, what="4 jobs at IPQS")

            busy = await scrape(base)
            assert busy.value("ipqs_bulkd_jobs_in_flight", stage="at_ipqs") == 4
            assert busy.value("ipqs_bulkd_jobs_in_flight", stage="uploading") == 0

            # Then one paid-for duplicate avoided, and one unusable .url file.
            drop(root, "email", "again.csv", files["email", "list-0.csv"])
            drop(root, "url", "bad.url", b"this is not a URL\n")
            await wait_for(lambda: service.pipe.outcomes["failed"] == 2, what="2 failed")
            sandbox.state.advance(7200)
            await wait_for(lambda: service.pipe.outcomes["done"] == 4, what="4 done")
            metrics = await scrape(base)
        stats = sandbox.state.stats

    files_total = "ipqs_bulkd_files_total"
    assert metrics.value(files_total, type="email", outcome="done", reason="") == 3
    assert metrics.value(files_total, type="phone", outcome="done", reason="") == 1
    assert metrics.value(files_total, type="email", outcome="failed", reason="duplicate") == 1
    assert metrics.value(files_total, type="url", outcome="failed", reason="invalid-input") == 1
    assert metrics.total(files_total) == 6

    sent = stats.requests["upload"]
    # The duplicate's body was started and stopped before its end (the one pass finds it
    # then): one request more, nothing more paid.
    assert sent == 4 + stats.faults["rate_limit_429"] + 1 and sent >= 8
    assert len(sandbox.uploads()) == 4
    assert metrics.value("ipqs_bulkd_uploads_total", method="multipart") == sent
    assert metrics.value("ipqs_bulkd_upload_bytes_total") == sum(map(len, files.values()))
    assert metrics.value("ipqs_bulkd_retries_total", operation="upload",
                         cause="rate_limit") == stats.faults["rate_limit_429"]
    assert metrics.total("ipqs_bulkd_retries_total") == stats.faults["rate_limit_429"]

    assert metrics.value("ipqs_bulkd_jobs_in_flight", stage="at_ipqs") == 0
    assert metrics.value("ipqs_bulkd_jobs_in_flight", stage="uploading") == 0
    assert metrics.value("ipqs_bulkd_inbox_pending") == 0
    assert metrics.value("ipqs_bulkd_inbox_oldest_seconds") == 0
    assert metrics.value("ipqs_bulkd_uploads_paused") == 0

    latency = "ipqs_bulkd_api_seconds"
    assert metrics.types[latency] == "histogram"
    assert metrics.value(latency + "_count", operation="upload") == sent
    assert metrics.value(latency + "_count", operation="download") == 4
    status_checks = metrics.value(latency + "_count", operation="status")
    assert status_checks is not None and status_checks >= 4
    for operation in ("upload", "status", "download"):
        buckets = sorted(
            (float(dict(labels)["le"]), value) for (name, labels), value in
            metrics.samples.items()
            if name == latency + "_bucket" and ("operation", operation) in labels)
        counts = [value for _, value in buckets]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), counts[-1])
        assert counts[-1] == metrics.value(latency + "_count", operation=operation)


async def test_queue_depth_and_oldest_waiting_file(tmp_path: Path) -> None:
    async with sandbox_server(quick_settings(tmp_path)) as sandbox:
        root = tmp_path / "spool"
        # Writers unseen, a long quiet window: dropped files wait in the inbox.
        config = health_config(root, sandbox.api_base,
                               watch={"writer_check": "quiet", "quiet_seconds": 3600.0})
        service = Service(config)
        async with serving(service) as base:
            await wait_for(lambda: service.health.watching, what="watching")
            assert (await scrape(base)).value("ipqs_bulkd_inbox_pending") == 0
            drop(root, "email", "a.csv", emails(2))
            drop(root, "phone", "b.csv", b"+14155550100\n")
            await wait_for(lambda: service.watcher.pending_count() == 2, what="2 pending")
            metrics = await scrape(base)
            assert metrics.value("ipqs_bulkd_inbox_pending") == 2
            oldest = metrics.value("ipqs_bulkd_inbox_oldest_seconds")
            assert oldest is not None and 0 < oldest < 60
        assert sandbox.state.stats.requests["upload"] == 0
    assert (root / "inbox" / "email" / "a.csv").exists()
    assert (root / "inbox" / "phone" / "b.csv").exists()
