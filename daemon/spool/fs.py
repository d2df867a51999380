"""File-system primitives of the spool: writes that are all or nothing, placement that never
replaces a name, fsync of files and folders, and reading only regular files.

Every write is atomic (temporary file, fsync, rename or link, fsync of the folder), and a
file is placed with ``link()``, which refuses to replace an existing name, so nothing is
ever overwritten, even by another daemon on the same spool.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO

from daemon.inputs import FileFacts, Inspection

_HASH_CHUNK = 1024 * 1024

# Room for what a placed name gets: a clash's ".<job id>-<4 hex>" (see Spool._free_name)
# and the longest suffix, ".pristine.csv".
_NAME_MAX = 255 - len(".20261130T101500-1a2b3c4d-1a2b") - len(".pristine.csv")


class NotRegularFileError(OSError):
    """A path that should be a plain file is a fifo, socket, device or folder."""


class SymlinkedFolderError(OSError):
    """A folder of the spool is a symbolic link: refused, never followed."""


class UnreadableFileError(PermissionError):
    """A file the daemon may not read (its mode or ACL): it waits where it is."""

    def __init__(self, path: Path, st: os.stat_result | None) -> None:
        super().__init__(errno.EACCES, "the daemon's user may not read this file", str(path))
        self.mode = None if st is None else stat.S_IMODE(st.st_mode)
        self.owner = None if st is None else st.st_uid


def inspect_file(path: Path) -> FileFacts:
    """sha256, size and billed rows (non-blank lines, see :class:`RowCounter`) of ``path``
    in one streamed pass, and what makes it certainly unacceptable to IPQS as CSV
    (``problem`` is None when nothing does); see :class:`Inspection`."""
    inspection = Inspection()
    with open_regular(path) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            inspection.feed(chunk)
    return inspection.facts()


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file, never through a symlink.

    ``O_NOFOLLOW`` refuses a symlink swapped in at the last moment; ``O_NONBLOCK`` keeps a
    fifo from hanging the open, and the ``fstat`` then turns it (or a device) away.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def own_copy(path: Path, *, tries: int = 3) -> bool:
    """Give ``path`` an inode of its own: copy it beside itself, check that the original
    still has the bytes copied (its sha256 again), and put the copy in its place.

    For a claimed file with other hard links: a writer outside the spool could change it
    after its upload, and done/ must hold the bytes billed. False when the original kept
    changing during ``tries`` copies (the link is then left as it was).
    """
    for _ in range(tries):
        tmp = path.with_name(f".{path.name}.own-{secrets.token_hex(4)}")
        try:
            copied = _copy_hashing(path, tmp)
            if _sha256_of(path) == copied:
                os.replace(tmp, path)
                fsync_dir(path.parent)
                return True
        finally:
            tmp.unlink(missing_ok=True)
    return False


def _copy_hashing(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(src) as fin:
        mode = stat.S_IMODE(os.fstat(fin.fileno()).st_mode)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(_HASH_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fchmod(fout.fileno(), mode)  # as the producer left it, like any other input
            os.fsync(fout.fileno())
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_folder(path: Path, *, below: Path) -> int:
    """An fd of the folder ``path``, opened component by component from ``below`` (which
    is followed: the operator chose it) with ``O_NOFOLLOW``: a component that is a symlink
    raises :class:`SymlinkedFolderError` naming it. The caller closes the fd.

    Working relative to this fd (``scandir``, ``rename`` with ``src_dir_fd``) then never
    strays outside the spool, even if a folder is swapped for a link meanwhile.
    """
    parts = path.relative_to(below).parts
    fd = os.open(below, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for n, part in enumerate(parts):
            try:
                child = os.open(part, _FOLDER_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise SymlinkedFolderError(
                        errno.ELOOP, "a symbolic link, not a folder: refused, never followed",
                        str(below.joinpath(*parts[: n + 1]))) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_readable(name: str, dir_fd: int, path: Path) -> bool:
    """Can the daemon open ``name`` (in the folder ``dir_fd``) for reading? Raises
    :class:`UnreadableFileError` when its mode or ACL forbids it; False when it is gone.

    Only a permission refusal counts: anything else (a symlink or fifo swapped in) is left
    to the claim's own checks. Opened with ``O_NONBLOCK`` (a fifo cannot hang it) and
    closed at once; nothing is read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        os.close(os.open(name, flags, dir_fd=dir_fd))
    except FileNotFoundError:
        return False
    except PermissionError:
        try:
            st: os.stat_result | None = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            st = None
        raise UnreadableFileError(path, st) from None
    except OSError:
        pass
    return True


def readable(path: Path) -> bool | None:
    """Could ``path`` be opened for reading now? None when it is gone. Nothing is read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags))
    except FileNotFoundError:
        return None
    except PermissionError:
        return False
    except OSError:
        return True  # not a permission matter: the claim's own checks decide
    return True


def fit_name(name: str) -> str:
    """``name`` shortened (in bytes, keeping the end of its extensions) so that every file
    placed beside it still has a legal name."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_MAX:
        return name
    stem, dot, ext = raw.partition(b".")
    tail = (dot + ext)[-(_NAME_MAX // 2):] if dot else b""
    return os.fsdecode(stem[: _NAME_MAX - len(tail)] or b"file") + os.fsdecode(tail)


def place_no_clobber(src: Path, folder: Path, name: str, *, tries: int = 10000) -> Path:
    """Move ``src`` into ``folder`` as ``name``, or ``stem-1.ext``, ``stem-2.ext``... (the
    suffix goes before the first dot, as in done/), whichever is free. Never replaces a
    file: placement is by ``link()``, so it holds against other writers too. Returns the
    new path."""
    if not os.path.lexists(src):
        raise FileNotFoundError(errno.ENOENT, "no such file", str(src))
    stem, dot, ext = name.partition(".")
    for n in range(tries):
        dst = folder / (name if n == 0 else f"{stem}-{n}{dot}{ext}")
        if not os.path.lexists(dst) and link_no_clobber(src, dst):
            fsync_dir(folder)
            return dst
    raise OSError(errno.EEXIST, f"no free name for {name} in {folder}")


def make_dir_like(path: Path, models: list[Path], *, default_mode: int | None = None) -> int | None:
    """Create the folder ``path`` with the mode (setgid included) and group of the first
    existing folder of ``models``; returns the mode given, or None if it existed already.
    With no model left, ``default_mode`` (if given) and the parent's group, else the
    parent's mode too.

    ``mkdir`` alone would give the daemon's umask and primary group, which may lock out the
    people who read the folder.
    """
    model = next((m for m in models if m.is_dir() and not m.is_symlink()), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return None
    st = (model or path.parent).stat()
    if st.st_gid != os.stat(path).st_gid:
        with contextlib.suppress(PermissionError):  # not a member: the mode still holds
            os.chown(path, -1, st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if model is None and default_mode is not None:
        mode = default_mode
    os.chmod(path, mode)  # after chown, which may clear setgid
    fsync_dir(path.parent)
    return mode


def link_no_clobber(src: Path, dst: Path) -> bool:
    """Give ``src`` the name ``dst`` unless that name exists; True if ``dst`` is ``src``.

    ``link()`` fails instead of replacing, which is what makes "never overwrite" hold
    between daemons. Filesystems without hard links fall back to a checked rename.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        return _same_file(src, dst)
    except FileNotFoundError:
        # Placed by an earlier, interrupted attempt: the source is already gone.
        return dst.exists()
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
        return True
    src.unlink()
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return not a.exists() and b.exists()


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``; on return the new content survives a crash."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def exclusive_write(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` unless it exists. All or nothing: written to a temporary
    file first, then linked into place, so nobody ever reads a half-written file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(tmp, data, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            if _lost_race(exc, path):
                return False
            # No hard links here: O_EXCL create still gives exclusivity, minus atomicity.
            return _exclusive_create(path, data, mode)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _exclusive_create(path: Path, data: bytes, mode: int) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    except PermissionError as exc:
        if _lost_race(exc, path):
            return False
        raise
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # exactly spool.file_mode: O_CREAT's is cut by the umask
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _lost_race(exc: OSError, path: Path) -> bool:
    """An EPERM that means "exists": SSHFS answers the loser of a race of two exclusive
    creates (link or O_EXCL, through two mounts) with EPERM instead of EEXIST. Only when
    the name really exists now; a true permission problem still raises."""
    return exc.errno == errno.EPERM and os.path.lexists(path)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # exactly spool.file_mode: O_CREAT's is cut by the umask
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries durable; quietly nothing where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (SMB, some FUSE) refuse fsync on folders
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
