"""The one crash-safe writer, shared by every room: write under a temporary name in the same
folder, flush, fsync, rename into place, fsync the folder. A reader sees the old file or the
new one, never half of one; a failure leaves no temporary file behind, and a writer killed
mid-write leaves at most one that nobody reads and :func:`remove_stale_temps` deletes.

* :func:`write_bytes_atomic` / :func:`atomic_writer`: one file, replaced or (``exclusive``)
  created only if absent;
* :class:`AtomicFile`: a file streamed over time whose final name is chosen at commit (the
  store's shards);
* :func:`atomic_directory`: a folder of files that appears (or replaces another) at once.

Temporary names are ``.tmp-<host>-<pid>-<random>[suffix]``: dot-prefixed, so listings that
skip dot files never see them, and naming their writer, so a leftover whose writer is gone can
be told from one still being written. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import IO, Iterator

__all__ = [
    "TEMP_PREFIX",
    "AtomicFile",
    "atomic_directory",
    "atomic_writer",
    "fsync_dir",
    "is_stale_temp",
    "remove_stale_temps",
    "temp_path",
    "write_bytes_atomic",
]

TEMP_PREFIX = ".tmp-"
#: A temporary file older than this is stale even if its writer's pid looks alive
#: (pids get reused; a day is far longer than any single write).
STALE_TEMP_AGE_S = 24 * 3600

_HOST = socket.gethostname().replace("-", "_").replace(".", "_")[:32] or "host"


def temp_path(directory: str | os.PathLike[str], suffix: str = "") -> Path:
    """A unique dot-prefixed temporary name in ``directory`` that records host and pid."""
    return Path(directory) / f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A new file written under a temporary name in ``directory``; :meth:`commit` makes it
    durable and renames it to its final name, :meth:`abort` removes it.

    ``file`` is the open file object (``mode`` ``"wb"`` or ``"w"``, plus ``open`` keywords).

    >>> f = AtomicFile(folder, suffix=".arrow")                     # doctest: +SKIP
    >>> f.file.write(data); f.commit(folder / "0001.arrow")         # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike[str], mode: str = "wb", *, suffix: str = "", **open_kw) -> None:
        if "w" not in mode:
            raise ValueError(f"mode must write a new file ('wb' or 'w'); got mode={mode!r}")
        self.tmp = temp_path(directory, suffix)
        # exclusive create: never write into a file someone else holds
        self.file: IO = open(self.tmp, mode.replace("w", "x"), **open_kw)

    def commit(self, path: str | os.PathLike[str], *, exclusive: bool = False) -> Path:
        """Flush, fsync and rename to ``path`` (same file system); returns ``path``.

        exclusive : only create ``path``: raise FileExistsError if it exists (``os.link``
            fails on an existing name, so of two racing writers exactly one wins).
        """
        path = Path(path)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if exclusive:
                os.link(self.tmp, path)
                os.unlink(self.tmp)
            else:
                os.replace(self.tmp, path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(path.parent)
        return path

    def abort(self) -> None:
        """Close and remove the temporary file (nothing is renamed)."""
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - already failing; the file is removed below
            pass
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb", *, exclusive: bool = False, **open_kw) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` (or, with
    ``exclusive``, creates it and raises FileExistsError if it exists).

    >>> with atomic_writer("/tmp/featurebank-doc.txt", "w") as fh:  # doctest: +SKIP
    ...     fh.write("all or nothing")
    """
    path = Path(path)
    f = AtomicFile(path.parent, mode, suffix=path.suffix, **open_kw)
    try:
        yield f.file
    except BaseException:
        f.abort()
        raise
    f.commit(path, exclusive=exclusive)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. ``exclusive``: see
    :func:`atomic_writer`."""
    with atomic_writer(path, "wb", exclusive=exclusive) as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path`` to fill; on a clean exit its files
    are fsynced and it is renamed to ``path``, swapping out (then deleting) a directory
    already there. A failure removes it and leaves ``path`` as it was.

    Raises NotADirectoryError if ``path`` exists and is not a directory.

    >>> with atomic_directory("out/index") as d:                    # doctest: +SKIP
    ...     (d / "ids.npy").write_bytes(data)
    """
    path = Path(path)
    tmp = temp_path(path.parent)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            if not path.is_dir() or path.is_symlink():
                raise NotADirectoryError(f"{path} exists and is not a directory; it is not replaced")
            old = temp_path(path.parent)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():  # put the previous directory back
            os.rename(old, path)
            old = None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale_temp(path: str | os.PathLike[str], now: float | None = None) -> bool:
    """True for a leftover temporary file whose writer is dead (same host) or that is old."""
    path = Path(path)
    name = path.name
    if not name.startswith(TEMP_PREFIX):
        return False
    now = time.time() if now is None else now
    try:
        age = now - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TEMP_AGE_S:
        return True
    parts = name[len(TEMP_PREFIX) :].split("-")
    if len(parts) >= 3 and parts[0] == _HOST and parts[1].isdigit():
        return not _pid_alive(int(parts[1]))
    return False


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the leftover temporary files and directories of dead writers in ``directory``;
    return them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    now = time.time()
    for e in entries:
        p = Path(e.path)
        if e.name.startswith(TEMP_PREFIX) and is_stale_temp(p, now):
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
