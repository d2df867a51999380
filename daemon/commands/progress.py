"""How ``submit`` shows what it is doing: a tqdm bar on a terminal, plain lines elsewhere.

Both write to stderr, so stdout holds only the command's result.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol, TextIO

from daemon.commands.common import Console, human_bytes
from daemon.shown import shown


class Reporter(Protocol):
    def upload_started(self, name: str, size: int) -> None: ...

    def upload_progress(self, n_bytes: int) -> None:
        """Called from the thread that reads the file for the upload."""

    def upload_ended(self) -> None: ...

    def status(self, job_id: int | None, status: str | None) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def reporter_for(console: Console) -> Reporter:
    return BarReporter(console) if console.tty else PlainReporter(console)


class PlainReporter:
    """One line per event: for logs, pipes and CI. Statuses are printed when they change."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._last: str | None = None

    def upload_started(self, name: str, size: int) -> None:
        self.console.note(f"uploading {shown(name)} ({human_bytes(size)})")

    def upload_progress(self, n_bytes: int) -> None:
        pass

    def upload_ended(self) -> None:
        pass

    def status(self, job_id: int | None, status: str | None) -> None:
        if status != self._last:
            self._last = status
            self.console.note(f"job {job_id}: {shown(status or 'status unknown')}")

    def note(self, text: str) -> None:
        self.console.note(text)

    def close(self) -> None:
        pass


class BarReporter:
    """A byte progress bar for the upload, then a live status line while IPQS works."""

    def __init__(self, console: Console) -> None:
        # Imported here, not at the top: the daemon imports this package for its command
        # line, and tqdm (about 1 MiB resident) is only ever needed by a bar on a terminal.
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

        self._tqdm: Any = tqdm
        self.console = console
        self._bar: Any = None
        self._status: Any = None
        self._lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        return self.console.err

    def upload_started(self, name: str, size: int) -> None:
        self.upload_ended()
        self._bar = self._tqdm(total=size, desc=f"uploading {shown(name)}", unit="B",
                               unit_scale=True, unit_divisor=1024, file=self.stream,
                               leave=True, **self._width())

    def upload_progress(self, n_bytes: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n_bytes)

    def upload_ended(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _width(self) -> dict[str, Any]:
        # A terminal that reports no size (some ptys) would get a bar of width 0.
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return {"dynamic_ncols": True} if columns > 0 else {"ncols": 80, "nrows": 24}

    def status(self, job_id: int | None, status: str | None) -> None:
        text = f"job {job_id}: {shown(status or 'status unknown')}"
        if self._status is None:
            self._status = self._tqdm(total=None, desc=text, file=self.stream, leave=True,
                                bar_format="{desc} [{elapsed}]", **self._width())
        else:
            self._status.set_description_str(text)

    def note(self, text: str) -> None:
        self._tqdm.write(self.console.scrub(text), file=self.stream)

    def close(self) -> None:
        self.upload_ended()
        if self._status is not None:
            self._status.close()
            self._status = None
