"""Crash-safe file writes shared by every room: temp file in the same folder, flush, fsync,
rename. A reader sees the old file or the new one, never half of one; a failure leaves no
temp file behind. (The store's shard writer adds exclusive create and directory fsync on top:
see featurebank.store.shards.)"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_writer", "write_bytes_atomic"]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb", **open_kw) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on a clean exit it replaces ``path``.

    >>> with atomic_writer("/tmp/featurebank-doc.txt", "w") as fh:  # doctest: +SKIP
    ...     fh.write("all or nothing")
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)
