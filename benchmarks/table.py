"""The printed table: every figure of a report, then the targets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Row = tuple[str, str]


def render(report: dict[str, Any]) -> str:
    r, d = report["results"], report["derived"]
    sb = report["sandbox"]
    lines = [
        f"ipqs-bulkd benchmark ({report['mode']}, {report['seconds']:.0f} s, "
        f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}, load "
        f"{report['machine']['load_before'][0]:g} -> {report['machine']['load_after'][0]:g})",
        f"sandbox: {sb['latency_ms']:g} ms per request; jobs NEW {sb['new_seconds']:g} s then "
        f"PROCESSING {sb['processing_seconds']:g} s (+{sb['per_row_seconds']:g} s/row); "
        f"status polls start {report['poll_initial_seconds']:g} s after upload",
        "",
    ]
    rows = [*_throughput(r, d), *_latency(r), *_resources(r, d), *_big(r), *_shared(r, d),
            *_profile(r)]
    width = max(len(name) for name, _ in rows) if rows else 10
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", "targets:"]
    for t in report["targets"]:
        mark = "met" if t["met"] else "NOT MET"
        lines.append(f"  [{mark:>7}] {t['target']}: {t['measured']} (goal {t['goal']})")
    return "\n".join(lines)


def _batch_row(name: str, run: dict[str, Any]) -> Row:
    return (name, f"{run['files_per_s']:.1f} files/s ({run['files']} files in "
                  f"{run['wall_s']:.1f} s; uploads {run['upload_rate_per_s']:.1f}/s; "
                  f"settle window {run['settle_window_s']:g} s [{run['writer_check']}]; "
                  f"exit {run['exit_code']}, {run['done']} done, {run['failed']} failed)")


def _throughput(r: dict[str, Any], d: dict[str, Any]) -> Iterator[Row]:
    if "baseline" in r:
        b = r["baseline"]
        yield ("start-up, empty run --once", f"{b['wall_s']:.2f} s (median of "
                                             f"{b.get('wall_s_all', [])}), {b['cpu_s']:.2f} s "
                                             f"CPU, {b['peak_rss_mib']} MiB")
    for key, label in (("a_flood", "(a) run --once"),):
        if key in r:
            yield _batch_row(label, r[key])
            if len(r[key].get("runs_files_per_s", [])) > 1:
                yield ("    runs (best shown)", f"{r[key]['runs_files_per_s']} files/s")
            per_file = {op: round(n / r[key]["files"], 2) for op, n in r[key]["requests"].items()}
            yield ("    API requests per file", str(per_file))
            lim = d.get(f"bound_{key}")
            if lim:
                yield ("    limit (C/L formula)",
                       f"{lim['limit_files_per_s']:.1f} files/s (T_min {lim['t_min_s']:.1f} s, "
                       f"C={lim['concurrency']}); measured = {lim['of_limit']:.0%} of it; "
                       f"steady uploads {lim['steady_of_limit']:.0%} of "
                       f"{lim['steady_limit_per_s']:g}/s")
    for key in sorted(k for k in r if k.startswith("sweep_")):
        conc = key.removeprefix("sweep_c")
        yield _batch_row(f"    upload.concurrency = {conc}", r[key])
        lim = d.get(f"bound_{key}")
        if lim:
            yield ("      limit", f"{lim['limit_files_per_s']:.1f} files/s; measured = "
                                  f"{lim['of_limit']:.0%}")
    if "b_sequential" in r:
        s = r["b_sequential"]
        yield ("(b) sequential curl script",
               f"{s['files_per_s']:.3f} files/s ({s['per_file_s']:.2f} s per file over "
               f"{s['files']} files, poll every {s['poll_seconds']:g} s)")
        ratio = d.get("ratio_a_flood_vs_sequential")
        if ratio is not None:
            yield ("    ratio (a) / (b)", f"{ratio}x")


def _latency(r: dict[str, Any]) -> Iterator[Row]:
    for key in ("c_drop",):
        c = r.get(key)
        if not c:
            continue
        yield ("(c) drop latency, idle daemon",
               f"{c['files']} files {c['gap_s']:g} s apart, window {c['settle_window_s']:g} s "
               f"[{c['writer_check']}]")
        for stage in ("settled", "upload_received", "submitted"):
            s = c[stage]
            yield (f"    rename -> {stage}", f"p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, "
                                            f"max {s['max_ms']} ms (n={s['n']})")


def _resources(r: dict[str, Any], d: dict[str, Any]) -> Iterator[Row]:
    for key in ("a_flood",):
        if key in r and f"cpu_per_1000_{key}" in d:
            cpu = d[f"cpu_per_1000_{key}"]
            yield ("(d) per 1000 files, from (a)",
                   f"{cpu['total_s']} s CPU ({cpu['marginal_s']} s beyond start-up); "
                   f"peak RSS {r[key]['peak_rss_mib']} MiB")
    w = r.get("d_waiting")
    if w:
        yield ("(d) files waiting in one inbox",
               f"{w['files']}: peak RSS {w['peak_rss_mib']} MiB (now {w['rss_mib']} MiB); "
               f"queue full after {w['queue_full_after_s']} s; {w['still_in_inbox']} left "
               f"in the inbox; IPQS in outage")
    f = r.get("f_idle")
    if f:
        yield ("(f) idle daemon", f"{f['cpu_s'] * 1000:.1f} ms CPU in {f['seconds']:g} s "
                                  f"({f['cpu_s_per_hour']} s/hour), {f['wakeups_per_s']} "
                                  f"wakeups/s; RSS {f.get('rss_mib')} MiB")


def _big(r: dict[str, Any]) -> Iterator[Row]:
    e = r.get("e_big")
    if not e:
        return
    c, dm = e["curl"], e["daemon"]
    size = f"{e['bytes'] / 1024**3:g} GiB"
    yield (f"(e) {size}: curl -F", f"{c['wall_s']:.2f} s, curl RSS {c['peak_rss_mib']} MiB")
    yield ("    daemon rename->answer", f"{dm['drop_to_answer_s']:.2f} s "
                                        f"({e['drop_to_answer_vs_curl']}x curl); claim->answer "
                                        f"{dm['claim_to_answer_s']:.2f} s "
                                        f"({e['claim_to_answer_vs_curl']}x curl)")
    if len(e.get("curl_runs_s", [])) > 1:
        yield ("    runs (best shown)", f"curl {e['curl_runs_s']} s; daemon rename->answer "
                                        f"{e['daemon_drop_to_answer_runs_s']} s")
    yield ("    daemon peak RSS, CPU", f"{dm['peak_rss_mib']} MiB, {dm['cpu_s']:.2f} s")
    yield ("    sandbox (curl run)", f"peak RSS {c['sandbox']['peak_rss_mib']} MiB, "
                                     f"{c['sandbox']['cpu_s']:.2f} s CPU for {c['wall_s']:.2f} s")
    yield ("    sandbox (daemon run)", f"peak RSS {dm['sandbox']['peak_rss_mib']} MiB, "
                                       f"{dm['sandbox']['cpu_s']:.2f} s CPU")


def _shared(r: dict[str, Any], d: dict[str, Any]) -> Iterator[Row]:
    s = r.get("shared_2")
    if not s:
        return
    yield ("(3) two daemons, one spool",
           f"{s['files_per_s']:.1f} files/s ({s['files']} files in {s['wall_s']:.1f} s; "
           f"{d.get('shared_2_vs_1', '?')}x one daemon); uploads {s['uploads']} "
           f"({s['distinct_uploads']} distinct), split {s['uploads_per_daemon']}, "
           f"{s['done']} done, {s['failed']} failed, exit codes {s['exit_codes']}")


def _profile(r: dict[str, Any]) -> Iterator[Row]:
    p = r.get("profile")
    if not p:
        return
    if "skipped" in p:
        yield ("profile", p["skipped"])
        return
    yield ("profile (a) under py-spy", f"event loop busy {p['loop_busy']:.0%} of the time, "
                                       f"executor threads {p['threads_busy']:.0%}; shares "
                                       f"below are of busy time; raw: {p['raw']}")
    for frame, share in p["loop_top"][:8]:
        yield ("    loop", f"{share:5.1%}  {frame}")
    for frame, share in p["loop_leaf_top"][:4]:
        yield ("    loop, leaf", f"{share:5.1%}  {frame}")
    for frame, share in p["threads_top"][:6]:
        yield ("    threads", f"{share:5.1%}  {frame}")
