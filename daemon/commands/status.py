"""``ipqs-bulkd status``: what the spool holds and what the daemon is doing, read-only.

Safe beside a running daemon: it only lists folders, reads job records in processing/ and
the newest few records in done/ and failed/, and asks the daemon's health endpoint whether
uploads are paused. Work stays bounded on a big spool: folders are listed with
``os.scandir`` (names and mtimes, no parsing) and only the newest ``--recent`` records are
read.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from daemon import clocks
from daemon.commands.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Console,
    exit_help,
    human_age,
    positive_int,
    table,
)
from daemon.config import Config, HealthConfig
from daemon.health import CAVEAT_PREFIX, DEGRADED_PREFIX, reach_url
from daemon.shown import shown
from daemon.spool import OUTCOMES, Layout, Owner, Spool, daemons, is_ignored
from daemon.spool.ledger import Ledger, Limits, utc_day
from daemon.spool.mounts import misplaced

HEALTH_TIMEOUT = 2.0
MiB = 1024**2
PAUSED_PREFIX = "uploads paused: "
#: How the money guards' reasons begin (they wait, with nothing wrong with the account).
MONEY_PREFIXES = ("paused: ", "waiting ")

DESCRIPTION = """\
Show the spool at a glance: per type, how many files wait in the inbox, are in
processing, done or failed; the jobs in processing with their age and last IPQS status;
the most recently finished files with their outcome; whether the daemon has paused
uploads and the account's balance (read from its health endpoint,
health.host:health.port /readyz); and today's rows (UTC day) per type against the
[budget] limits. Every daemon on the spool publishes its health address in
<spool.root>/.daemon/, so daemons with health.port = 0 (or another port) are found too,
and each is listed with its readiness. Read-only: safe to run while the daemon runs.
"""

EPILOG = f"""\
examples:
  ipqs-bulkd status
  ipqs-bulkd status --recent 30
  ipqs-bulkd status --json | jq .types

{exit_help(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED,
           meanings={EXIT_OK: "shown", EXIT_FAILED: "a folder or record could not be read"})}"""


def add_parser(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = commands.add_parser(
        "status", help="show the spool: counts, jobs in processing, recent outcomes",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recent", type=positive_int, default=10, metavar="N",
                   help="how many recently finished files to show (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of tables, for scripts")
    add_config(p)


def run(ns: argparse.Namespace, config: Config, console: Console) -> int:
    report = collect(config, recent=ns.recent)
    report["daemon"], report["daemons"] = asyncio.run(probe_all(config))
    report["budget"] = budget(config)
    report["clock_synchronised"] = clocks.wall_clock_synced()
    if ns.json:
        console.line(json.dumps(report, indent=2))
    else:
        render(report, console)
    return EXIT_OK


def collect(config: Config, *, recent: int) -> dict[str, Any]:
    """Everything but the daemon's state, as JSON-ready data."""
    root = config.spool.root
    if not root.is_dir():
        raise CommandError(EXIT_USAGE, f"config key spool.root: {shown(root)} is not a folder "
                                       "(the daemon creates it when it starts)")
    spool = Spool(root, config.spool.types)
    types = config.spool.types
    counts = {t: {"inbox": _count_inbox(spool.inbox(t)), "processing": 0, "done": 0,
                  "failed": 0} for t in types}
    processing = _processing(spool, counts)
    finishing: dict[str, int] = {}
    for job in processing:
        if job["state"] == "finishing":
            where = f"{job['outcome'] or 'failed'}/{job['type']}"
            finishing[where] = finishing.get(where, 0) + 1
    finished: list[tuple[float, str, str, str]] = []
    for outcome in OUTCOMES:
        for file_type in types:
            folder = spool.outcome_dir(outcome, file_type)
            names = _records(folder)
            counts[file_type][outcome] = len(names)
            finished.extend(_stamped(folder, outcome, file_type, names))
    newest = heapq.nlargest(recent, finished)
    return {"root": str(root), "types": counts, "processing": processing,
            "finishing": finishing,
            "misplaced": [str(p.relative_to(root)) for p in misplaced(spool, types)],
            "hooks": _hooks(spool),
            "disk": _disk(root, config.spool.min_free_mb),
            "recent": [_finished(spool, *item) for item in newest]}


def _disk(root: Path, min_free_mb: int) -> dict[str, Any]:
    """Free space on the spool's file system, and whether it is under ``spool.min_free_mb``."""
    free = shutil.disk_usage(root).free
    return {"free_bytes": free, "min_free_bytes": min_free_mb * MiB,
            "low": free < min_free_mb * MiB}


#: Notices read for ``status`` at most (a hook down for days may owe many).
_NOTICES_READ = 1000


def _hooks(spool: Spool) -> dict[str, Any]:
    """Finished files whose ``on_finish`` hook has not exited 0 yet, and how many of them
    failed (read from their notices, at most ``_NOTICES_READ``)."""
    jobs = list(spool.notices.jobs())
    failing, last_error = 0, None
    for job in jobs[:_NOTICES_READ]:
        notice = spool.notices.load(job)
        if notice is not None and notice.attempts:
            failing += 1
            last_error = notice.last_error
    return {"pending": len(jobs), "failing": failing, "last_error": last_error}


def _count_inbox(folder: Path) -> int:
    return sum(1 for e in _scan(folder) if not is_ignored(e.name)
               and e.is_file(follow_symlinks=False))


def _scan(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except (FileNotFoundError, NotADirectoryError):
        return


def _processing(spool: Spool, counts: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    now = time.time()
    jobs: list[dict[str, Any]] = []
    for job_dir in spool.jobs():
        job = spool.load(job_dir)
        if job is None:
            jobs.append({"job": job_dir.name, "type": None, "source": None,
                         "state": "unreadable", "id": None, "status": None,
                         "outcome": None, "age_seconds": None})
            continue
        if job.type in counts:
            counts[job.type]["processing"] += 1
        jobs.append({"job": job.job, "type": job.type, "source": job.source,
                     "state": job.state, "id": job.id, "status": job.status,
                     "outcome": job.outcome, "age_seconds": _age(job.claimed_at, now),
                     "waiting": job.waiting})
    return jobs


def _age(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    try:
        return round(now - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp(), 1)
    except ValueError:
        return None


def _records(folder: Path) -> list[str]:
    """Names of the records in a done/ or failed/ folder, by name alone.

    ``x.json`` is a record if ``x`` is beside it, or if nothing (``x.json.json``) claims
    ``x.json`` itself as its input; so an input that happens to end in .json is told apart
    from a record whose input has vanished.
    """
    names = {e.name for e in _scan(folder) if not e.name.startswith(".")}
    return [n for n in names if n.endswith(".json") and (n[:-5] in names
                                                         or n + ".json" not in names)]


def _stamped(folder: Path, outcome: str, file_type: str,
             names: list[str]) -> Iterator[tuple[float, str, str, str]]:
    for name in names:
        try:
            mtime = (folder / name).stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        yield mtime, outcome, file_type, name


def _finished(layout: Layout, mtime: float, outcome: str, file_type: str,
              record_name: str) -> dict[str, Any]:
    record = _read_json(layout.outcome_dir(outcome, file_type) / record_name)
    return {"type": file_type, "name": record_name[:-5], "outcome": outcome,
            "reason": record.get("reason"), "error": record.get("error"),
            "id": record.get("id"), "status": record.get("status"),
            "invalid_records": record.get("invalid_records"),
            "finished_at": record.get("finished_at"), "mtime": round(mtime, 3),
            "record": f"{outcome}/{file_type}/{record_name}"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- the daemon's health endpoint -----------------------------------------------------------


async def probe_all(config: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The daemon's readiness (the configured one, else one found in the spool), and every
    daemon that published its address in the spool's ``.daemon/``, each with its own."""
    health = config.health
    found = daemons.published(Layout(config.spool.root), host_id=Owner.current().host)
    configured = reach_url(health.host, health.port) if health.enabled and health.port \
        else None
    probes = await asyncio.gather(*(_probe_published(p) for p in found))
    listed = [{"host": p.host, "pid": p.pid, "health_url": p.health_url,
               "started_at": p.started_at, "local": p.local, **state}
              for p, state in zip(found, probes, strict=True)]
    reachable = {d["health_url"]: d for d in listed if d["reachable"]}
    if configured in reachable:
        return _state(reachable[configured]), listed
    if configured is not None or not health.enabled:
        main = await probe(health)
        if main["reachable"] or not listed:
            return main, listed
    if listed:  # the configured port is 0, or nobody answers there: the spool says where
        return _state(next(iter(reachable.values()), listed[0])), listed
    return _unknown("unknown (health.port = 0 and no running daemon has published its "
                    f"address in {config.spool.root / '.daemon'})"), listed


def _state(daemon: dict[str, Any]) -> dict[str, Any]:
    """What ``/readyz`` said, without where the daemon is."""
    return {k: v for k, v in daemon.items()
            if k not in ("host", "pid", "health_url", "started_at", "local")}


def _unknown(reason: str) -> dict[str, Any]:
    """A daemon's state when its health endpoint gave no answer: ``reason`` says why."""
    return {"reachable": False, "ready": None, "paused": None, "degraded": None,
            "reason": reason}


async def _probe_published(daemon: daemons.Published) -> dict[str, Any]:
    loopback = daemon.health_url.startswith(("http://127.", "http://[::1]", "http://localhost"))
    if not daemon.local and loopback:
        return _unknown(f"on host {daemon.host}: not checked from here (its health "
                        "endpoint listens on its own loopback)")
    return await _readyz(daemon.health_url)


async def probe(health: HealthConfig) -> dict[str, Any]:
    """The daemon's readiness from ``/readyz``: reachable, ready, paused and why."""
    if not health.enabled:
        return _unknown("unknown (health endpoint off: health.enabled = false)")
    return await _readyz(reach_url(health.host, health.port))


async def _readyz(base: str) -> dict[str, Any]:
    url = f"{base}/readyz"
    timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, \
                session.get(url) as resp:
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("ready"), bool):
        return _unknown(f"unknown (daemon not reachable at {url})")
    reason = str(data.get("reason") or "")
    paused = reason.startswith((PAUSED_PREFIX, *MONEY_PREFIXES))
    degraded = reason.startswith(DEGRADED_PREFIX)
    credits = data.get("credits")
    waiting = data.get("waiting")
    unreadable = waiting.get("unreadable") if isinstance(waiting, dict) else None
    return {"reachable": True, "ready": data["ready"], "paused": paused, "degraded": degraded,
            "reason": reason.removeprefix(PAUSED_PREFIX).removeprefix(DEGRADED_PREFIX),
            "credits": credits if isinstance(credits, int) else None,
            "unreadable": unreadable if isinstance(unreadable, int) else 0}


def budget(config: Config, now: float | None = None) -> dict[str, Any]:
    """Today's rows (UTC day) per type from the spool's ledger, against the budgets."""
    cfg = config.budget
    limits = Limits(cfg.max_rows_per_day, dict(cfg.max_rows_per_day_by_type))
    day = utc_day(time.time() if now is None else now)
    used = Ledger(config.spool.root, limits).used(day)
    # The daemon reserves rows in the ledger only when a daily budget is set.
    counted = bool(limits.per_day or any(limits.per_type.values()))
    return {"day": day.isoformat(), "counted": counted, "used": used,
            "max_rows_per_day": cfg.max_rows_per_day,
            "max_rows_per_day_by_type": dict(cfg.max_rows_per_day_by_type),
            "left": {t: n for t in config.spool.types
                     if (n := limits.left(used, t)) is not None}}


# -- text output ----------------------------------------------------------------------------


def render(report: dict[str, Any], console: Console) -> None:
    console.line(f"spool {shown(report['root'])}")
    rows = [[t, c["inbox"], c["processing"], c["done"], c["failed"]]
            for t, c in report["types"].items()]
    console.line(table(["TYPE", "INBOX", "PROCESSING", "DONE", "FAILED"], rows))
    console.line()
    stray = report["misplaced"]
    if stray:
        names = ", ".join(shown(p) for p in stray[:5]) + (", ..." if len(stray) > 5 else "")
        console.line(f"misplaced: {len(stray)} (never taken; move into inbox/<type>/): {names}")
        console.line()
    console.line(f"uploads: {shown(_uploads(report['daemon']))}")
    _render_daemons(report["daemons"], console)
    _render_money(report, console)
    _render_caveats(report, console)
    console.line()
    disk = report["disk"]
    if disk["low"]:
        console.line(f"LOW DISK: {disk['free_bytes'] // MiB} MiB free on the spool's file "
                     f"system, under spool.min_free_mb ({disk['min_free_bytes'] // MiB})")
        console.line()
    hooks = report["hooks"]
    if hooks["pending"]:
        failing = (f", {hooks['failing']} failing (last error: {shown(hooks['last_error'])})"
                   if hooks["failing"] else "")
        console.line(f"on_finish hooks pending: {hooks['pending']}{failing}")
        console.line()
    if report["daemon"].get("unreadable"):
        console.line(f"unreadable: {report['daemon']['unreadable']} file(s) wait in the inboxes "
                     "because the daemon's user may not read them (chmod g+r; see the "
                     "file_unreadable log lines)")
        console.line()
    if report["finishing"]:
        waiting = ", ".join(f"{shown(folder)} {n}" for folder, n in report["finishing"].items())
        console.line(f"waiting to be moved (finishing): {waiting}")
        console.line()
    jobs = report["processing"]
    console.line(f"in processing: {len(jobs)}")
    if jobs:
        console.line(table(
            ["JOB", "TYPE", "FILE", "STATE", "IPQS ID", "IPQS STATUS", "AGE"],
            [[j["job"], j["type"], j["source"], j["state"], j["id"], j["status"],
              human_age(j["age_seconds"])] for j in jobs]))
        for j in jobs:
            if j.get("waiting"):
                console.line(f"waiting: {j['job']} ({j['source']}): {j['waiting']}")
    console.line()
    recent = report["recent"]
    console.line(f"recently finished: {len(recent)}")
    if recent:
        console.line(table(
            ["FINISHED", "TYPE", "FILE", "OUTCOME", "IPQS ID", "DETAIL"],
            [[r["finished_at"], r["type"], r["name"], _outcome(r), r["id"], _detail(r)]
             for r in recent]))


def _render_money(report: dict[str, Any], console: Console) -> None:
    daemon, day = report["daemon"], report["budget"]
    credits = daemon.get("credits")
    console.line(f"credits: {credits if credits is not None else 'unknown'}"
                 + ("" if credits is not None or not daemon["reachable"]
                    else " (budget.check_credits off, or the account API unreadable)"))
    if not day["counted"]:
        console.line(f"rows today ({day['day']} UTC): not counted (no daily budget: "
                     "budget.max_rows_per_day and ..._by_type are 0)")
        return
    total = sum(day["used"].values())
    cap = day["max_rows_per_day"]
    parts = [f"all types {total}" + (f" of {cap}" if cap else "")]
    for file_type, rows in sorted(day["used"].items()):
        limit = day["max_rows_per_day_by_type"].get(file_type)
        parts.append(f"{file_type} {rows}" + (f" of {limit}" if limit else ""))
    parts += [f"{t} 0 of {n}" for t, n in sorted(day["max_rows_per_day_by_type"].items())
              if n and t not in day["used"]]
    console.line(f"rows today ({day['day']} UTC): {', '.join(parts)}")


def _uploads(daemon: dict[str, Any]) -> str:
    """Raw text (it may quote IPQS's own words): show it with :func:`shown`."""
    reason = str(daemon["reason"])
    if not daemon["reachable"]:
        return reason
    if daemon["paused"] and str(daemon["reason"]).startswith(MONEY_PREFIXES):
        return reason
    if daemon["paused"]:
        return f"PAUSED: {reason}"
    if daemon["degraded"]:
        return f"running, DEGRADED: {reason}"
    if daemon["ready"]:
        return "running"
    return f"not running yet: {reason}"


def _render_caveats(report: dict[str, Any], console: Console) -> None:
    """What is off while uploads run: this host's clock, and the daemon's own caveats."""
    if report.get("clock_synchronised") is False:
        console.line(f"clock: {clocks.UNSYNCED}")
    daemon = report["daemon"]
    caveats = str(daemon["reason"]).partition(CAVEAT_PREFIX)[2] if daemon["ready"] else ""
    for caveat in caveats.split("; ") if caveats else []:
        if caveat != clocks.UNSYNCED or report.get("clock_synchronised") is not False:
            console.line(f"note: {shown(caveat)}")


def _render_daemons(found: list[dict[str, Any]], console: Console) -> None:
    if not found:
        return
    console.line(f"daemons on this spool: {len(found)}")
    console.line(table(
        ["PID", "HOST", "HEALTH", "STARTED", "UPLOADS"],
        [[d["pid"], d["host"], d["health_url"], d["started_at"], _uploads(d)]
         for d in found]))


def _outcome(record: dict[str, Any]) -> str:
    return f"failed ({record['reason']})" if record["outcome"] == "failed" else "done"


def _detail(record: dict[str, Any]) -> str:
    if record["outcome"] == "failed":
        error = str(record.get("error") or "")
        return error if len(error) <= 60 else error[:57] + "..."
    invalid = record.get("invalid_records")
    return f"{record.get('status') or '-'}, {invalid if invalid is not None else '-'} invalid"
