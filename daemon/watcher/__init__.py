"""Find files dropped into ``inbox/<type>/`` and hand them on once they are complete.

The watcher notices files three ways: a full scan at start, ``watchfiles`` events while
running, and a periodic rescan (events get lost on overflow, on network file systems and
across restarts). A noticed file is *pending* until it has *settled*: its size, mtime and
inode stayed the same for a window, and no process has it open for writing where that can
be seen. Only then is it offered as a :class:`Candidate` through :meth:`Watcher.take`; the
consumer gives it back with :meth:`Watcher.release`. Handing on a half-written file costs
the user money for every row sent, so every doubt makes the watcher wait longer, never
shorter.

Memory and work stay bounded however many files wait: at most :attr:`Watcher.max_pending`
paths are pending, dirty or in flight at once; the rest are left in the folder for a later
scan, which runs when the load drops to half of that bound. Symlinks are never followed and
nothing in the inbox is opened but a file an lstat just called regular, for a lease probe,
with ``O_NONBLOCK|O_NOFOLLOW`` (opening a fifo would hang).

The parts: :mod:`~daemon.watcher.settle` (the pure settle table),
:mod:`~daemon.watcher.scan` (scanning and looking), the writer checks
(:mod:`~daemon.watcher.checks` chooses per file system between
:mod:`~daemon.watcher.lease`, the kernel lease probe, and :mod:`~daemon.watcher.proc`,
the ``/proc`` pass; :mod:`~daemon.watcher.modes` says which) and
:mod:`~daemon.watcher.watcher` (the loops that drive them).
"""

from daemon.config import WatchConfig
from daemon.spool.layout import is_ignored
from daemon.watcher.settle import Candidate
from daemon.watcher.watcher import Watcher

#: The watcher is configured by the ``[watch]`` config section as it is.
WatchSettings = WatchConfig

__all__ = ["Candidate", "WatchSettings", "Watcher", "is_ignored"]
