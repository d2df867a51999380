"""Scenario (a) once more under py-spy, and a summary of where the time goes.

py-spy is not a project dependency: ``pip install py-spy`` (into the venv or anywhere on
PATH), or point ``$PY_SPY`` at the binary. Sampling at 200 Hz with ``--idle`` shows waiting
as well as running, per thread: the event loop's share of samples outside ``select`` is its
busy time; executor threads (``asyncio_N``) outside their queue wait are busy with disk work.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from harness import REPO
from scenarios import Bench, batch

_LOOP_IDLE = ("EpollSelector.select", "select (selectors.py")
_WRAPPERS = ("daemon/cli.py", "daemon/__main__.py")  # in every sample: they say nothing
_THREAD_IDLE = ("_worker (concurrent/futures/thread.py", "Condition.wait", "Event.wait")


def find_py_spy() -> str | None:
    candidates = [os.environ.get("PY_SPY"), str(REPO / ".venv/bin/py-spy"),
                  shutil.which("py-spy")]
    return next((c for c in candidates if c and Path(c).exists()), None)


def profile_batch(bench: Bench, files: int, outdir: Path) -> dict[str, Any]:
    spy = find_py_spy()
    if spy is None:
        return {"skipped": "py-spy not found (pip install py-spy, or set PY_SPY)"}
    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "profile-a.txt"
    prefix = [spy, "record", "--idle", "--threads", "--rate", "200", "--format", "raw",
              "--output", str(raw), "--"]
    run = batch(bench, "profile", files, prefix=prefix)
    return summarise(raw) | {"raw": str(raw), "files_per_s": run["files_per_s"]}


def summarise(raw: Path) -> dict[str, Any]:
    loop: Counter[str] = Counter()
    loop_leaf: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    totals = Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        thread = frames[0]
        if thread.endswith("MainThread"):
            _count_loop(frames, n, totals, loop, loop_leaf)
        elif "asyncio_" in thread:
            totals["threads"] += n
            if not frames[-1].startswith(_THREAD_IDLE):
                totals["threads_busy"] += n
                for frame in set(frames[1:]):
                    if "daemon/" in frame:
                        threads[frame] += n
    main, pool = max(totals["loop"], 1), max(totals["threads"], 1)
    busy_loop, busy_pool = max(totals["loop_busy"], 1), max(totals["threads_busy"], 1)
    # Shares of *busy* time; frames in nearly every busy sample (cli.main, asyncio's
    # run_forever...) say nothing and are left out.
    return {
        "loop_busy": round(totals["loop_busy"] / main, 3),
        "threads_busy": round(totals["threads_busy"] / pool, 3),
        "loop_top": _top(loop, busy_loop, skip_above=0.95),
        "loop_leaf_top": _top(loop_leaf, busy_loop),
        "threads_top": _top(threads, busy_pool, skip_above=0.95),
    }


def _count_loop(frames: list[str], n: int, totals: Counter[str], loop: Counter[str],
                leaf: Counter[str]) -> None:
    totals["loop"] += n
    if frames[-1].startswith(_LOOP_IDLE):
        return
    totals["loop_busy"] += n
    leaf[frames[-1]] += n
    for frame in set(frames[1:]):
        if "daemon/" in frame and not any(w in frame for w in _WRAPPERS):
            loop[frame] += n


def _top(counter: Counter[str], total: int, skip_above: float = 1.1,
         n: int = 15) -> list[tuple[str, float]]:
    shares = ((frame, count / total) for frame, count in counter.most_common())
    return [(frame, round(share, 4)) for frame, share in shares if share <= skip_above][:n]
