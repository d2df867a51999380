"""How often an idle daemon wakes up: context switches per thread over a window.

    .venv/bin/python benchmarks/idle.py [--seconds 60] [--set SECTION.KEY=VALUE ...]

Starts the sandbox and ``ipqs-bulkd run`` (the defaults of config.example.toml, health on
a free port, empty inboxes) as subprocesses, waits until the daemon is ready and has
settled, then reads every thread's voluntary and involuntary context switches
(``/proc/<pid>/task/*/status``) and CPU time before and after ``--seconds``. Prints
wake-ups per second per thread (by its name) and CPU milliseconds per minute.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (name, voluntary + involuntary context switches)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text().splitlines()
        except OSError:
            continue
        switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
        found[int(task.name)] = (name, switches)
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ipqs-idle-"))
    port = free_port()
    env = {**os.environ, "IPQS_API_KEY": "fake-key-for-idle-0000",
           "IPQS_BULKD_SPOOL_ROOT": str(work / "spool"), "IPQS_BULKD_HEALTH_PORT": "0",
           "IPQS_BULKD_API_BASE_URL": f"http://127.0.0.1:{port}/api",
           "IPQS_BULKD_CONFIG": str(work / "config.toml")}
    (work / "config.toml").write_text("")  # the defaults of config.example.toml
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        env[f"IPQS_BULKD_{section.upper()}_{name.upper()}"] = value
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 - open for both children's lives
    sandbox = subprocess.Popen([sys.executable, "-m", "daemon", "sandbox", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run"], env=env,
                              stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while b"daemon_ready" not in (work / "daemon.log").read_bytes():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((work / "daemon.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
        time.sleep(5)  # past start-up (first scan, first status report)
        before, cpu0 = threads(daemon.pid), cpu_seconds(daemon.pid)
        time.sleep(args.seconds)
        after, cpu1 = threads(daemon.pid), cpu_seconds(daemon.pid)
    finally:
        for proc in (daemon, sandbox):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()
    total = 0.0
    print(f"idle daemon, {args.seconds:.0f} s: wake-ups/s per thread")
    for tid, (name, switches) in sorted(after.items()):
        rate = (switches - before.get(tid, (name, 0))[1]) / args.seconds
        total += rate
        print(f"  {tid:>8} {name:<16} {rate:6.2f}")
    print(f"  total                     {total:6.2f}")
    print(f"CPU: {(cpu1 - cpu0) * 1000 * 60 / args.seconds:.0f} ms per minute")
    return 0


if __name__ == "__main__":
    sys.exit(main())
