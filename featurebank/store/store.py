"""EmbeddingStore: a directory of embedding spaces plus a catalog, and :func:`open_store`
(layout: see the package docstring). Each concern lives in its own module: spaces and their
shards (:mod:`.space`, :mod:`.shards`), the SQLite catalog (:mod:`.catalog`), content keys
(:mod:`.hashing`), checking (:mod:`.verify`), compaction (:mod:`.compact`), export
(:mod:`.export`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from featurebank._atomic import TEMP_PREFIX, remove_stale_temps, write_bytes_atomic
from featurebank.errors import StoreError
from featurebank.store.catalog import Catalog
from featurebank.store.compact import COMPACT_TARGET_BYTES, compact_space
from featurebank.store.export import export_space
from featurebank.store.hashing import hash_files
from featurebank.store.records import (
    DTYPES,
    FORMAT_VERSION,
    FailureRecord,
    HashedFiles,
    Item,
    VerifyReport,
    check_fingerprint,
)
from featurebank.store.shards import KEY_LEN, file_size, keys_to_array
from featurebank.store.space import Space, create_space_meta, read_space_meta
from featurebank.store.verify import verify_store

__all__ = [
    "FORMAT_VERSION",
    "MARKER_NAME",
    "DTYPES",
    "open_store",
    "EmbeddingStore",
    "Space",
    "HashedFiles",
    "FailureRecord",
    "Item",
    "VerifyReport",
]

MARKER_NAME = "featurebank-store.json"
_FORMAT_NAME = "featurebank-store"


class EmbeddingStore:
    """A directory of embedding spaces plus a catalog (stat cache, items, failures).

    Open with :func:`open_store`. One instance per process (or thread); several processes
    may read and write the same directory at once.
    """

    def __init__(self, root: Path, marker: Mapping[str, Any], *, catalog: bool = True) -> None:
        self.root = root
        self.format_version = int(marker["version"])
        (root / "spaces").mkdir(exist_ok=True)
        (root / "locks").mkdir(exist_ok=True)
        #: the SQLite catalog; None when opened with ``catalog=False`` (vectors only)
        self.catalog: Catalog | None = Catalog(root) if catalog else None
        self._spaces: dict[str, Space] = {}

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.root)!r})"

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.catalog is not None:
            self.catalog.close()

    def _require_catalog(self, what: str) -> Catalog:
        if self.catalog is None:
            raise StoreError(
                f"the store {self.root} was opened with catalog=False (vectors only), so it cannot {what}; "
                "open it with catalog=True on the host that keeps its catalog"
            )
        return self.catalog

    # ------------------------------------------------------------------ spaces
    def spaces(self) -> list[Space]:
        """Every space in the store, sorted by fingerprint."""
        out = []
        try:
            names = sorted(os.listdir(self.root / "spaces"))
        except FileNotFoundError:
            return out
        for fp in names:
            if len(fp) == KEY_LEN and (self.root / "spaces" / fp / "space.json").exists():
                out.append(self.space(fp))
        return out

    def space(
        self,
        fingerprint: str,
        *,
        dim: int | None = None,
        dtype: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Space:
        """Open the space ``fingerprint``, creating it when ``dim`` is given and it does not exist.

        dtype : on-disk precision, ``"float32"`` (default when creating) or ``"float16"``
        info : JSON-serialisable dict saved once at creation (model card output, decode
            mode, ...); ignored when the space exists.

        Raises StoreError if the space exists with another dim or dtype.
        """
        fp = check_fingerprint(fingerprint)
        if dtype is not None:
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                dtype = str(dtype)
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"dim must be a positive integer; got {dim!r}")
        cached = self._spaces.get(fp)
        meta = read_space_meta(self.root, fp) if cached is None else {"dim": cached.dim, "dtype": cached.dtype}
        if meta is None:
            if dim is None:
                raise StoreError(
                    f"space {fp} does not exist in {self.root}; pass dim= (and dtype=) to create it "
                    f"(spaces here: {', '.join(s.fingerprint[:12] + '…' for s in self.spaces()) or 'none'})"
                )
            meta = create_space_meta(self.root, fp, int(dim), dtype or "float32", info)
        if dim is not None and int(dim) != int(meta["dim"]):
            raise StoreError(f"space {fp[:12]}… in {self.root} holds dim={meta['dim']} vectors; asked for dim={dim}")
        if dtype is not None and dtype != meta["dtype"]:
            raise StoreError(
                f"space {fp[:12]}… in {self.root} stores dtype={meta['dtype']}; asked for dtype={dtype} "
                "(one space has one precision; leave dtype out to use the stored one)"
            )
        if cached is None:
            cached = self._spaces[fp] = Space(self, fp, read_space_meta(self.root, fp) or meta)
        return cached


    # ------------------------------------------------------------------ stat cache
    def hash_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        n_jobs: int | None = None,
        progress: bool = False,
    ) -> HashedFiles:
        """Content keys (sha256 hex of the bytes) of files, served from the stat cache when the
        file's (path, size, mtime_ns, ctime_ns, inode, device) are unchanged since it was hashed.

        A file that cannot be read gets ``key=None`` and a reason in ``errors``; the batch goes
        on. ``n_jobs`` threads read uncached files (default: up to 4).
        """
        return hash_files(self._require_catalog("hash files"), paths, n_jobs=n_jobs, progress=progress)

    # ------------------------------------------------------------------ items
    def record_items(
        self,
        paths: Sequence[str | os.PathLike[str]],
        keys: Sequence[str],
        labels: Sequence[str | None] | None = None,
    ) -> None:
        """Remember that ``paths[i]`` (content ``keys[i]``, optional ``labels[i]``) was embedded."""
        p = [os.path.abspath(os.fspath(x)) for x in paths]
        k = [x.decode("ascii") if isinstance(x, bytes) else str(x) for x in keys_to_array(keys)]
        if len(p) != len(k):
            raise ValueError(f"paths has {len(p)} entries and keys {len(k)}; they must match")
        lab = [None] * len(p) if labels is None else [None if x is None else str(x) for x in labels]
        if len(lab) != len(p):
            raise ValueError(f"labels has {len(lab)} entries; expected one per path ({len(p)})")
        self._require_catalog("record items").record_items(list(zip(p, k, lab)))

    def items(self) -> list[Item]:
        """Every recorded (path, key, label), oldest first."""
        return [Item(*row) for row in self._require_catalog("list items").items()]

    # ------------------------------------------------------------------ failures
    def record_failures(self, space_fp: str, records: Iterable[FailureRecord | Mapping[str, Any]]) -> int:
        """Record images that could not be embedded in space ``space_fp``.

        records : FailureRecord or mappings with ``path``, ``reason`` and optional ``key``.
        A path that fails again has its reason updated and ``attempts`` incremented.
        Returns the number recorded.
        """
        fp = check_fingerprint(space_fp)
        rows = []
        for i, r in enumerate(records):
            if isinstance(r, FailureRecord):
                path, reason, key = r.path, r.reason, r.key
            elif isinstance(r, Mapping):
                if "path" not in r or "reason" not in r:
                    raise ValueError(f"records[{i}] needs 'path' and 'reason'; got keys {sorted(r)}")
                path, reason, key = r["path"], r["reason"], r.get("key")
            else:
                raise ValueError(f"records[{i}] must be a FailureRecord or a mapping; got {type(r).__name__}")
            if not str(reason).strip():
                raise ValueError(f"records[{i}] has an empty reason; say why the image failed")
            if key is not None:
                key = keys_to_array([key], what=f"records[{i}].key")[0].decode("ascii")
            rows.append((os.path.abspath(os.fspath(path)), fp, key, str(reason)))
        if rows:
            self._require_catalog("record failures").record_failures(rows)
        return len(rows)

    def failures(self, space_fp: str | None = None) -> list[FailureRecord]:
        """Recorded failures (of one space, or all), oldest first."""
        fp = None if space_fp is None else check_fingerprint(space_fp)
        return [FailureRecord(*row) for row in self._require_catalog("list failures").failures(fp)]

    def clear_failures(
        self, space_fp: str | None = None, paths: Sequence[str | os.PathLike[str]] | None = None
    ) -> int:
        """Forget failures (call when the images are retried). Returns how many were removed."""
        fp = None if space_fp is None else check_fingerprint(space_fp)
        plist = None if paths is None else [os.path.abspath(os.fspath(p)) for p in paths]
        return self._require_catalog("clear failures").clear_failures(fp, plist)

    # ------------------------------------------------------------------ reports
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: format version, each space (rows, unique vectors, shards, bytes)."""
        spaces = []
        total = 0
        for s in self.spaces():
            files = s.shards()
            size = sum(file_size(p) for p in files)
            total += size
            index = s._refresh()
            spaces.append(
                {
                    "fingerprint": s.fingerprint,
                    "dim": s.dim,
                    "dtype": s.dtype,
                    "n_vectors": len(index),
                    "n_duplicate_rows": index.n_duplicates,
                    "n_shards": len(files),
                    "bytes": size,
                    "info": s.info,
                }
            )
        counts = self._require_catalog("count its catalog rows").counts()
        return {
            "path": str(self.root),
            "format_version": self.format_version,
            "spaces": spaces,
            "n_stat_cache": counts["stat_cache"],
            "n_items": counts["items"],
            "n_failures": counts["failures"],
            "bytes": total + file_size(self._require_catalog("count its catalog rows").path),
        }

    def verify(self, *, quarantine: bool = False) -> VerifyReport:
        """Check every shard: it parses, its schema matches the space (dim, dtype), keys are
        sha256 hex, vectors are finite, checksums match. Also checks the catalog.

        quarantine : move broken shards to ``<store>/quarantine/<space>/`` so the store is usable
            again; their intact record batches are first copied to a new shard, and the images
            of the damaged ones get embedded again on the next run (see :meth:`Space.quarantine`).
        """
        return verify_store(self, quarantine=quarantine)

    # ------------------------------------------------------------------ compaction
    def compact(self, space_fp: str | None = None, *, target_bytes: int = COMPACT_TARGET_BYTES) -> dict[str, Any]:
        """Merge small shards into few large ones and drop duplicate rows.

        Safe with concurrent readers and writers: merged shards are committed before the
        inputs are deleted (a reader may briefly see both and dedupes; a reader that had
        mapped an input keeps its mapping). Only one compaction per space runs at a time.
        Shards of at least ``target_bytes / 2`` are kept as they are. A record batch that fails
        its checksum stops the compaction with a StoreError (merging would give damaged
        vectors a fresh, valid checksum): quarantine it first (``verify(quarantine=True)``).

        Returns {"spaces": [{"fingerprint", "shards_before", "shards_merged", "shards_written",
        "shards_after", "shards_added_meanwhile", "rows_dropped"}]}: ``shards_after`` is
        ``shards_before - shards_merged + shards_written``, what this compaction made of the
        shards it found; ``shards_added_meanwhile`` counts shards other writers committed
        while it ran (the space holds both).
        """
        if target_bytes < 1:
            raise ValueError(f"target_bytes must be positive; got {target_bytes}")
        spaces = self.spaces() if space_fp is None else [self.space(check_fingerprint(space_fp))]
        return {"spaces": [compact_space(s, int(target_bytes)) for s in spaces]}


    # ------------------------------------------------------------------ export
    def export(
        self,
        space_fp: str,
        out_path: str | os.PathLike[str],
        *,
        format: str = "parquet",
        overwrite: bool = False,
        chunk_size: int | None = None,
    ) -> dict[str, Any]:
        """Write a space's vectors with their keys, paths and labels to open formats.

        format="parquet" : one file, columns ``key`` (string), ``path``, ``label`` (string,
            null if unknown), ``vector`` (fixed_size_list<float32>[dim]); one row per key.
            Parquet strings are UTF-8, so a file name that is not is written escaped
            (``caf\\xe9.jpg``, see :func:`~featurebank.store.printable`).
        format="npy" : a directory with ``vectors.npy`` (n, dim) float32, ``keys.npy`` (n,)
            ``<U64``, ``paths.npy`` and ``labels.npy`` (n,) unicode ("" if unknown), and
            ``space.json``. Loads with ``np.load`` (no pickle). Paths are exact: a name that
            is not UTF-8 keeps its surrogate escapes (``os.fsencode`` gives its bytes back).

        Rows are sorted by key. Written to a temporary name and renamed into place. Returns
        {"path", "format", "n_vectors", "dim"}.
        """
        return export_space(self, space_fp, out_path, format=format, overwrite=overwrite, chunk_size=chunk_size)


def open_store(path: str | os.PathLike[str], *, create: bool = True, catalog: bool = True) -> EmbeddingStore:
    """Open the embedding store in directory ``path``, creating it if ``create`` and it is
    missing or empty.

    catalog : False opens the vectors only: spaces can be listed, read and added to (without
        ``paths``), and ``catalog.sqlite`` is never opened; every catalog method raises
        StoreError. For workers on other hosts: SQLite in WAL mode must not be shared over a
        network file system, so one host (a Ray driver) keeps the catalog for all of them.

    Raises StoreError if the directory is not a store (non-empty without the marker file),
    has an unknown format version, or does not exist and ``create`` is False.

    >>> store = open_store(tmp_dir / "cache")                       # doctest: +SKIP
    >>> space = store.space(fp, dim=320, info={"decode": "pil"})      # doctest: +SKIP
    """
    root = Path(path).expanduser().absolute()
    marker = root / MARKER_NAME
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a store directory")
    if not marker.exists():
        if not create:
            what = "does not exist" if not root.exists() else f"is not a featurebank store (no {MARKER_NAME})"
            raise StoreError(f"{root} {what}; check the path (a store is created by the first embedding run)")
        root.mkdir(parents=True, exist_ok=True)
        others = [n for n in os.listdir(root) if not n.startswith(TEMP_PREFIX)]
        if others:
            shown = ", ".join(sorted(others)[:5]) + (", …" if len(others) > 5 else "")
            raise StoreError(
                f"{root} is not a featurebank store (no {MARKER_NAME}) and is not empty ({shown}); "
                "give a new or empty directory"
            )
        blob = json.dumps({"format": _FORMAT_NAME, "version": FORMAT_VERSION}, indent=2) + "\n"
        try:
            write_bytes_atomic(marker, blob.encode(), exclusive=True)
        except FileExistsError:  # another process created the store first: theirs is read below
            pass
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{marker}: unreadable store marker: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME or not isinstance(meta.get("version"), int):
        raise StoreError(f"{marker}: not a featurebank store marker (expected format {_FORMAT_NAME!r} and an int version)")
    if meta["version"] != FORMAT_VERSION:
        hint = "upgrade featurebank" if meta["version"] > FORMAT_VERSION else "re-embed into a new store"
        raise StoreError(
            f"{root}: store format version {meta['version']} is not supported by this featurebank "
            f"(it reads version {FORMAT_VERSION}); {hint}"
        )
    store = EmbeddingStore(root, meta, catalog=catalog)
    spaces_dir = root / "spaces"
    for fp in os.listdir(spaces_dir):
        remove_stale_temps(spaces_dir / fp / "shards")
    remove_stale_temps(root)
    return store
