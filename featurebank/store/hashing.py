"""Content keys of files: the sha256 of their bytes, served from the catalog's stat cache when
a file's (path, size, mtime_ns, ctime_ns, inode, device) are unchanged since it was hashed."""

from __future__ import annotations

import hashlib
import os
import stat as stat_mod
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from featurebank.store.catalog import Catalog
from featurebank.store.records import HashedFiles

__all__ = ["RACY_NS", "hash_files", "hash_one"]

#: A file modified this close to the moment it was hashed may change again within the same
#: mtime tick without its stat changing (git's "racily clean" problem); such cache entries
#: are re-hashed once more before they are trusted.
RACY_NS = 2_000_000_000
_READ_CHUNK = 1 << 20


def hash_files(
    catalog: Catalog,
    paths: Iterable[str | os.PathLike[str]],
    *,
    n_jobs: int | None = None,
    progress: bool = False,
) -> HashedFiles:
    """:meth:`EmbeddingStore.hash_files <featurebank.store.EmbeddingStore.hash_files>`
    (documented there) over ``catalog``'s stat cache."""
    abs_paths = [os.path.abspath(os.fspath(p)) for p in paths]
    n = len(abs_paths)
    keys: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    stats: list[os.stat_result | None] = [None] * n
    for i, p in enumerate(abs_paths):
        try:
            st = os.stat(p)
        except OSError as exc:
            errors[i] = describe_os_error(exc)
            continue
        if stat_mod.S_ISDIR(st.st_mode):
            errors[i] = "is a directory, not a file"
        elif not stat_mod.S_ISREG(st.st_mode):
            errors[i] = "is not a regular file"
        else:
            stats[i] = st
    cache = catalog.stat_lookup(list({p for p, st in zip(abs_paths, stats) if st is not None}))
    todo: dict[str, list[int]] = {}
    n_cached = 0
    for i, (p, st) in enumerate(zip(abs_paths, stats)):
        if st is None:
            continue
        c = cache.get(p)
        if (
            c is not None
            and c[:5] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
            and st.st_mtime_ns + RACY_NS <= c[6]
        ):
            keys[i] = c[5]
            n_cached += 1
        else:
            todo.setdefault(p, []).append(i)
    new_rows = []
    if todo:
        jobs = n_jobs or min(4, os.cpu_count() or 1)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="hashing", unit="file")
        todo_paths = list(todo)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for p, (key, row, err) in zip(todo_paths, pool.map(hash_one, todo_paths)):
                for i in todo[p]:
                    keys[i], errors[i] = key, err
                if row is not None:
                    new_rows.append(row)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        catalog.stat_store(new_rows)
    return HashedFiles(abs_paths, keys, errors, n_cached=n_cached, n_hashed=len(todo))


def hash_one(path: str) -> tuple[str | None, tuple | None, str | None]:
    """(key, stat-cache row or None, error or None) for one file."""
    from featurebank._files import open_image_file  # the one checked opener (stdlib only)
    from featurebank.errors import ImageDecodeError

    hashed_at = time.time_ns()
    try:
        # never a bare open(): a FIFO swapped in after hash_files' stat would block it forever
        with open_image_file(path) as f:
            st0 = os.fstat(f.fileno())
            h = hashlib.sha256()
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
            st1 = os.fstat(f.fileno())
    except ImageDecodeError as exc:
        return None, None, str(exc)
    except OSError as exc:
        return None, None, describe_os_error(exc)
    key = h.hexdigest()
    same = (st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns) == (st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns)
    # a file that changed while being read is not cached: its key may mix two versions
    row = (path, st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns, st0.st_ino, st0.st_dev, key, hashed_at) if same else None
    return key, row, None


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)
