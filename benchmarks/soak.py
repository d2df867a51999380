"""Crash soak: ``kill -9`` a running daemon many times while files keep arriving, then check
that every file was filed once and paid for once.

    .venv/bin/python benchmarks/soak.py [--kills 1000] [--seed 1] [--json PATH]

The sandbox (a subprocess, loopback, a free port) loses 10% of upload answers (the job is
created, the connection is closed unanswered) and answers 5% of all API requests with a
5xx. A daemon (``ipqs-bulkd run``, a subprocess in its own process group) is killed with
SIGKILL at random moments 0.05 to 1.5 s apart and restarted at once, ``--kills`` times,
while new files are renamed into its inbox at a steady rate. Then one ``run --once``
drains what is left, and the spool and the sandbox's upload log are checked:

* every file dropped is in ``done/`` exactly once, byte for byte, nothing in ``failed/``;
* no content (sha256) and no ``file_name`` was uploaded twice, every file was uploaded,
  and each record's id is the upload of its own content;
* nothing is left in ``processing/`` or in an inbox.

The figures are printed and written as JSON (``--json``); the exit status is 0 when every
check held, 1 otherwise. ``--seed`` fixes the kill moments, the file sizes and the
sandbox's fault draws; the daemon's own timing still varies from run to run, so a seed
narrows a failure down but does not replay it exactly. ``--max-minutes`` bounds the kill
phase (it stops early, says so, and still drains and checks) and ``--drain-seconds`` the
drain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    Procs,
    Sandbox,
    SandboxTiming,
    Spool,
    daemon_cmd,
    interrupts_as_exceptions,
)

FILE_TYPE = "email"
# Short jobs, so that kills land in every state (uploading, submitted, fetching results).
TIMING = SandboxTiming(latency_ms=20, new_seconds=0.05, processing_seconds=0.2)
# The defaults of config.example.toml, made fast: a soak that waits seconds per file would
# see few states per life. lookup_delay_seconds stays above the sandbox's answer time
# (latency plus a small file), as the README asks of it against IPQS's read timeout.
DAEMON = {
    "watch": {"settle_seconds": 0.05},
    "upload": {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.5,
               "lookup_delay_seconds": 0.5},
    "poll": {"initial_seconds": 0.05, "max_seconds": 0.5},
    "log": {"level": "info", "format": "json"},
}


@dataclass
class Feeder:
    """Renames new files of unique content into the inbox at ``rate`` files per second."""

    inbox: Path
    staging: Path
    rng: random.Random
    rate: float
    expected: dict[str, str] = field(default_factory=dict)  # name -> sha256
    started: float = field(default_factory=time.monotonic)

    def feed(self) -> None:
        due = int((time.monotonic() - self.started) * self.rate) + 1
        while len(self.expected) < due:
            self.drop()

    def drop(self) -> None:
        n = len(self.expected)
        rows = self.rng.randint(5, 400)
        data = "".join(f"soak{n}.{r}@example.com\n" for r in range(rows)).encode()
        name = f"soak-{n:06d}.csv"
        tmp = self.staging / name
        tmp.write_bytes(data)
        tmp.rename(self.inbox / name)
        self.expected[name] = hashlib.sha256(data).hexdigest()


@dataclass
class KillPhase:
    kills: int = 0
    stopped_early: bool = False
    unexpected_exits: list[int] = field(default_factory=list)
    states_at_kill: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def kill_phase(procs: Procs, spool: Spool, feeder: Feeder, rng: random.Random,
               kills: int, max_seconds: float) -> KillPhase:
    """Start, kill -9 at a random moment, restart at once; ``kills`` times or until time is up."""
    phase = KillPhase()
    started = time.monotonic()
    cmd = daemon_cmd("run", "--config", str(spool.config))
    log = spool.root.parent / "daemon.log"
    while phase.kills < kills:
        if time.monotonic() - started > max_seconds:
            phase.stopped_early = True
            break
        proc = procs.start(cmd, log)
        life_ends = time.monotonic() + rng.uniform(0.05, 1.5)
        while time.monotonic() < life_ends and proc.poll() is None:
            feeder.feed()
            time.sleep(0.005)
        if proc.poll() is None:
            procs.kill(proc)  # SIGKILL to its process group (the daemon alone), then reaped
            phase.kills += 1
        else:  # it ended by itself: a finding, not a kill
            phase.unexpected_exits.append(procs.wait(proc, 5).code)
        phase.states_at_kill.update(job_states(spool.root))
    phase.seconds = time.monotonic() - started
    return phase


def job_states(root: Path) -> Counter[str]:
    """States of the jobs in processing/ (what a kill interrupted)."""
    found: Counter[str] = Counter()
    for record in (root / "processing").glob("*/job.json"):
        try:
            found[json.loads(record.read_text())["state"]] += 1
        except (OSError, ValueError, KeyError):
            found["unreadable"] += 1  # a job folder whose record was being replaced
    return found


def drain(procs: Procs, spool: Spool, timeout: float) -> dict[str, Any]:
    """``run --once``: everything in the inbox and in processing/ to a final state."""
    started = time.monotonic()
    proc = procs.start(daemon_cmd("run", "--config", str(spool.config), "--once"),
                       spool.root.parent / "drain.log")
    try:
        code: int | None = procs.wait(proc, timeout).code
    except TimeoutError:
        code = None
    return {"exit_code": code, "seconds": round(time.monotonic() - started, 2)}


# -- the checks ----------------------------------------------------------------------------


def check(root: Path, expected: dict[str, str], uploads: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures and problems from the spool and the upload log; no problems means it held."""
    done = _records(root / "done" / FILE_TYPE)
    failed = _records(root / "failed" / FILE_TYPE)
    by_source = Counter(record["source"] for record in done.values())
    by_sha = Counter(upload["sha256"] for upload in uploads)
    by_name = Counter(upload["file_name"] for upload in uploads)
    problems = [
        *(f"not in done/: {name}" for name in sorted(set(expected) - set(by_source))),
        *(f"in done/ {n} times: {name}" for name, n in sorted(by_source.items()) if n > 1),
        *(f"in done/ but never dropped: {name}" for name in sorted(set(by_source) - set(expected))),
        *(f"in failed/: {name} ({r.get('reason')}: {r.get('error')})"
          for name, r in sorted(failed.items())),
        *(f"uploaded {n} times: sha256 {sha}" for sha, n in sorted(by_sha.items()) if n > 1),
        *(f"uploaded {n} times: file_name {name}" for name, n in sorted(by_name.items()) if n > 1),
        *(f"never uploaded: {name}" for name, sha in sorted(expected.items()) if sha not in by_sha),
        *_record_problems(root, done, expected, uploads),
        *(f"left in processing/: {p.name}" for p in _entries(root / "processing")
          if p.name != ".owners"),
        *(f"left in an inbox: {p.parent.name}/{p.name}"
          for folder in _entries(root / "inbox") for p in _entries(folder)),
    ]
    return {
        "files": len(expected),
        "done": len(done),
        "failed": len(failed),
        "uploads": len(uploads),
        "duplicates_by_sha256": sum(n - 1 for n in by_sha.values() if n > 1),
        "duplicates_by_file_name": sum(n - 1 for n in by_name.values() if n > 1),
        "problems": problems,
    }


def _record_problems(root: Path, done: dict[str, dict[str, Any]], expected: dict[str, str],
                     uploads: list[dict[str, Any]]) -> Iterable[str]:
    ids_of: dict[str, set[int]] = {}
    for upload in uploads:
        ids_of.setdefault(upload["sha256"], set()).add(upload["id"])
    for stored, record in sorted(done.items()):
        sha = expected.get(record["source"])
        if sha is None:
            continue
        data = (root / "done" / FILE_TYPE / stored).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha or record.get("sha256") != sha:
            yield f"content differs from what was dropped: done/{FILE_TYPE}/{stored}"
        if record.get("id") not in ids_of.get(sha, set()):
            yield f"record id {record.get('id')} is no upload of its content: {stored}"


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    """Stored input name -> its record, for every ``<name>.json`` in ``folder``."""
    return {p.name[:-5]: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


_COUNTED = ("upload_answer_lost", "upload_adopted", "upload_not_found", "job_resumed",
            "job_taken_over", "api_retry", "file_finished")


def log_figures(paths: Iterable[Path]) -> dict[str, Any]:
    """Counts of the telling events in the daemons' JSON logs, every error-level event by
    name, and what is not JSON (a kill may cut a last line short; anything else, such as
    a traceback, is kept, a few lines of it, as evidence)."""
    events: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    other: list[str] = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
            try:
                event = json.loads(line)
            except ValueError:
                if not line.startswith("{"):  # not a JSON line cut short by a kill
                    other.append(line)
                continue
            if event.get("event") in _COUNTED:
                events[event["event"]] += 1
            if event.get("level") in ("error", "critical"):
                errors[event.get("event", "?")] += 1
    return {"events": dict(events), "errors": dict(errors),
            "tracebacks": sum(line.startswith("Traceback") for line in other),
            "other_lines": len(other), "other_excerpt": other[:40]}


# -- the run -------------------------------------------------------------------------------


def soak(ns: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(ns.seed)
    procs = Procs(workdir)
    faults = ("--lost-answer-rate", f"{ns.lost_answer_rate:g}",
              "--error-5xx-rate", f"{ns.error_5xx_rate:g}", "--seed", str(ns.seed))
    box = Sandbox(procs, workdir, TIMING, faults)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        box.start()
        spool = Spool(workdir / "spool", box, DAEMON)
        spool.write_config()
        staging = workdir / "staging"
        staging.mkdir()
        feeder = Feeder(spool.inbox(FILE_TYPE), staging, rng, ns.files_per_second)
        phase = kill_phase(procs, spool, feeder, rng, ns.kills, ns.max_minutes * 60)
        drained = drain(procs, spool, ns.drain_seconds)
        uploads, stats = box.uploads(), box.admin("stats")
        figures = check(spool.root, feeder.expected, uploads)
        logs = log_figures([workdir / "daemon.log", workdir / "drain.log"])
    finally:
        procs.close()
    if phase.unexpected_exits:
        figures["problems"].append(f"daemon exited by itself: codes {phase.unexpected_exits}")
    if logs["other_lines"]:
        figures["problems"].append(f"{logs['other_lines']} lines in the daemon logs are not "
                                   f"JSON log lines; the first: {logs['other_excerpt'][:20]}")
    if drained["exit_code"] != 0:
        figures["problems"].append(f"drain run --once ended with {drained['exit_code']}")
    fired = stats.get("faults", {})
    return {
        "seed": ns.seed,
        "kills": phase.kills,
        "kills_asked": ns.kills,
        "stopped_early": phase.stopped_early,
        **{k: v for k, v in figures.items() if k != "problems"},
        "lost_answers": fired.get("lost_answer", 0),
        "errors_5xx": fired.get("error_5xx", 0),
        "requests": stats.get("requests", {}),
        "states_at_kill": dict(phase.states_at_kill),
        "unexpected_exits": phase.unexpected_exits,
        "daemon_log": logs,
        "kill_phase_seconds": round(phase.seconds, 1),
        "drain": drained,
        "wall_seconds": round(time.monotonic() - started, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "problems": figures["problems"],
        "ok": not figures["problems"],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000, help="kill -9 this many times")
    parser.add_argument("--seed", type=int, default=1, help="kill moments, files, faults")
    parser.add_argument("--files-per-second", type=float, default=2.0,
                        help="new files renamed into the inbox during the kills")
    parser.add_argument("--lost-answer-rate", type=float, default=0.10)
    parser.add_argument("--error-5xx-rate", type=float, default=0.05)
    parser.add_argument("--max-minutes", type=float, default=60.0,
                        help="stop killing after this long (the drain and checks still run)")
    parser.add_argument("--drain-seconds", type=float, default=300.0,
                        help="the final run --once gets this long")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--tmp", help="parent of the work folder (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    return parser


def _print(result: dict[str, Any]) -> None:
    print(f"kills {result['kills']} (asked {result['kills_asked']}"
          f"{', stopped early' if result['stopped_early'] else ''}), "
          f"files {result['files']}, done {result['done']}, failed {result['failed']}")
    print(f"lost answers {result['lost_answers']}, 5xx {result['errors_5xx']}, "
          f"uploads {result['uploads']}, duplicates {result['duplicates_by_sha256']} by sha256 "
          f"/ {result['duplicates_by_file_name']} by file_name")
    print(f"wall {result['wall_seconds']} s (kills {result['kill_phase_seconds']} s, "
          f"drain {result['drain']['seconds']} s), load {result['load_before']} -> "
          f"{result['load_after']} on {result['cpus']} CPUs")
    print(f"states at kill: {result['states_at_kill']}")
    print(f"daemon log: {result['daemon_log']}")
    for problem in result["problems"][:50]:
        print(f"PROBLEM: {problem}")
    if result["workdir"]:
        print(f"work folder (logs, spool): {result['workdir']}")
    print("OK: every file done once, paid once" if result["ok"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ipqs-soak-", dir=ns.tmp))
    try:
        with interrupts_as_exceptions():
            result = soak(ns, workdir)
    except KeyboardInterrupt:
        print(f"\ninterrupted; work folder {workdir}", file=sys.stderr)
        return 130
    keep = ns.keep or not result["ok"]  # a failed soak keeps its logs and spool
    result["workdir"] = str(workdir) if keep else None
    _print(result)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(result, indent=2) + "\n")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
