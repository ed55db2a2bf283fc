"""EmbeddingStore and Space: the content-addressed vector cache (layout: see the package docstring)."""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_mod
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from featurebank._atomic import (
    TEMP_PREFIX,
    atomic_directory,
    atomic_writer,
    fsync_dir,
    is_stale_temp,
    remove_stale_temps,
    write_bytes_atomic,
)
from featurebank.errors import StoreError
from featurebank.store.catalog import Catalog, printable
from featurebank.store.index import KeyIndex
from featurebank.store.shards import (
    KEY_LEN,
    Block,
    ShardWriter,
    check_blocks,
    keys_to_array,
    list_shards,
    read_blocks,
    shard_schema,
    verify_ahead,
    write_shard,
    write_shard_blocks,
)

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

#: On-disk layout version written to the marker file; bump on any incompatible change.
FORMAT_VERSION = 1
MARKER_NAME = "featurebank-store.json"
_FORMAT_NAME = "featurebank-store"
DTYPES = ("float32", "float16")
#: A file modified this close to the moment it was hashed may change again within the same
#: mtime tick without its stat changing (git's "racily clean" problem); such cache entries
#: are re-hashed once more before they are trusted.
RACY_NS = 2_000_000_000
_READ_CHUNK = 1 << 20
_COMPACT_TARGET_BYTES = 256 << 20
_COMPACT_BATCH_BYTES = 32 << 20
_FP16_MAX = float(np.finfo(np.float16).max)


def _check_fingerprint(fp: Any, what: str = "space fingerprint") -> str:
    if not isinstance(fp, str):
        raise ValueError(f"{what} must be a 64-character hex string; got {type(fp).__name__}")
    try:
        keys_to_array([fp], what=what)
    except ValueError:
        raise ValueError(f"{what} must be 64 lowercase hex characters (a sha256 digest); got {fp!r}") from None
    return fp


def _describe_os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ============================================================================= records
@dataclass(frozen=True)
class HashedFiles:
    """Result of :meth:`EmbeddingStore.hash_files`, aligned with the input paths.

    paths : absolute paths, as given (not resolved through symlinks)
    keys : sha256 hex of each file's bytes, ``None`` where the file could not be read
    errors : ``None``, or why the file could not be read ("No such file or directory", ...)
    n_cached : how many keys came from the stat cache without reading the file
    n_hashed : how many files were read and hashed
    """

    paths: list[str]
    keys: list[str | None]
    errors: list[str | None]
    n_cached: int
    n_hashed: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def ok(self) -> np.ndarray:
        """ndarray of shape (n,), bool: True where a key was computed."""
        return np.array([k is not None for k in self.keys], dtype=bool)

    def failed(self) -> list[tuple[str, str]]:
        """(path, error) of each file that could not be read."""
        return [(p, e) for p, e in zip(self.paths, self.errors) if e is not None]


@dataclass(frozen=True)
class FailureRecord:
    """An image that could not be embedded into ``space``. ``time`` is a Unix timestamp."""

    path: str
    reason: str
    key: str | None = None
    space: str | None = None
    time: float | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Item:
    """A file that was embedded: its path, content key and optional label.

    ``path`` is the str Python uses for the file name: bytes that are not UTF-8 appear as
    surrogate escapes (``os.fsdecode``), so ``open(path)`` works; show it with
    :func:`featurebank.store.printable`.
    """

    path: str
    key: str
    label: str | None
    updated: float


@dataclass
class VerifyReport:
    """Result of :meth:`EmbeddingStore.verify`. ``ok`` is False when ``problems`` is not empty."""

    path: str
    n_spaces: int = 0
    n_shards: int = 0
    n_rows: int = 0
    n_vectors: int = 0
    problems: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    stale_temps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ============================================================================= space
class Space:
    """The vectors of one embedding space (one model output + decode mode) in a store.

    Obtain with :meth:`EmbeddingStore.space`. Not thread-safe; processes may share a store.

    Attributes
    ----------
    fingerprint : str, 64 hex chars, the space id
    dim : int, vector length
    dtype : ``"float32"`` or ``"float16"``, the on-disk precision (loads are always float32)
    info : dict, the JSON metadata saved when the space was created
    path : Path, the space's directory
    """

    def __init__(self, store: "EmbeddingStore", fingerprint: str, meta: Mapping[str, Any]) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.dim = int(meta["dim"])
        self.dtype = str(meta["dtype"])
        self.info = dict(meta.get("info") or {})
        self.path = store.root / "spaces" / fingerprint
        self.shard_dir = self.path / "shards"
        self._schema = shard_schema(fingerprint, self.dtype, self.dim, FORMAT_VERSION)
        self._names: list[str] | None = None
        self._blocks: dict[str, list[Block]] = {}
        self._index: KeyIndex | None = None

    def __repr__(self) -> str:
        return f"Space({self.fingerprint[:12]}…, dim={self.dim}, dtype={self.dtype})"

    # ------------------------------------------------------------------ reading
    def _refresh(self) -> KeyIndex:
        """Bring the key map up to date with the shard files on disk (other writers, compaction)."""
        names = list_shards(self.shard_dir)
        if self._index is not None and names == self._names:
            return self._index
        for _ in range(10):
            opened: dict[str, list[Block]] = {}
            try:
                for name in names:
                    blocks = self._blocks.get(name)
                    if blocks is None:
                        blocks = read_blocks(self.shard_dir / name, self.dim, self.dtype)
                    opened[name] = blocks
            except FileNotFoundError:
                # a concurrent compaction removed it after committing its merged shard, so
                # listing again finds every row
                names = list_shards(self.shard_dir)
                continue
            except StoreError as exc:
                raise StoreError(
                    f"{exc}; run `featurebank store verify {self.store.root} --quarantine` to move broken "
                    "shards aside (their images are then embedded again)"
                ) from exc
            break
        else:  # pragma: no cover - needs ten compactions racing one read
            raise StoreError(f"{self.shard_dir}: shards keep disappearing while reading; is a compaction looping?")
        self._blocks = opened
        self._names = names
        self._index = KeyIndex([b for n in names for b in opened[n]])
        return self._index

    def __len__(self) -> int:
        return len(self._refresh())

    def keys(self) -> np.ndarray:
        """Every key in the space, deduplicated: ndarray of shape (n,), dtype ``<U64``, sorted."""
        return self._refresh().keys.astype(f"U{KEY_LEN}")

    def contains(self, keys: Iterable[str] | np.ndarray) -> np.ndarray:
        """ndarray of shape (n,), bool: which of ``keys`` have a vector in this space."""
        q = keys_to_array(keys)
        return self._refresh().lookup(q) >= 0

    def get(self, keys: Iterable[str] | np.ndarray, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Load vectors by key.

        Every record batch a row comes from is checked against its checksum the first time
        this Space reads it (``featurebank.sum2d``, at memory speed; remembered while the shard
        stays open).

        verify : False skips that check (for benchmarks; ``store verify`` checks everything)

        Returns
        -------
        X : ndarray of shape (n, dim), float32, row i for keys[i]; rows not found are NaN
            (so that using them by mistake fails loudly downstream)
        found : ndarray of shape (n,), bool

        Raises StoreError naming the shard if a row's batch fails its checksum: damaged
        vectors are never returned, and never silently reported as not found.
        """
        q = keys_to_array(keys)
        index = self._refresh()
        pos = index.lookup(q)
        found = pos >= 0
        X = np.empty((len(q), self.dim), dtype=np.float32)
        if not found.all():
            X[~found] = np.nan
        rows = np.flatnonzero(found)
        if not verify:
            index.gather(pos[rows], X, rows)
            return X, found
        ahead = verify_ahead(index.blocks_of(pos[rows]))

        def check(block: Block) -> None:
            f = ahead.get(id(block))
            if f is not None:
                f.result()
            self._check_block(block)

        try:
            index.gather(pos[rows], X, rows, check=check)
        finally:
            for f in ahead.values():
                f.cancel()
        return X, found

    def _check_block(self, block: Block) -> None:
        if not block.verify():
            raise StoreError(
                f"{self.shard_dir / block.shard} (record batch {block.batch}): vectors do not match their "
                f"checksum (the file was modified or damaged on disk); run `featurebank store verify "
                f"{self.store.root} --quarantine` to move it aside (its images are then embedded again)"
            )

    def damaged_shards(self, keys: Iterable[str] | np.ndarray | None = None) -> list[str]:
        """Names of the shards holding a record batch that fails its checksum, among the
        batches that serve ``keys`` (every batch in use when None). Each batch is read once."""
        index = self._refresh()
        if keys is None:
            blocks = index.blocks_of(np.arange(len(index)))
        else:
            pos = index.lookup(keys_to_array(keys))
            blocks = index.blocks_of(pos[pos >= 0])
        for f in verify_ahead(blocks).values():
            f.result()
        return sorted({b.shard for b in blocks if not b.verify()})

    def quarantine(self, names: Sequence[str]) -> list[Path]:
        """Move shards aside to ``<store>/quarantine/<space>/`` after copying their intact
        record batches into a new shard; the rows of damaged batches are then missing (and
        embedded again by the next run). Safe with concurrent readers (they keep their
        mapping) and with another process quarantining the same shard. Returns the new
        paths of the shards this call moved."""
        moved = []
        for name in names:
            path = self.shard_dir / name
            try:
                blocks = self._blocks.get(name) or read_blocks(path, self.dim, self.dtype)
            except FileNotFoundError:  # another process moved or compacted it already
                continue
            except StoreError:  # unreadable as a whole: nothing to keep
                blocks = []
            intact = [b for b in blocks if not check_blocks([b], str(path))]
            if intact:
                write_shard_blocks(self.shard_dir, self._schema, intact)
            qdir = self.store.root / "quarantine" / self.fingerprint
            qdir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, qdir / name)
            except FileNotFoundError:
                continue
            fsync_dir(self.shard_dir)
            self._blocks.pop(name, None)
            self._index = None
            moved.append(qdir / name)
        return moved

    def shards(self) -> list[Path]:
        """Paths of the committed shard files, oldest first."""
        return [self.shard_dir / n for n in list_shards(self.shard_dir)]

    # ------------------------------------------------------------------ writing
    def add(
        self,
        keys: Iterable[str] | np.ndarray,
        X: np.ndarray,
        *,
        paths: Sequence[str | os.PathLike[str]] | None = None,
        labels: Sequence[str | None] | None = None,
    ) -> int:
        """Commit vectors as one new shard file (atomic: all rows or none survive a crash).

        Parameters
        ----------
        keys : sequence of n sha256 hex strings (see :meth:`EmbeddingStore.hash_files`)
        X : array-like of shape (n, dim), floating; must be finite
        paths, labels : optional, length n: the files these vectors came from and their labels,
            remembered for export; a successful add also clears these paths' failures here

        Returns the number of rows written (repeated keys within the call are written once;
        keys already in the space are not checked here: call :meth:`contains` first, and
        readers and :meth:`EmbeddingStore.compact` drop duplicates).
        """
        q = keys_to_array(keys)
        X = np.asarray(X)
        n = len(q)
        if X.ndim != 2 or X.shape[0] != n or X.shape[1] != self.dim:
            raise ValueError(
                f"X has shape {X.shape}; expected (n_keys, dim) = ({n}, {self.dim}) for space {self.fingerprint[:12]}…"
            )
        if X.dtype.kind not in "fiu":
            raise ValueError(f"X must hold real numbers; got dtype {X.dtype}")
        X32 = X.astype(np.float32, copy=False)
        bad = ~np.isfinite(X32).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"X has NaN or inf in {int(bad.sum())} of {n} rows (first: row {i}, key {q[i].decode()}); "
                "refusing to store them: the model produced broken vectors for these images"
            )
        if self.dtype == "float16":
            peak = float(np.abs(X32).max()) if X32.size else 0.0
            if peak > _FP16_MAX:
                raise ValueError(
                    f"X has values up to {peak:.6g}, beyond float16's range ({_FP16_MAX:.0f}); "
                    "this space stores float16: create the space with dtype='float32'"
                )
        path_list = label_list = None
        if paths is not None:
            path_list = [os.path.abspath(os.fspath(p)) for p in paths]
            if len(path_list) != n:
                raise ValueError(f"paths has {len(path_list)} entries; expected one per key ({n})")
        if labels is not None:
            if paths is None:
                raise ValueError("labels need paths: a label belongs to a file")
            label_list = [None if lab is None else str(lab) for lab in labels]
            if len(label_list) != n:
                raise ValueError(f"labels has {len(label_list)} entries; expected one per key ({n})")
        if n:
            _, first = np.unique(q, return_index=True)
            first.sort()
            data = np.ascontiguousarray(X32[first].astype(self.dtype, copy=False))
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            write_shard(self.shard_dir, self._schema, np.ascontiguousarray(q[first]), data)
            written = len(first)
        else:
            written = 0
        if path_list is not None:
            keys_str = [k.decode("ascii") for k in q]
            self.store.record_items(path_list, keys_str, label_list)
            self.store.clear_failures(self.fingerprint, path_list)
        return written


# ============================================================================= store
class EmbeddingStore:
    """A directory of embedding spaces plus a catalog (stat cache, items, failures).

    Open with :func:`open_store`. One instance per process (or thread); several processes
    may read and write the same directory at once.
    """

    def __init__(self, root: Path, marker: Mapping[str, Any]) -> None:
        self.root = root
        self.format_version = int(marker["version"])
        (root / "spaces").mkdir(exist_ok=True)
        (root / "locks").mkdir(exist_ok=True)
        self.catalog = Catalog(root)
        self._spaces: dict[str, Space] = {}

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.root)!r})"

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.catalog.close()

    # ------------------------------------------------------------------ spaces
    def _read_space_meta(self, fp: str) -> dict[str, Any] | None:
        p = self.root / "spaces" / fp / "space.json"
        try:
            meta = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{p}: unreadable space description: {exc}") from exc
        if meta.get("fingerprint") != fp or meta.get("dtype") not in DTYPES or not isinstance(meta.get("dim"), int):
            raise StoreError(f"{p}: space description is corrupt (fingerprint/dim/dtype)")
        return meta

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
        fp = _check_fingerprint(fingerprint)
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
        meta = self._read_space_meta(fp) if cached is None else {"dim": cached.dim, "dtype": cached.dtype}
        if meta is None:
            if dim is None:
                raise StoreError(
                    f"space {fp} does not exist in {self.root}; pass dim= (and dtype=) to create it "
                    f"(spaces here: {', '.join(s.fingerprint[:12] + '…' for s in self.spaces()) or 'none'})"
                )
            meta = self._create_space(fp, int(dim), dtype or "float32", info)
        if dim is not None and int(dim) != int(meta["dim"]):
            raise StoreError(f"space {fp[:12]}… in {self.root} holds dim={meta['dim']} vectors; asked for dim={dim}")
        if dtype is not None and dtype != meta["dtype"]:
            raise StoreError(
                f"space {fp[:12]}… in {self.root} stores dtype={meta['dtype']}; asked for dtype={dtype} "
                "(one space has one precision; leave dtype out to use the stored one)"
            )
        if cached is None:
            cached = self._spaces[fp] = Space(self, fp, self._read_space_meta(fp) or meta)
        return cached

    def _create_space(self, fp: str, dim: int, dtype: str, info: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            info_json = json.loads(json.dumps(dict(info or {}), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"info must be a JSON-serialisable dict: {exc}") from exc
        from featurebank import __version__

        meta = {
            "fingerprint": fp,
            "dim": dim,
            "dtype": dtype,
            "info": info_json,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "featurebank_version": __version__,
        }
        d = self.root / "spaces" / fp
        (d / "shards").mkdir(parents=True, exist_ok=True)
        blob = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        # exclusive: if another process created it first, theirs stands and is checked
        try:
            write_bytes_atomic(d / "space.json", blob, exclusive=True)
        except FileExistsError:
            existing = self._read_space_meta(fp)
            assert existing is not None  # the link failed because it exists
            return existing
        return meta

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
        abs_paths = [os.path.abspath(os.fspath(p)) for p in paths]
        n = len(abs_paths)
        keys: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        stats: list[os.stat_result | None] = [None] * n
        for i, p in enumerate(abs_paths):
            try:
                st = os.stat(p)
            except OSError as exc:
                errors[i] = _describe_os_error(exc)
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                errors[i] = "is a directory, not a file"
            elif not stat_mod.S_ISREG(st.st_mode):
                errors[i] = "is not a regular file"
            else:
                stats[i] = st
        cache = self.catalog.stat_lookup(list({p for p, st in zip(abs_paths, stats) if st is not None}))
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
                for p, (key, row, err) in zip(todo_paths, pool.map(_hash_one, todo_paths)):
                    for i in todo[p]:
                        keys[i], errors[i] = key, err
                    if row is not None:
                        new_rows.append(row)
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
            self.catalog.stat_store(new_rows)
        return HashedFiles(abs_paths, keys, errors, n_cached=n_cached, n_hashed=len(todo))

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
        self.catalog.record_items(list(zip(p, k, lab)))

    def items(self) -> list[Item]:
        """Every recorded (path, key, label), oldest first."""
        return [Item(*row) for row in self.catalog.items()]

    # ------------------------------------------------------------------ failures
    def record_failures(self, space_fp: str, records: Iterable[FailureRecord | Mapping[str, Any]]) -> int:
        """Record images that could not be embedded in space ``space_fp``.

        records : FailureRecord or mappings with ``path``, ``reason`` and optional ``key``.
        A path that fails again has its reason updated and ``attempts`` incremented.
        Returns the number recorded.
        """
        fp = _check_fingerprint(space_fp)
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
            self.catalog.record_failures(rows)
        return len(rows)

    def failures(self, space_fp: str | None = None) -> list[FailureRecord]:
        """Recorded failures (of one space, or all), oldest first."""
        fp = None if space_fp is None else _check_fingerprint(space_fp)
        return [FailureRecord(*row) for row in self.catalog.failures(fp)]

    def clear_failures(
        self, space_fp: str | None = None, paths: Sequence[str | os.PathLike[str]] | None = None
    ) -> int:
        """Forget failures (call when the images are retried). Returns how many were removed."""
        fp = None if space_fp is None else _check_fingerprint(space_fp)
        plist = None if paths is None else [os.path.abspath(os.fspath(p)) for p in paths]
        return self.catalog.clear_failures(fp, plist)

    # ------------------------------------------------------------------ reports
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: format version, each space (rows, unique vectors, shards, bytes)."""
        spaces = []
        total = 0
        for s in self.spaces():
            files = s.shards()
            size = sum(_size(p) for p in files)
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
        counts = self.catalog.counts()
        return {
            "path": str(self.root),
            "format_version": self.format_version,
            "spaces": spaces,
            "n_stat_cache": counts["stat_cache"],
            "n_items": counts["items"],
            "n_failures": counts["failures"],
            "bytes": total + _size(self.catalog.path),
        }

    def verify(self, *, quarantine: bool = False) -> VerifyReport:
        """Check every shard: it parses, its schema matches the space (dim, dtype), keys are
        sha256 hex, vectors are finite, checksums match. Also checks the catalog.

        quarantine : move broken shards to ``<store>/quarantine/<space>/`` so the store is usable
            again; their intact record batches are first copied to a new shard, and the images
            of the damaged ones get embedded again on the next run (see :meth:`Space.quarantine`).
        """
        rep = VerifyReport(path=str(self.root))
        found = self.catalog.quick_check()
        if found:
            rep.problems.append(f"{self.catalog.path}: " + "; ".join(found[:5]))
        for fp in sorted(os.listdir(self.root / "spaces")):
            try:
                meta = self._read_space_meta(fp)
            except StoreError as exc:
                rep.problems.append(str(exc))
                continue
            if meta is None:
                continue
            rep.n_spaces += 1
            space = self.space(fp)
            for t in sorted(space.shard_dir.glob(TEMP_PREFIX + "*")):
                if is_stale_temp(t):
                    rep.stale_temps.append(str(t))
            keys_seen: set[bytes] = set()
            for name in list_shards(space.shard_dir):
                path = space.shard_dir / name
                try:
                    blocks = read_blocks(path, space.dim, space.dtype)
                except FileNotFoundError:  # compacted away meanwhile
                    continue
                except StoreError as exc:
                    problems = [str(exc)]
                else:
                    rep.n_shards += 1
                    problems = check_blocks(blocks, str(path))
                    if not problems:
                        for b in blocks:
                            rep.n_rows += len(b.keys)
                            keys_seen.update(b.keys.tolist())
                    del blocks
                if problems:
                    rep.problems.extend(problems)
                    if quarantine:
                        rep.quarantined.extend(str(p) for p in space.quarantine([name]))
            rep.n_vectors += len(keys_seen)
        return rep

    # ------------------------------------------------------------------ compaction
    def compact(self, space_fp: str | None = None, *, target_bytes: int = _COMPACT_TARGET_BYTES) -> dict[str, Any]:
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
        spaces = self.spaces() if space_fp is None else [self.space(_check_fingerprint(space_fp))]
        return {"spaces": [self._compact_space(s, int(target_bytes)) for s in spaces]}

    def _compact_space(self, space: Space, target_bytes: int) -> dict[str, Any]:
        import fcntl

        lock_path = self.root / "locks" / f"compact-{space.fingerprint}.lock"
        with open(lock_path, "a+b") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"another process is compacting space {space.fingerprint[:12]}… of {self.root}; wait for it to finish"
                ) from None
            remove_stale_temps(space.shard_dir)
            names = list_shards(space.shard_dir)
            sizes = {n: _size(space.shard_dir / n) for n in names}
            small = [n for n in names if sizes[n] < target_bytes // 2]
            keep = [n for n in names if n not in small]
            report = {"fingerprint": space.fingerprint, "shards_before": len(names), "shards_merged": 0,
                      "shards_written": 0, "shards_after": len(names), "shards_added_meanwhile": 0, "rows_dropped": 0}
            seen: set[bytes] = set()
            for n in keep:
                for b in read_blocks(space.shard_dir / n, space.dim, space.dtype):
                    seen.update(b.keys.tolist())
            n_small_rows = 0
            has_dup = False
            small_blocks: list[list[Block]] = []
            for n in small:
                blocks = read_blocks(space.shard_dir / n, space.dim, space.dtype)
                small_blocks.append(blocks)
                for b in blocks:
                    n_small_rows += len(b.keys)
            if len(small) < 2:
                for blocks in small_blocks:
                    for b in blocks:
                        has_dup = has_dup or any(k in seen for k in b.keys.tolist())
                if not has_dup:
                    return report
            for blocks in small_blocks:
                for b in blocks:
                    space._check_block(b)
            row_bytes = space.dim * np.dtype(space.dtype).itemsize + KEY_LEN
            written: list[str] = []
            writer: ShardWriter | None = None
            pend_k: list[np.ndarray] = []
            pend_x: list[np.ndarray] = []
            pend_rows = 0

            def flush() -> None:
                nonlocal pend_rows, writer
                if not pend_rows:
                    return
                if writer is None:
                    writer = ShardWriter(space.shard_dir, space._schema)
                writer.write(np.concatenate(pend_k), np.concatenate(pend_x))
                pend_k.clear()
                pend_x.clear()
                pend_rows = 0
                if writer.n_rows * row_bytes >= target_bytes:
                    written.append(writer.commit())
                    writer = None

            try:
                for blocks in small_blocks:
                    for b in blocks:
                        klist = b.keys.tolist()
                        mask = np.fromiter((k not in seen for k in klist), dtype=bool, count=len(klist))
                        # a key repeated inside this block: keep the first
                        for k, m in zip(klist, mask):
                            if m:
                                seen.add(k)
                        if len(set(klist)) != len(klist):
                            mask &= _first_occurrence(b.keys)
                        report["rows_dropped"] += int(len(klist) - mask.sum())
                        if mask.any():
                            pend_k.append(np.ascontiguousarray(b.keys[mask]))
                            pend_x.append(np.ascontiguousarray(b.vectors[mask]))
                            pend_rows += int(mask.sum())
                            if pend_rows * row_bytes >= min(_COMPACT_BATCH_BYTES, target_bytes):
                                flush()
                flush()
                if writer is not None:
                    written.append(writer.commit())
                    writer = None
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            del small_blocks
            # merged rows are durable now; only then remove the inputs
            for n in small:
                try:
                    os.unlink(space.shard_dir / n)
                except FileNotFoundError:
                    pass
            fsync_dir(space.shard_dir)
            report["shards_merged"], report["shards_written"] = len(small), len(written)
            report["shards_after"] = len(names) - len(small) + len(written)
            report["shards_added_meanwhile"] = len(set(list_shards(space.shard_dir)) - set(names) - set(written))
            return report

    # ------------------------------------------------------------------ export
    def export(
        self,
        space_fp: str,
        out_path: str | os.PathLike[str],
        *,
        format: str = "parquet",
        overwrite: bool = False,
        chunk_size: int = 16384,
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
        if format not in ("parquet", "npy"):
            raise ValueError(f"format must be 'parquet' or 'npy'; got {format!r}")
        space = self.space(_check_fingerprint(space_fp))
        out = Path(out_path).expanduser().absolute()
        if out.exists() and not overwrite:
            raise FileExistsError(
                f"{out} exists; choose another output path, remove it, or pass --overwrite (overwrite=True in Python)"
            )
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{out.parent} is not a directory; create it first")
        keys = space._refresh().keys.astype(f"U{KEY_LEN}")
        latest: dict[str, tuple[str, str | None]] = {}
        for it in self.items():
            latest[it.key] = (it.path, it.label)
        paths = [latest.get(k, ("", None))[0] for k in keys]
        labels = [latest.get(k, ("", None))[1] for k in keys]
        n = len(keys)
        if format == "parquet":
            self._export_parquet(space, out, keys, paths, labels, chunk_size, overwrite)
        else:
            self._export_npy(space, out, keys, paths, labels, chunk_size, overwrite)
        return {"path": str(out), "format": format, "n_vectors": n, "dim": space.dim}

    def _export_parquet(self, space, out, keys, paths, labels, chunk_size, overwrite) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                pa.field("key", pa.string(), nullable=False),
                pa.field("path", pa.string()),
                pa.field("label", pa.string()),
                pa.field("vector", pa.list_(pa.float32(), space.dim), nullable=False),
            ],
            metadata={"featurebank.space": space.fingerprint, "featurebank.space_info": json.dumps(space.info)},
        )
        if out.is_dir():
            raise IsADirectoryError(f"{out} is a directory; give a file name for parquet output")
        with atomic_writer(out, "wb") as fh, pq.ParquetWriter(fh, schema) as w:
            for s in range(0, max(len(keys), 1), chunk_size):
                k = keys[s : s + chunk_size]
                X, _ = space.get(k)
                vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), space.dim)
                # Parquet strings are UTF-8: a name that is not is written with \xNN escapes
                p = [printable(x) or None for x in paths[s : s + chunk_size]]
                lab = [None if x is None else printable(x) for x in labels[s : s + chunk_size]]
                w.write_table(
                    pa.table([pa.array(k.tolist(), pa.string()), pa.array(p, pa.string()),
                              pa.array(lab, pa.string()), vec], schema=schema)
                )

    def _export_npy(self, space, out, keys, paths, labels, chunk_size, overwrite) -> None:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} is a file; npy output is a directory")
        with atomic_directory(out) as tmp:
            V = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(len(keys), space.dim))
            for s in range(0, len(keys), chunk_size):
                V[s : s + chunk_size] = space.get(keys[s : s + chunk_size])[0]
            V.flush()
            del V
            np.save(tmp / "keys.npy", np.asarray(keys, dtype=f"U{KEY_LEN}"))
            np.save(tmp / "paths.npy", np.asarray(paths, dtype=str) if paths else np.empty(0, dtype="U1"))
            np.save(tmp / "labels.npy", np.asarray([lab or "" for lab in labels], dtype=str) if labels else np.empty(0, dtype="U1"))
            meta = {"fingerprint": space.fingerprint, "dim": space.dim, "dtype": space.dtype, "info": space.info}
            (tmp / "space.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
    _, first = np.unique(keys, return_index=True)
    mask = np.zeros(len(keys), dtype=bool)
    mask[first] = True
    return mask


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _hash_one(path: str) -> tuple[str | None, tuple | None, str | None]:
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
        return None, None, _describe_os_error(exc)
    key = h.hexdigest()
    same = (st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns) == (st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns)
    # a file that changed while being read is not cached: its key may mix two versions
    row = (path, st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns, st0.st_ino, st0.st_dev, key, hashed_at) if same else None
    return key, row, None


# ============================================================================= opening
def open_store(path: str | os.PathLike[str], *, create: bool = True) -> EmbeddingStore:
    """Open the embedding store in directory ``path``, creating it if ``create`` and it is
    missing or empty.

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
    store = EmbeddingStore(root, meta)
    spaces_dir = root / "spaces"
    for fp in os.listdir(spaces_dir):
        remove_stale_temps(spaces_dir / fp / "shards")
    remove_stale_temps(root)
    return store
