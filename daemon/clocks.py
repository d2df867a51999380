"""What this host's clocks can be trusted with.

Wall time (``time.time()``) can be wrong, and can jump when NTP or a person sets it; two
hosts' wall clocks disagree. The boot-time clock (``CLOCK_BOOTTIME``: monotonic, and it
counts suspend too) never jumps, but means something only on this host, during this boot.
So:

- an age measured here, within one boot, uses the boot-time clock (:func:`stamp` and
  :func:`age`);
- an age across boots or hosts falls back on wall time, read conservatively;
- whether NTP has synchronised the wall clock is the kernel's to say (:func:`wall_clock_synced`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: Set by the systemd unit (``%b``) for when /proc hides :data:`BOOT_ID`.
BOOT_ID_ENV = "IPQS_BOOT_ID"

#: What ``status`` and readiness say about an unsynchronised wall clock.
UNSYNCED = ("the wall clock is not synchronised (adjtimex: TIME_ERROR/STA_UNSYNC): record "
            "times, poll deadlines and duplicate windows across reboots may be off")

# adjtimex(2): the clock state TIME_ERROR, and the status bit "not synchronised".
TIME_ERROR = 5
STA_UNSYNC = 0x0040


def boot_id() -> str | None:
    """This boot's random id; None where it cannot be known.

    Where /proc hides it (systemd's ``ProcSubset=pid``), the unit passes the same id in
    ``$IPQS_BOOT_ID`` (``Environment=IPQS_BOOT_ID=%b``).
    """
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return _dashed(os.environ.get(BOOT_ID_ENV, ""))


def _dashed(uuid: str) -> str | None:
    """systemd's ``%b`` is 32 hex digits; /proc's boot_id has the dashes of a UUID."""
    plain = uuid.strip().replace("-", "").lower()
    if len(plain) != 32 or any(c not in "0123456789abcdef" for c in plain):
        return None
    return f"{plain[:8]}-{plain[8:12]}-{plain[12:16]}-{plain[16:20]}-{plain[20:]}"


def boottime() -> float:
    """Seconds since boot, suspend included; never steps with the wall clock."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return time.monotonic()


def stamp() -> dict[str, Any]:
    """Now, as fields to store in a file that another process will judge the age of."""
    return {"created": time.time(), "boot_id": boot_id(), "boottime": boottime()}


def age(fields: dict[str, Any], *, mtime: float | None = None) -> float:
    """How long ago :func:`stamp` made ``fields``.

    Made during this boot (same boot id): the boot-time difference, whatever the wall
    clock did meanwhile. Otherwise only wall clocks can say, and the writer's may have
    been wrong: the younger of the two readings (the stamp's own wall time, and the
    file's ``mtime``, which a file server may set from its own clock) is taken, so that
    a clock error keeps a marker for longer rather than dropping it early. Never negative.
    """
    here = boot_id()
    then = fields.get("boottime")
    if here is not None and fields.get("boot_id") == here and isinstance(then, int | float):
        return max(boottime() - float(then), 0.0)
    now = time.time()
    # A stamp from before boot ids were recorded is read by its own wall time alone, as it
    # always was.
    readings = [now - mtime] if mtime is not None and "boot_id" in fields else []
    with contextlib.suppress(KeyError, TypeError, ValueError):
        readings.append(now - float(fields["created"]))
    return max(min(readings), 0.0) if readings else float("inf")


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: only the head is read; the tail is padding.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long),
                ("freq", ctypes.c_long), ("maxerror", ctypes.c_long),
                ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("_rest", ctypes.c_byte * 256)]


def wall_clock_synced() -> bool | None:
    """Has NTP (or chrony, or timesyncd) synchronised the wall clock? None: cannot tell."""
    answer = adjtimex_state()
    return None if answer is None else synced_from(*answer)


def adjtimex_state() -> tuple[int, int] | None:
    """The kernel's clock state and status bits, from ``adjtimex`` in read-only mode
    (``modes = 0``, allowed unprivileged); None where there is no such call."""
    try:
        # The C library this process already runs on: find_library() would start ldconfig.
        adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    buf = _Timex()
    state = int(adjtimex(ctypes.byref(buf)))
    return state, int(buf.status)


def synced_from(state: int, status: int) -> bool | None:
    """Read adjtimex's answer: -1 is an error; TIME_ERROR or STA_UNSYNC mean unsynchronised."""
    if state < 0:
        return None
    return state != TIME_ERROR and not status & STA_UNSYNC
