"""Processes, the sandbox, daemon runs and what can be read about them from outside.

Everything the benchmarks start goes through :class:`Procs`: each process gets its own
process group, and :meth:`Procs.close` kills every group still alive, so Ctrl-C or a
failure half-way leaves nothing running. Only loopback addresses are used.

Clocks: the daemon logs ISO 8601 UTC timestamps and the sandbox stamps ``received_at``
the same way, both from this machine's wall clock, so the benchmarks time drops with
``time.time()`` too. Durations that stay inside this process use ``time.monotonic()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key-not-a-real-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def python() -> str:
    """The project's interpreter (the virtualenv's, else the one running this)."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def daemon_cmd(*args: str) -> list[str]:
    return [python(), "-m", "daemon", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso_ts(text: str) -> float:
    """An ISO 8601 timestamp (``Z`` or offset) as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def clean_env() -> dict[str, str]:
    """This environment without anything that would reconfigure the daemon."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IPQS_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- processes -----------------------------------------------------------------------------


@dataclass
class Exited:
    """How a child ended: its CPU time (from ``wait4``) and peak RSS (``VmHWM``)."""

    code: int
    wall: float
    cpu: float
    maxrss_kib: int


class Procs:
    """Every process the benchmarks start; each in its own process group."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd  # not the repository: ``python -m daemon`` must import the installed one
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started: dict[int, float] = {}

    def start(self, cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env or clean_env(),
                                    cwd=cwd or self.cwd, start_new_session=True)
        self._procs.append(proc)
        self._started[proc.pid] = time.monotonic()
        return proc

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> Exited:
        """Reap ``proc`` with ``wait4``; kill its group after ``timeout``.

        Peak RSS is the highest ``VmHWM`` read while waiting (every 20 ms, and VmHWM is
        itself a high-water mark). Not ``ru_maxrss``: Linux carries the forking parent's
        RSS over ``exec`` into it, so a child would seem as big as this harness.
        """
        deadline = time.monotonic() + timeout
        peak = 0
        while (reaped := _reap(proc)) is None:
            peak = max(peak, vm_kib(proc.pid))
            if time.monotonic() > deadline:
                self.kill(proc)
                raise TimeoutError(f"{proc.args!r} still running after {timeout:.0f} s")
            time.sleep(0.02)
        code, cpu = reaped
        proc.returncode = code
        self._procs.remove(proc)
        self._kill_group(proc.pid)  # anything it left behind in its group
        return Exited(code, time.monotonic() - self._started.pop(proc.pid), cpu, peak)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> Exited:
        """SIGTERM (the daemon's graceful stop), then wait; SIGKILL after ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        return self.wait(proc, timeout)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self._kill_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
        proc.returncode = proc.returncode if proc.returncode is not None else -9
        if proc in self._procs:
            self._procs.remove(proc)

    @staticmethod
    def _kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def close(self) -> None:
        """Kill every process group still alive; idempotent."""
        for proc in list(self._procs):
            self.kill(proc)


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, float] | None:
    """(exit code, CPU seconds of the child) once ``proc`` has ended, else None."""
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:  # already reaped by Popen.poll(): its rusage is gone
        return (proc.returncode if proc.returncode is not None else -1), 0.0
    if pid != proc.pid:
        return None
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict (empty once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def vm_kib(pid: int, name: str = "VmHWM") -> int:
    value = proc_status(pid).get(name, "0 kB").split()
    return int(value[0]) if value else 0


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (``/proc/.../schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def cpu_ticks_seconds(pid: int) -> float:
    """utime + stime from ``/proc/<pid>/stat`` (clock-tick resolution), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_switches(pid: int) -> dict[str, int]:
    """Context switches per thread, keyed ``<comm>/<tid>`` (``loop/<pid>``: the main thread)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = "loop" if task.name == str(pid) else (task / "comm").read_text().strip()
            found[f"{name}/{task.name}"] = sum(
                int(line.split()[-1]) for line in (task / "status").read_text().splitlines()
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return found


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               every: float = 0.05) -> float:
    """Poll ``predicate``; return the time.time() it first held. TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.time()


# -- the sandbox ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxTiming:
    latency_ms: float = 100.0
    new_seconds: float = 0.2
    processing_seconds: float = 0.5
    per_row_seconds: float = 0.0


@dataclass
class Sandbox:
    """``ipqs-bulkd sandbox`` as a subprocess on a free loopback port."""

    procs: Procs
    workdir: Path
    timing: SandboxTiming
    extra: Sequence[str] = ()
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.base + "/api"

    def start(self) -> Sandbox:
        self.port = free_port()
        spool = self.workdir / f"sandbox-{self.port}"
        t = self.timing
        cmd = daemon_cmd(
            "sandbox", "--port", str(self.port), "--spool-dir", str(spool),
            "--latency-ms", f"{t.latency_ms:g}", "--new-seconds", f"{t.new_seconds:g}",
            "--processing-seconds", f"{t.processing_seconds:g}",
            "--per-row-seconds", f"{t.per_row_seconds:g}", *self.extra)
        self.proc = self.procs.start(cmd, self.workdir / f"sandbox-{self.port}.log")
        wait_until(self._up, 20, "the sandbox to listen", every=0.05)
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the sandbox exited; see {self.workdir}/sandbox-*.log")
        try:
            self.admin("stats")
        except OSError:
            return False
        return True

    def admin(self, what: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/_sandbox/{what}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def uploads(self) -> list[dict[str, Any]]:
        return list(self.admin("uploads")["uploads"])

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


# -- the daemon ----------------------------------------------------------------------------


@dataclass
class Spool:
    """A spool root with its own config file for a daemon pointed at ``sandbox``."""

    root: Path
    sandbox: Sandbox
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root.with_name(self.root.name + ".toml")

    def write_config(self) -> Path:
        """Defaults, except the spool root, the sandbox's URL, a key and a free health port."""
        sections: dict[str, dict[str, Any]] = {
            "api": {"base_url": self.sandbox.api, "key": KEY},
            "spool": {"root": str(self.root)},
            "health": {"port": 0},
        }
        for name, values in self.overrides.items():
            sections.setdefault(name, {}).update(values)
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def inbox(self, file_type: str = "email") -> Path:
        path = self.root / "inbox" / file_type
        path.mkdir(parents=True, exist_ok=True)
        return path

    def count(self, outcome: str, file_type: str = "email") -> int:
        folder = self.root / outcome / file_type
        if not folder.exists():
            return 0
        return sum(1 for p in folder.iterdir() if p.name.endswith(".json"))


class Log:
    """The daemon's JSON log lines, read incrementally from its log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return self.events
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = self._partial + fh.read()
            self._offset = fh.tell()
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
        return self.events

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.refresh() if e.get("event") == event]

    def times(self, event: str) -> list[float]:
        return [iso_ts(e["timestamp"]) for e in self.named(event)]

    def first(self, event: str) -> dict[str, Any] | None:
        found = self.named(event)
        return found[0] if found else None


def start_daemon(procs: Procs, spool: Spool, *, once: bool, tag: str,
                 prefix: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], Log]:
    spool.write_config()
    log_path = spool.root.parent / f"{tag}.log"
    args = ["run", "--config", str(spool.config)] + (["--once"] if once else [])
    proc = procs.start([*prefix, *daemon_cmd(*args)], log_path)
    return proc, Log(log_path)


def wait_ready(proc: subprocess.Popen[bytes], log: Log, timeout: float = 30) -> float:
    """Wait for ``daemon_ready``; the wall-clock time it was logged."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited early; see {log.path}")
        return log.first("daemon_ready") is not None

    wait_until(ready, timeout, "daemon_ready")
    event = log.first("daemon_ready")
    assert event is not None
    return iso_ts(event["timestamp"])


# -- files ---------------------------------------------------------------------------------


def small_csv(n: int, rows: int = 10, tag: str = "") -> bytes:
    """A small, unique e-mail CSV (unique content: the daemon refuses duplicates)."""
    body = "".join(f"user{n}.{r}{tag}@example.com\n" for r in range(rows))
    return ("email\n" + body).encode()


def write_files(folder: Path, count: int, *, prefix: str = "f", rows: int = 10,
                tag: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"{prefix}{n:06d}.csv"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, small_csv(n, rows, tag))
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def big_csv(path: Path, size: int) -> Path:
    """``size`` bytes of e-mail rows (real text: a sparse file of NULs would be refused)."""
    line_block = "".join(f"someone.{n:08d}@example.com\n" for n in range(150_000)).encode()
    with path.open("wb") as fh:
        written = 0
        while written < size:
            chunk = line_block[: size - written]
            if len(chunk) < len(line_block):  # end on a whole line
                chunk = chunk[: chunk.rfind(b"\n") + 1] or b"x@example.com\n"
            fh.write(chunk)
            written += len(chunk)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p95 is a real sample)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so ``finally`` blocks clean up."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
