"""The measurements: each scenario starts its own sandbox and daemon(s) and returns figures.

Every scenario is a function ``(bench, ...) -> dict`` of plain JSON-able values. Times are
seconds, memory MiB, unless a key says otherwise.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import (
    KEY,
    REPO,
    Log,
    Procs,
    Sandbox,
    SandboxTiming,
    Spool,
    big_csv,
    cpu_ns,
    iso_ts,
    percentile,
    start_daemon,
    thread_switches,
    vm_kib,
    wait_ready,
    wait_until,
    write_files,
)

Overrides = dict[str, dict[str, Any]]
MIB = 1024.0

#: The daemon's defaults that the bounds use (config.example.toml).
DEFAULT_CONCURRENCY = 4
DEFAULT_POLL_INITIAL = 2.0
POLLER_SLOTS = "x4"  # daemon/service.py: Poller(pipe, concurrency=4 * upload.concurrency)


def poller_slots(spec: str, concurrency: int) -> int:
    """``"8"``: that many; ``"x4"``: four per upload slot (``--poller-slots``)."""
    return int(spec[1:]) * concurrency if spec.startswith("x") else int(spec)


@dataclass
class Bench:
    """What every scenario shares: the process registry, a work folder, the sandbox timing."""

    procs: Procs
    workdir: Path
    timing: SandboxTiming
    overrides: Overrides = field(default_factory=dict)  # --set, for every daemon

    def spool(self, folder: str, box: Sandbox, extra: Overrides | None = None) -> Spool:
        """A spool under the work folder; config = defaults + --set + ``extra``."""
        merged: Overrides = {k: dict(v) for k, v in self.overrides.items()}
        for section, values in (extra or {}).items():
            merged.setdefault(section, {}).update(values)
        return Spool(self.folder(folder) / "spool", box, merged)

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def sandbox(self, timing: SandboxTiming | None = None,
                extra: tuple[str, ...] = ()) -> Iterator[Sandbox]:
        box = Sandbox(self.procs, self.workdir, timing or self.timing, extra)
        try:
            yield box.start()
        finally:
            box.stop()
            shutil.rmtree(self.workdir / f"sandbox-{box.port}", ignore_errors=True)


def _window(log: Log) -> float | None:
    event = log.first("writer_check_mode")
    return None if event is None else float(event.get("window") or 0)


def _resolved_mode(log: Log) -> str:
    event = log.first("writer_check_mode") or {}
    mode = str(event.get("mode", "?"))
    if mode == "auto":
        return "auto->proc" if event.get("writers_visible") else "auto->quiet"
    return mode


# -- baseline and (a) throughput -----------------------------------------------------------


def batch(bench: Bench, label: str, files: int, overrides: Overrides | None = None,
          timeout: float = 300, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """``run --once`` over ``files`` small files queued at start, as a subprocess."""
    with bench.sandbox() as box:
        spool = bench.spool(label, box, overrides)
        write_files(spool.inbox(), files)
        started = time.time()
        proc, log = start_daemon(bench.procs, spool, once=True, tag=label, prefix=prefix)
        exited = bench.procs.wait(proc, timeout)
        ended = time.time()
        uploads = box.uploads()
        stats = box.admin("stats")["requests"]
    done, failed = spool.count("done"), spool.count("failed")
    if done + failed != files or len(uploads) != files:
        raise RuntimeError(f"{label}: {done} done, {failed} failed, {len(uploads)} uploads of "
                           f"{files} files (exit {exited.code}); see {log.path}")
    shutil.rmtree(spool.root, ignore_errors=True)
    received = sorted(iso_ts(u["received_at"]) for u in uploads)
    finished = log.times("file_finished")
    result: dict[str, Any] = {
        "files": files, "exit_code": exited.code, "done": done, "failed": failed,
        "wall_s": round(ended - started, 3), "cpu_s": round(exited.cpu, 3),
        "peak_rss_mib": round(exited.maxrss_kib / MIB, 1),
        "writer_check": _resolved_mode(log), "settle_window_s": _window(log),
        "requests": stats, "config": spool.overrides,
    }
    if files:
        result["files_per_s"] = round(files / (ended - started), 2)
        result["upload_span_s"] = round(received[-1] - received[0], 3)
        result["upload_rate_per_s"] = round((len(received) - 1)
                                            / max(received[-1] - received[0], 1e-9), 2)
        result["first_upload_after_s"] = round(received[0] - started, 3)
        result["last_finish_after_s"] = round(max(finished) - started, 3) if finished else None
    return result


def best_batch(bench: Bench, label: str, files: int, repeats: int,
               overrides: Overrides | None = None) -> dict[str, Any]:
    """:func:`batch` ``repeats`` times; the fastest run, with every run's files/s."""
    runs = [batch(bench, f"{label}-{n}", files, overrides) for n in range(repeats)]
    best = max(runs, key=lambda run: run["files_per_s"])
    return best | {"runs_files_per_s": [run["files_per_s"] for run in runs]}


def startup(bench: Bench, repeats: int = 3) -> dict[str, Any]:
    """``run --once`` with nothing to do, ``repeats`` times; the median run (T0 of the bound:
    interpreter, imports, one list call, the scan, shutdown)."""
    runs = sorted((batch(bench, f"baseline-{i}", 0) for i in range(repeats)),
                  key=lambda run: run["wall_s"])
    median = runs[len(runs) // 2]
    return median | {"wall_s_all": [run["wall_s"] for run in runs]}


def bound(base: dict[str, Any], run: dict[str, Any], latency: float,
          slots: str = POLLER_SLOTS) -> dict[str, Any]:
    """The limit set by concurrency and latency, for ``run`` (see README: the formula).

    T_min = T0 + W + N * max(L/C, 2L/P) + P0 + 2L: start-up with nothing to do (measured),
    the settle window, N files through C upload slots (one round trip each) or P poller
    slots (a status and a download round trip each), whichever is narrower, then for the
    last file the wait for its first status check and those two round trips.
    """
    upload = run.get("config", {}).get("upload", {})
    conc = int(upload.get("concurrency", DEFAULT_CONCURRENCY))
    n, window = run["files"], run["settle_window_s"] or 0.0
    polls = poller_slots(slots, conc)
    per_file = max(latency / conc, 2 * latency / polls)
    t_min = base["wall_s"] + window + n * per_file + DEFAULT_POLL_INITIAL + 2 * latency
    return {
        "formula": "T_min = T0 + W + N*max(L/C, 2L/P) + P0 + 2L",
        "concurrency": conc, "poller_slots": polls, "latency_s": latency,
        "poll_initial_s": DEFAULT_POLL_INITIAL, "startup_s": base["wall_s"], "window_s": window,
        "steady_limit_per_s": round(1 / per_file, 2),
        "t_min_s": round(t_min, 3), "limit_files_per_s": round(n / t_min, 2),
        "of_limit": round(run["files_per_s"] / (n / t_min), 3),
        "steady_of_limit": round(run["upload_rate_per_s"] * per_file, 3),
    }


# -- (b) the sequential script -------------------------------------------------------------


def sequential(bench: Bench, files: int, poll: float = DEFAULT_POLL_INITIAL) -> dict[str, Any]:
    """``benchmarks/sequential.sh`` (curl, one file at a time) over ``files`` files."""
    folder = bench.folder("sequential")
    write_files(folder, files, tag=".seq")
    with bench.sandbox() as box:
        cmd = ["bash", str(REPO / "benchmarks" / "sequential.sh"), box.api, KEY, "email",
               f"{poll:g}", str(folder)]
        proc = bench.procs.start(cmd, bench.workdir / "sequential.log")
        exited = bench.procs.wait(proc, timeout=60 + files * 30)
        uploads = len(box.uploads())
    done = len(list((folder / "done").glob("*.all.csv")))
    shutil.rmtree(folder, ignore_errors=True)
    if exited.code != 0 or done != files:
        raise RuntimeError(f"sequential.sh failed ({exited.code}, {done}/{files} done); see "
                           f"{bench.workdir / 'sequential.log'}")
    per_file = exited.wall / files
    return {"files": files, "uploads": uploads, "wall_s": round(exited.wall, 3),
            "per_file_s": round(per_file, 3), "files_per_s": round(1 / per_file, 3),
            "poll_seconds": poll, "cpu_s": round(exited.cpu, 3)}


# -- (c) drop-to-upload latency ------------------------------------------------------------


def drop_latency(bench: Bench, label: str, files: int, gap: float,
                 overrides: Overrides | None = None) -> dict[str, Any]:
    """Rename files one by one into the inbox of an idle daemon; time each to its upload."""
    staging = bench.folder(label) / "staging"
    paths = write_files(staging, files, prefix="drop-", tag=f".{label}")
    with bench.sandbox() as box:
        spool = bench.spool(label, box, overrides)
        inbox = spool.inbox()
        proc, log = start_daemon(bench.procs, spool, once=False, tag=label)
        try:
            wait_ready(proc, log)
            time.sleep(1.0)  # idle: start-up work is over
            dropped = _drop_spaced(paths, inbox, gap)
            wait_until(lambda: len(box.uploads()) >= files, 60 + files * gap, "all uploads")
            wait_until(lambda: len(log.named("file_submitted")) >= files, 30, "file_submitted")
        finally:
            exited = bench.procs.stop(proc)
        uploads = box.uploads()
    shutil.rmtree(bench.workdir / label, ignore_errors=True)
    return _latencies(dropped, uploads, log) | {
        "files": files, "gap_s": gap, "writer_check": _resolved_mode(log),
        "settle_window_s": _window(log), "cpu_s": round(exited.cpu, 3),
        "config": spool.overrides,
    }


def _drop_spaced(paths: list[Path], inbox: Path, gap: float) -> dict[str, float]:
    dropped: dict[str, float] = {}
    next_at = time.monotonic()
    for path in paths:
        time.sleep(max(0.0, next_at - time.monotonic()))
        dropped[path.stem] = time.time()
        os.rename(path, inbox / path.name)
        next_at += gap
    return dropped


def _latencies(dropped: dict[str, float], uploads: list[dict[str, Any]],
               log: Log) -> dict[str, Any]:
    # The daemon sends file_name "<stem>-<job token>"; the watcher logs the inbox path.
    received = {u["file_name"].rsplit("-", 1)[0]: iso_ts(u["received_at"]) for u in uploads}
    settled = {Path(e["path"]).stem: iso_ts(e["timestamp"]) for e in log.named("file_settled")}
    submitted = {e["file_name"].rsplit("-", 1)[0]: iso_ts(e["timestamp"])
                 for e in log.named("file_submitted")}
    out: dict[str, Any] = {}
    for name, seen in (("settled", settled), ("upload_received", received),
                       ("submitted", submitted)):
        values = [seen[stem] - t for stem, t in dropped.items() if stem in seen]
        out[name] = {"p50_ms": round(1000 * percentile(values, 50)),
                     "p95_ms": round(1000 * percentile(values, 95)),
                     "max_ms": round(1000 * max(values)) if values else None,
                     "n": len(values)}
    return out


# -- (d) many files waiting ----------------------------------------------------------------


def waiting(bench: Bench, files: int, queue_size: int = 64) -> dict[str, Any]:
    """Peak RSS of a daemon with ``files`` small files in one inbox and IPQS unreachable."""
    spool_dir = bench.folder("waiting")
    made = time.monotonic()
    with bench.sandbox(extra=("--outage",)) as box:
        spool = bench.spool("waiting", box)
        write_files(spool.inbox(), files, rows=1, tag=".wait")
        made = time.monotonic() - made
        proc, log = start_daemon(bench.procs, spool, once=False, tag="waiting")
        try:
            started = time.time()
            wait_ready(proc, log, timeout=60)
            full = wait_until(lambda: len(log.named("file_settled")) >= queue_size, 60,
                              "a full hand-off queue")
            peak = 0
            for _ in range(20):  # 2 s more: the claims, the first retries
                peak = max(peak, vm_kib(proc.pid))
                time.sleep(0.1)
            rss_now = vm_kib(proc.pid, "VmRSS")
        finally:
            exited = bench.procs.stop(proc)
    left = sum(1 for _ in os.scandir(spool.inbox()))
    shutil.rmtree(spool_dir, ignore_errors=True)
    return {"files": files, "create_s": round(made, 1),
            "queue_full_after_s": round(full - started, 2),
            "peak_rss_mib": round(max(peak, exited.maxrss_kib) / MIB, 1),
            "rss_mib": round(rss_now / MIB, 1), "still_in_inbox": left,
            "writer_check": _resolved_mode(log)}


# -- (e) one big file ----------------------------------------------------------------------


def big_file(bench: Bench, size: int, repeats: int = 1) -> dict[str, Any]:
    """One ``size``-byte CSV: ``curl -F`` against the daemon, same sandbox settings; each
    ``repeats`` times, alternating, and the fastest of each compared (this machine may be
    shared: the sandbox, CPU-bound while receiving, is slowed by anything else running)."""
    folder = bench.folder("big")
    made = time.monotonic()
    source = big_csv(folder / "big.csv", size)
    made = time.monotonic() - made
    # The job never finishes: no results are generated for a GiB of rows meanwhile.
    timing = replace(bench.timing, processing_seconds=3600)
    curls, daemons = [], []
    try:
        for n in range(repeats):
            curls.append(_curl_upload(bench, timing, source))
            daemons.append(_daemon_upload(bench, timing, source, f"big-{n}"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    curl = min(curls, key=lambda run: run["wall_s"])
    daemon = min(daemons, key=lambda run: run["drop_to_answer_s"])
    return {"bytes": size, "create_s": round(made, 1), "curl": curl, "daemon": daemon,
            "drop_to_answer_vs_curl": round(daemon["drop_to_answer_s"] / curl["wall_s"], 3),
            "claim_to_answer_vs_curl": round(daemon["claim_to_answer_s"] / curl["wall_s"], 3),
            "curl_runs_s": [run["wall_s"] for run in curls],
            "daemon_drop_to_answer_runs_s": [run["drop_to_answer_s"] for run in daemons],
            "daemon_claim_to_answer_runs_s": [run["claim_to_answer_s"] for run in daemons]}


def _curl_upload(bench: Bench, timing: SandboxTiming, source: Path) -> dict[str, Any]:
    with bench.sandbox(timing) as box:
        assert box.proc is not None
        cpu0 = cpu_ns(box.proc.pid)
        url = f"{box.api}/json/csv/{KEY}/email/upload?file_name=big-curl"
        cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", "-F",
               f"file=@{source};type=text/csv", url]
        proc = bench.procs.start(cmd, bench.workdir / "curl.log")
        exited = bench.procs.wait(proc, timeout=900)
        sandbox = _sandbox_figures(box, cpu0)
    if exited.code != 0 or sandbox["uploads"] != 1:
        raise RuntimeError(f"curl upload failed ({exited.code}); see {bench.workdir}/curl.log")
    return {"wall_s": round(exited.wall, 3), "peak_rss_mib": round(exited.maxrss_kib / MIB, 1),
            "cpu_s": round(exited.cpu, 3), "sandbox": sandbox}


def _daemon_upload(bench: Bench, timing: SandboxTiming, source: Path,
                   label: str) -> dict[str, Any]:
    """The daemon takes ``source`` from its inbox; afterwards it is put back for the next run
    (the spool, with its duplicate marker, goes)."""
    with bench.sandbox(timing) as box:
        assert box.proc is not None
        spool = bench.spool(label, box)
        inbox = spool.inbox()
        proc, log = start_daemon(bench.procs, spool, once=False, tag="big")
        try:
            wait_ready(proc, log)
            cpu0 = cpu_ns(box.proc.pid)
            dropped = time.time()
            os.rename(source, inbox / source.name)
            wait_until(lambda: log.first("file_submitted") is not None, 900,
                       "the big upload", every=0.02)
            sandbox = _sandbox_figures(box, cpu0)
        finally:
            exited = bench.procs.stop(proc)
    settled = iso_ts(_event(log, "file_settled")["timestamp"])
    answered = iso_ts(_event(log, "file_submitted")["timestamp"])
    for taken in (spool.root / "processing").glob(f"*/{source.name}"):
        os.rename(taken, source)
    shutil.rmtree(spool.root.parent, ignore_errors=True)
    return {"drop_to_answer_s": round(answered - dropped, 3),
            "claim_to_answer_s": round(answered - settled, 3),
            "drop_to_claim_s": round(settled - dropped, 3),
            "peak_rss_mib": round(exited.maxrss_kib / MIB, 1), "cpu_s": round(exited.cpu, 3),
            "sandbox": sandbox}


def _event(log: Log, name: str) -> dict[str, Any]:
    event = log.first(name)
    if event is None:
        raise RuntimeError(f"no {name} in {log.path}")
    return event


def _sandbox_figures(box: Sandbox, cpu0: int) -> dict[str, Any]:
    assert box.proc is not None
    uploads = box.uploads()
    return {"peak_rss_mib": round(vm_kib(box.proc.pid) / MIB, 1),
            "cpu_s": round((cpu_ns(box.proc.pid) - cpu0) / 1e9, 3),
            "uploads": len(uploads),
            "received_at": uploads[0]["received_at"] if uploads else None}


# -- (f) idle ------------------------------------------------------------------------------


def idle(bench: Bench, seconds: float) -> dict[str, Any]:
    """CPU time, wake-ups (per thread too) and resident memory of a daemon with nothing to
    do. Threads are named by their kernel ``comm`` (Rust threads name themselves; Python's
    do not, so the event loop is the thread whose id is the process's)."""
    with bench.sandbox() as box:
        spool = bench.spool("idle", box)
        proc, log = start_daemon(bench.procs, spool, once=False, tag="idle")
        try:
            wait_ready(proc, log)
            time.sleep(3.0)  # past start-up
            cpu0, switches0, t0 = cpu_ns(proc.pid), thread_switches(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu1, switches1 = cpu_ns(proc.pid), thread_switches(proc.pid)
            elapsed = time.monotonic() - t0
            memory = {"rss_mib": round(vm_kib(proc.pid, "VmRSS") / MIB, 1),
                      "hwm_mib": round(vm_kib(proc.pid) / MIB, 1)}
        finally:
            bench.procs.stop(proc)
    shutil.rmtree(bench.workdir / "idle", ignore_errors=True)
    cpu = (cpu1 - cpu0) / 1e9
    threads = {name: round((switches1.get(name, 0) - before) / elapsed, 2)
               for name, before in switches0.items()}
    return {"seconds": round(elapsed, 1), "cpu_s": round(cpu, 4),
            "cpu_percent": round(100 * cpu / elapsed, 3),
            "cpu_s_per_hour": round(cpu / elapsed * 3600, 1),
            "wakeups_per_s": round(sum(threads.values()), 1),
            "wakeups_per_s_by_thread": threads, **memory}


# -- 3. several daemons on one spool -------------------------------------------------------


def shared_spool(bench: Bench, files: int, instances: int,
                 overrides: Overrides | None = None) -> dict[str, Any]:
    """``instances`` daemons (``run --once``) started together on one spool."""
    label = f"shared{instances}"
    with bench.sandbox() as box:
        spool = bench.spool(label, box, overrides)
        write_files(spool.inbox(), files, tag=f".{label}")
        started = time.time()
        runs = [start_daemon(bench.procs, spool, once=True, tag=f"{label}-{i}")
                for i in range(instances)]
        exits = [bench.procs.wait(proc, 300) for proc, _ in runs]
        ended = time.time()
        uploads = box.uploads()
    done, failed = spool.count("done"), spool.count("failed")
    shutil.rmtree(spool.root, ignore_errors=True)
    per_daemon = [len(log.named("file_submitted")) for _, log in runs]
    return {"instances": instances, "files": files, "wall_s": round(ended - started, 3),
            "files_per_s": round(files / (ended - started), 2),
            "done": done, "failed": failed, "uploads": len(uploads),
            "distinct_uploads": len({u["sha256"] for u in uploads}),
            "uploads_per_daemon": per_daemon, "exit_codes": [e.code for e in exits],
            "cpu_s": round(sum(e.cpu for e in exits), 3)}
