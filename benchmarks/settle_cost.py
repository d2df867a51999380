"""What a writer check adds to settling, per file: 1,000 files fall due in one round.

    .venv/bin/python benchmarks/settle_cost.py [--files 1000] [--rounds 5]

Prints, per file and round, the time of one settle look (``daemon.watcher.scan.observe``)
with no writer check (the lstat alone, as "quiet"), with the lease probe, and with the
/proc pass; the added cost is the difference to the first. Best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from daemon.watcher.checks import Probe
from daemon.watcher.lease import LeaseProbe
from daemon.watcher.scan import observe
from daemon.watcher.settle import Key, Observation


def best(rounds: int, look: Callable[[], Observation]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        look()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for n in range(args.files):
            path = Path(tmp) / f"f{n}.csv"
            path.write_bytes(b"someone@example.com\n" * 50)
            paths.append(path)
        keys: dict[Path, Key] = {p: (p.stat().st_dev, p.stat().st_ino) for p in paths}
        prober = LeaseProbe()
        answers = observe(paths, None, keys, prober).lease
        assert set(answers.values()) == {Probe.FREE}, set(answers.values())
        quiet = best(args.rounds, lambda: observe(paths, None))
        lease = best(args.rounds, lambda: observe(paths, None, keys, prober))
        proc = best(args.rounds, lambda: observe(paths, frozenset(keys.values())))
    per = 1e6 / args.files
    print(f"{args.files} files due in one round, best of {args.rounds}, per file:")
    print(f"  lstat only (quiet):  {quiet * per:7.1f} us")
    print(f"  lease probe:         {lease * per:7.1f} us  (+{(lease - quiet) * per:.1f} us)")
    print(f"  /proc pass:          {proc * per:7.1f} us  (+{(proc - quiet) * per:.1f} us)")


if __name__ == "__main__":
    main()
