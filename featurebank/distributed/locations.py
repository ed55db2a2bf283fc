"""Where images live: local paths, ``file://`` URLs and any other installed fsspec protocol.

Local paths and ``file://`` URLs are turned into plain absolute paths and go through exactly
the code of the local embedder (:func:`~featurebank.embedder.sources.list_images`, the
store's stat-cached hashing, :func:`~featurebank.decoding.decode_image` on the path),
so their keys, item paths and failure messages are the same as a local run's.

Other URLs (``s3://bucket/photos/``, ``gs://``, ``https://...``, chained URLs such as
``zip://photos::s3://bucket/photos.zip``) are read with fsspec: a URL folder is listed recursively with the same rules as a local folder
(immediate subfolders are classes, accepted image extensions only with the others counted in
``ImageList.skipped``, dot names skipped, sorted); a URL
file is one image. Their bytes are hashed on the driver (object stores have no stat cache, so
each run reads them once to key them) and read again by the decode task, which checks the
key so that an object rewritten between the two reads is not stored under a stale key.
List files (``.txt``/``.csv``/``.parquet``) must be local. The store records item paths and
failures of local files only (it keeps paths as absolute local paths): URL inputs get their
vectors, keyed by content as always, but no item rows (and so no labels in ``store export``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from featurebank.embedder.sources import (
    IMAGE_EXTENSIONS,
    LIST_FORMATS,
    ImageList,
    list_images,
    skipped_extension,
    sort_skipped,
)
from featurebank.errors import ImageSourceError

__all__ = ["is_url", "list_sources", "hash_urls", "read_url"]


def _protocol(src: str) -> str | None:
    head, sep, _ = src.partition("://")
    # "C:\\x" and plain relative paths have no "://"; a protocol is a short lowercase word
    return head.lower() if sep and head and head.replace("+", "").replace("-", "").isalnum() else None


def is_url(path: str) -> bool:
    """True for a URL that fsspec reads (anything ``proto://`` other than ``file://``)."""
    proto = _protocol(path)
    return proto is not None and proto not in ("file", "local")


def _local(src: str) -> str:
    """``file:///x`` -> ``/x``; a plain path as is."""
    if _protocol(src) in ("file", "local"):
        return "/" + src.partition("://")[2].lstrip("/")
    return src


def list_sources(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | ImageList) -> ImageList:
    """List the images of local and URL sources, concatenated in the order given.

    Returns an :class:`~featurebank.embedder.sources.ImageList` whose paths are absolute
    local paths or full URLs (``s3://bucket/a/b.jpg``).
    """
    if isinstance(sources, ImageList):
        return sources
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if not items:
        raise ImageSourceError("no image source given; pass a folder, a URL or a .txt/.csv/.parquet list")
    paths: list[str] = []
    labels: list[str | None] = []
    roots: list[str] = []
    skipped: dict[str, int] = {}
    run: list[str] = []  # consecutive local sources: one list_images call keeps its semantics

    def flush() -> None:
        if run:
            got = list_images(list(run))
            paths.extend(got.paths)
            labels.extend(got.labels)
            roots.extend(got.roots)
            for ext, c in got.skipped.items():
                skipped[ext] = skipped.get(ext, 0) + c
            run.clear()

    for src in items:
        if not isinstance(src, (str, os.PathLike)):
            raise TypeError(f"an image source must be a path or URL; got {type(src).__name__}")
        s = os.fspath(src)
        if not is_url(s):
            run.append(_local(s))
            continue
        flush()
        p, lab = _list_url(s, skipped)
        paths += p
        labels += lab
        roots.append(s)
    flush()
    return ImageList(paths=paths, labels=labels, roots=roots, skipped=sort_skipped(skipped))


def _filesystem(url: str):
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        # fsspec names the missing package, e.g. "Install s3fs to access S3"
        raise ImageSourceError(f"{url}: cannot open this URL ({exc}); install the fsspec backend for it on every node") from None


def _list_url(url: str, skipped: dict[str, int]) -> tuple[list[str], list[str | None]]:
    if url.lower().endswith(LIST_FORMATS):
        raise ImageSourceError(
            f"{url}: list files must be local paths (copy the list next to the driver); URL sources may be folders or image files"
        )
    fs, root = _filesystem(url)
    try:
        if fs.isfile(root):
            return [url], [None]
        if not fs.isdir(root):
            raise ImageSourceError(f"{url}: no such file or folder")
        found = fs.find(root)
    except ImageSourceError:
        raise
    except (OSError, PermissionError) as exc:
        raise ImageSourceError(f"{url}: cannot list ({exc})") from None
    root = root.rstrip("/")
    # a chained URL ("zip://photos::s3://bucket/a.zip") names its outer file after "::";
    # each listed member keeps that suffix so the workers open the same archive
    chain = url.split("::", 1)[1] if "::" in url else ""
    rows: list[tuple[tuple[str, ...], str, str | None]] = []
    for p in found:
        rel = p[len(root) :].lstrip("/").split("/")
        if any(part.startswith(".") for part in rel):
            continue
        if not rel[-1].lower().endswith(IMAGE_EXTENSIONS):
            ext = skipped_extension(rel[-1])
            skipped[ext] = skipped.get(ext, 0) + 1
            continue
        full = fs.unstrip_protocol(p) + (f"::{chain}" if chain else "")
        rows.append((tuple(rel), full, rel[0] if len(rel) > 1 else None))
    if not rows:
        raise ImageSourceError(f"{url}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    rows.sort()
    return [r[1] for r in rows], [r[2] for r in rows]


def read_url(url: str) -> bytes:
    """All bytes of the object at ``url``. Raises OSError with a one-line reason."""
    fs, p = _filesystem(url)
    try:
        return fs.cat_file(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None


def _hash_url(url: str) -> tuple[str | None, str | None]:
    try:
        data = read_url(url)
    except ImageSourceError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, str(exc) if url in str(exc) else f"{url}: {exc.strerror or exc}"
    return hashlib.sha256(data).hexdigest(), None


def hash_urls(urls: Sequence[str], *, n_jobs: int = 8) -> tuple[list[str | None], list[str | None]]:
    """sha256 hex of each URL's bytes (``None`` where unreadable) and the reason it failed.

    Object stores are latency-bound, so a few threads read at once whatever the core count.
    """
    if not urls:
        return [], []
    with ThreadPoolExecutor(max_workers=max(1, min(n_jobs, len(urls)))) as pool:
        got = list(pool.map(_hash_url, urls))
    return [k for k, _ in got], [e for _, e in got]
