"""Which writer check judges a file: a lease probe, the ``/proc`` pass, or the quiet window.

Pure bookkeeping, fed with what lease probes and ``/proc`` passes found. By
``watch.writer_check``:

* ``"lease"``: a lease probe, on every local file system where it works; elsewhere (no
  ``CAP_LEASE``, network and FUSE file systems) the quiet window.
* ``"auto"``: the same, but where leases do not work ``/proc`` while it shows every
  process, else the quiet window. Unreadable fds and a ``hidepid=invisible`` mount
  count as "not every process"; a separate PID namespace hides processes without any
  sign, so use "lease" (never ``/proc``) or "quiet" there.
* ``"proc"``: ``/proc``, trusted to show every writer.
* ``"quiet"``: the quiet window alone.

The choice is made per file system (``st_dev``), and each change is reported once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Probe(enum.Enum):
    """What one lease probe found (:mod:`daemon.watcher.lease`)."""

    FREE = "free"  # nobody on this kernel has the file open for writing
    WRITER = "writer"  # somebody has
    CHANGED = "changed"  # gone or replaced since the lstat: look again
    BLIND = "blind"  # this file cannot be opened (unreadable): judge it without a lease
    DENIED = "denied"  # EACCES/EPERM: not the owner and no CAP_LEASE (initial namespace)
    UNSUPPORTED = "unsupported"  # the file system has no (trustworthy) leases


class Check(enum.Enum):
    """How "nobody is writing" is established for a file."""

    LEASE = "lease"
    PROC = "proc"
    QUIET = "quiet"


@dataclass(frozen=True)
class Choice:
    """The check for the file system ``dev`` is now ``check`` (``reason``: why not a lease)."""

    dev: int
    check: Check
    reason: str | None


class WriterChecks:
    """The check per file system, and what made leases unusable where they are."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        #: Whether the last /proc pass could read every other process's fds.
        self.visible = mode == "proc"
        #: Why leases are not used at all; None while they may be.
        self.refused: str | None = None if mode in ("lease", "auto") else "not configured"
        self._no_lease: dict[int, str] = {}  # st_dev -> why leases do not work there
        self._told: dict[int, Check] = {}

    def fallback(self) -> Check:
        """The check where no lease can be taken."""
        if self.mode == "proc" or (self.mode == "auto" and self.visible):
            return Check.PROC
        return Check.QUIET

    def check(self, dev: int | None, blind: bool = False) -> Check:
        """The check for a file on ``dev`` (None: any file system leases work on);
        ``blind``: that file could not be opened for a probe."""
        if self.refused is None and dev not in self._no_lease and not blind:
            return Check.LEASE
        return self.fallback()

    def refuse(self, reason: str) -> bool:
        """Leases cannot be used anywhere (no CAP_LEASE...); True if that is news."""
        if self.refused is not None:
            return False
        self.refused = reason
        return True

    def learn(self, dev: int, probe: Probe) -> bool:
        """Take in a probe's answer; True when it made leases unusable everywhere."""
        if probe is Probe.DENIED:
            return self.refuse("a lease was refused (EACCES/EPERM): not the file's owner "
                               "and no CAP_LEASE in the initial user namespace")
        if probe is Probe.UNSUPPORTED:
            self._no_lease.setdefault(dev, "leases do not work on this file system")
        return False

    def changes(self, devs: set[int]) -> list[Choice]:
        """The file systems in ``devs`` whose check is not the one reported last."""
        found: list[Choice] = []
        if self.mode not in ("lease", "auto"):
            return found  # one check for every file system: said once at start
        for dev in sorted(devs):
            check = self.check(dev)
            if self._told.get(dev) is not check:
                self._told[dev] = check
                reason = None if check is Check.LEASE else self._no_lease.get(dev, self.refused)
                found.append(Choice(dev, check, reason))
        return found
