"""Where the daemons on a spool listen: ``.daemon/<host>-<pid>-<token>.json``.

A daemon with a health listener publishes its address here once the listener is up
(``health.port = 0`` picks a free port that nobody else could know), and removes the file
when it exits cleanly. ``status`` reads these to find every daemon on the spool. A file
whose daemon is surely gone (this host and pid namespace, and its pid is dead) is stale:
readers skip it and the next daemon that starts removes it. A daemon on another host
cannot be judged from here; readers get it with ``local = False``.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.spool.fs import atomic_write
from daemon.spool.layout import Layout
from daemon.spool.leases import Owner, pid_alive
from daemon.spool.record import utcnow

SUFFIX = ".json"


@dataclass(frozen=True)
class Published:
    """One daemon's published address."""

    owner: str        # the lease owner's name (host identity, pid, token)
    host: str         # the host name, for people
    pid: int
    health_url: str   # http://HOST:PORT, where /healthz and /readyz answer
    started_at: str
    local: bool       # on this host (and pid namespace), so its pid was checked
    path: Path


def publish(layout: Layout, owner: Owner, health_url: str, file_mode: int) -> Path:
    """Write our address; returns the file, for :func:`withdraw`."""
    layout.daemons.mkdir(parents=True, exist_ok=True)
    path = layout.daemons / f"{owner.host}-{owner.pid}-{owner.token}{SUFFIX}"
    data = {"owner": owner.name, "host": socket.gethostname(), "host_id": owner.host,
            "pid": owner.pid, "health_url": health_url, "started_at": utcnow()}
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode(), file_mode)
    return path


def withdraw(path: Path) -> None:
    """Remove our address (a clean exit)."""
    path.unlink(missing_ok=True)


def published(layout: Layout, *, host_id: str) -> list[Published]:
    """The daemons on this spool that may be alive, oldest first; ``host_id`` is this
    host's identity (:attr:`Owner.host`)."""
    found = [p for p in (_read(path, host_id) for path in _files(layout.daemons))
             if p is not None]
    return sorted(found, key=lambda p: (p.started_at, p.pid))


def prune(layout: Layout, owner: Owner) -> None:
    """Remove the files of daemons on this host that are gone (left by a crash), among
    them an earlier life of our own pid (a container's daemon is always pid 1)."""
    for path in _files(layout.daemons):
        data = _load(path)
        if data is None or data.get("host_id") != owner.host:
            continue
        if not pid_alive(data["pid"]) or (data["pid"] == owner.pid
                                          and data.get("owner") != owner.name):
            path.unlink(missing_ok=True)


def _files(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries
                    if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) \
            or not isinstance(data.get("health_url"), str):
        return None
    return data


def _read(path: Path, host_id: str) -> Published | None:
    data = _load(path)
    if data is None:
        return None
    local = data.get("host_id") == host_id
    if local and not pid_alive(data["pid"]):
        return None  # stale: left by a daemon that did not exit cleanly
    return Published(owner=str(data.get("owner", "")), host=str(data.get("host", "")),
                     pid=data["pid"], health_url=data["health_url"],
                     started_at=str(data.get("started_at", "")), local=local, path=path)
