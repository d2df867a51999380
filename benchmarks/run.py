"""ipqs-bulkd benchmarks: one command, one run, a table and a JSON file.

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results/latest.json]

See benchmarks/README.md for what is measured, how, and the formula for the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import REPO, Procs, SandboxTiming, interrupts_as_exceptions
from profile_run import profile_batch
from scenarios import (
    DEFAULT_POLL_INITIAL,
    POLLER_SLOTS,
    Bench,
    batch,
    best_batch,
    big_file,
    bound,
    drop_latency,
    idle,
    sequential,
    shared_spool,
    startup,
    waiting,
)

GIB = 1024**3


@dataclass(frozen=True)
class Plan:
    """How big each scenario is; ``--quick`` shrinks everything but the 100k-file inbox."""

    files: int = 300
    sequential_files: int = 20
    drops: int = 50
    drop_gap: float = 0.2
    waiting_files: int = 100_000
    big_bytes: int = GIB
    idle_seconds: float = 60.0
    sweep: tuple[int, ...] = (8, 16)
    repeats: int = 2  # (a) and (e): the best of this many runs (the machine may be shared)


FULL = Plan()
QUICK = Plan(files=100, sequential_files=4, drops=20, waiting_files=100_000,
             big_bytes=GIB // 4, idle_seconds=10.0, sweep=(), repeats=1)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    plan = QUICK if ns.quick else FULL
    timing = SandboxTiming(latency_ms=ns.latency_ms)
    workdir = Path(tempfile.mkdtemp(prefix="ipqs-bench-", dir=ns.tmp))
    procs = Procs(workdir)
    bench = Bench(procs, workdir, timing, _settings(ns.set))
    results: dict[str, Any] = {"load_before": [round(x, 2) for x in os.getloadavg()]}
    started = time.monotonic()
    try:
        with interrupts_as_exceptions():
            _run_all(bench, plan, ns, results)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        procs.close()
        if not ns.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = _report(results, plan, timing, ns, time.monotonic() - started)
    _write(report, ns.out)
    _print_table(report)
    return 0


def _settings(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not (sep and dot and key):
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        out.setdefault(section, {})[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 2 minutes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/latest.json",
                        help="where to write the JSON figures")
    parser.add_argument("--latency-ms", type=float, default=100.0,
                        help="the sandbox's delay before answering each API request")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"run only these scenarios: {', '.join(STEPS)}")
    parser.add_argument("--poller-slots", default=POLLER_SLOTS, metavar="N|xK",
                        help="the daemon's poller concurrency, for the limit formula: N, or K "
                             "per upload slot (default: %(default)s, as daemon/service.py has it)")
    parser.add_argument("--profile", action="store_true",
                        help="also run (a) once more under py-spy and summarise where time goes")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config value for every daemon started (TOML value, e.g. "
                             "upload.concurrency=8 or watch.writer_check='\"proc\"')")
    parser.add_argument("--tmp", type=Path, help="parent of the work folder (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return parser


def _run_all(bench: Bench, plan: Plan, ns: argparse.Namespace, results: dict[str, Any]) -> None:
    only = set(ns.only or STEPS)
    unknown = only - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    for name, step in STEPS.items():
        if name in only:
            t0 = time.monotonic()
            print(f"- {name} ...", end="", file=sys.stderr, flush=True)
            result = step(bench, plan)
            if result is not None:
                results[name] = result
            print(f" {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    if ns.profile:
        print("- profile (a) under py-spy ...", file=sys.stderr, flush=True)
        results["profile"] = profile_batch(bench, plan.files, ns.out.parent)


Step = Callable[[Bench, Plan], dict[str, Any] | None]


def _sweep(concurrency: int) -> Step:
    def run(bench: Bench, plan: Plan) -> dict[str, Any] | None:
        if concurrency not in plan.sweep:
            return None
        overrides = {"upload": {"concurrency": concurrency}}
        return batch(bench, f"sweep-c{concurrency}", plan.files, overrides)

    return run


STEPS: dict[str, Step] = {
    "baseline": lambda b, p: startup(b),
    "a_flood": lambda b, p: best_batch(b, "a-flood", p.files, p.repeats),
    **{f"sweep_c{c}": _sweep(c) for c in FULL.sweep},
    "b_sequential": lambda b, p: sequential(b, p.sequential_files),
    "c_drop": lambda b, p: drop_latency(b, "c-drop", p.drops, p.drop_gap),
    "d_waiting": lambda b, p: waiting(b, p.waiting_files),
    "e_big": lambda b, p: big_file(b, p.big_bytes, p.repeats),
    "f_idle": lambda b, p: idle(b, p.idle_seconds),
    "shared_2": lambda b, p: shared_spool(b, p.files, 2),
}


# -- the report ----------------------------------------------------------------------------


def _report(results: dict[str, Any], plan: Plan, timing: SandboxTiming, ns: argparse.Namespace,
            seconds: float) -> dict[str, Any]:
    latency = timing.latency_ms / 1000
    derived = _derived(results, latency, ns.poller_slots)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "load_before": results.pop("load_before"),
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "mode": "quick" if ns.quick else "full", "seconds": round(seconds, 1),
        "plan": asdict(plan), "sandbox": asdict(timing), "config_set": _settings(ns.set),
        "poll_initial_seconds": DEFAULT_POLL_INITIAL,
        "results": results, "derived": derived, "targets": _targets(results, derived),
    }


def _derived(results: dict[str, Any], latency: float, slots: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = results.get("baseline")
    for name in ("a_flood", *(k for k in results if k.startswith("sweep_"))):
        if base and name in results:
            out[f"bound_{name}"] = bound(base, results[name], latency, slots)
    seq = results.get("b_sequential")
    for name in ("a_flood",):
        if seq and name in results:
            out[f"ratio_{name}_vs_sequential"] = round(
                results[name]["files_per_s"] / seq["files_per_s"], 1)
    if base:
        for name in ("a_flood",):
            run = results.get(name)
            if run:
                out[f"cpu_per_1000_{name}"] = {
                    "total_s": round(run["cpu_s"] / run["files"] * 1000, 2),
                    "marginal_s": round((run["cpu_s"] - base["cpu_s"]) / run["files"] * 1000, 2),
                }
    one, two = results.get("a_flood"), results.get("shared_2")
    if one and two and one["files"] == two["files"]:
        out["shared_2_vs_1"] = round(two["files_per_s"] / one["files_per_s"], 2)
    return out


def _targets(results: dict[str, Any], derived: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def check(name: str, value: Any, target: str, ok: bool) -> None:
        rows.append({"target": name, "measured": value, "goal": target, "met": ok})

    for mode in ("a_flood",):
        ratio = derived.get(f"ratio_{mode}_vs_sequential")
        if ratio is not None:
            check(f"throughput vs sequential ({mode})", f"{ratio}x", ">= 5x", ratio >= 5)
        limit = derived.get(f"bound_{mode}")
        if limit:
            check(f"throughput vs limit ({mode})", f"{limit['of_limit']:.0%}", ">= 80%",
                  limit["of_limit"] >= 0.8)
    for mode in ("c_drop",):
        lat = results.get(mode)
        if lat:
            up = lat["upload_received"]
            check(f"drop->upload p50 ({mode})", f"{up['p50_ms']} ms", "<= 500 ms",
                  up["p50_ms"] <= 500)
            check(f"drop->upload p95 ({mode})", f"{up['p95_ms']} ms", "<= 1500 ms",
                  up["p95_ms"] <= 1500)
    _resource_targets(results, check)
    return rows


def _resource_targets(results: dict[str, Any], check: Callable[[str, Any, str, bool], None]
                      ) -> None:
    wait = results.get("d_waiting")
    if wait:
        check(f"peak RSS, {wait['files']} files waiting", f"{wait['peak_rss_mib']} MiB",
              "<= 150 MiB", wait["peak_rss_mib"] <= 150)
    big = results.get("e_big")
    if big:
        size = f"{big['bytes'] / GIB:g} GiB"
        check(f"peak RSS, {size} upload", f"{big['daemon']['peak_rss_mib']} MiB", "<= 45 MiB",
              big["daemon"]["peak_rss_mib"] <= 45)
        check(f"{size} upload time vs curl (rename->answer)",
              f"{big['drop_to_answer_vs_curl']}x", "<= 1.2x",
              big["drop_to_answer_vs_curl"] <= 1.2)
    quiet = results.get("f_idle")
    if quiet:
        # "No measurable CPU": under one 10 ms clock tick per minute, i.e. what top and ps
        # show as 0.0 %.
        per_min = quiet["cpu_s"] / quiet["seconds"] * 60
        check("idle CPU", f"{per_min * 1000:.0f} ms/min, {quiet['wakeups_per_s']} wakeups/s",
              "< 10 ms/min", per_min < 0.010)


def _write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def _print_table(report: dict[str, Any]) -> None:
    from table import render

    print(render(report))


if __name__ == "__main__":
    sys.exit(main())
