"""Space: the vectors of one embedding space in a store (reading, verified loads, adding
shards, quarantine), and its ``space.json`` description."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from featurebank._atomic import fsync_dir, write_bytes_atomic
from featurebank._validation import check_finite_rows
from featurebank.artifact import OutputSpec
from featurebank.errors import StoreError
from featurebank.store import index as keymap
from featurebank.store.index import KeyIndex
from featurebank.store.records import DTYPES, FORMAT_VERSION
from featurebank.store.pages import release_pages
from featurebank.store.shards import (KEY_LEN, Block, check_blocks, keys_to_array, list_shards, read_blocks,
                                      shard_schema, verify_ahead, write_shard, write_shard_blocks)

if TYPE_CHECKING:
    from featurebank.store.store import EmbeddingStore

__all__ = ["Space", "read_space_meta", "create_space_meta"]

_FP16_MAX = float(np.finfo(np.float16).max)


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

    @property
    def output(self) -> OutputSpec | None:
        """The model card output whose vectors this space holds (from ``info["output"]``,
        which ``embed`` records); None for a space created without one."""
        d = self.info.get("output")
        return OutputSpec.from_dict(d) if isinstance(d, Mapping) else None

    @property
    def holds_activations(self) -> bool:
        """True when the space caches unpooled activation maps (stored flattened, C*H*W,
        the shape in ``info["output"]["shape"]``) for fine-tuning, not embeddings."""
        out = self.output
        return out is not None and out.is_activation_map

    def check_embeddings(self) -> None:
        """Raise ActivationSpaceError when the space holds activation maps: indexes, search,
        export and classifiers call this before reading vectors."""
        out = self.output
        if out is not None:
            out.check_embedding(self.fingerprint)

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
        index = keymap.load_keymap(self.path, names, opened)  # memory-mapped, or extended in memory
        if index is None:
            index = KeyIndex([b for n in names for b in opened[n]])
        if index.n_rows >= keymap.KEYMAP_MIN_ROWS and not isinstance(index.keys, np.memmap):
            keymap.save_keymap(self.path, names, opened, index)  # built or extended: persist it
        self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self._refresh())

    def keys(self) -> np.ndarray:
        """Every key in the space, deduplicated: ndarray of shape (n,), dtype ``<U64``, sorted.

        Raises StoreError naming the shard if a key's bytes were damaged on disk."""
        index = self._refresh()
        try:
            return index.keys.astype(f"U{KEY_LEN}")
        except UnicodeDecodeError:  # bytes that are not even ASCII: find the batch that holds them
            damaged = self.damaged_shards() or ["?"]
            raise StoreError(
                f"{self.shard_dir / damaged[0]}: keys do not match their checksum (the file was modified or "
                f"damaged on disk); run `featurebank store verify {self.store.root} --quarantine` to move it "
                "aside (its images are then embedded again)"
            ) from None

    def key_array(self) -> np.ndarray:
        """Every key in the space, deduplicated and sorted, as fixed-width bytes: ndarray of
        shape (n,), dtype ``S64`` (memory-mapped for a persisted key map). No Python string
        per key: use this, not :meth:`keys`, for large spaces."""
        return self._refresh().keys

    def iter_chunks(self, chunk_rows: int = 65_536, *, verify: bool = True, dtype: str | None = "float32"):
        """Stream the space's vectors in storage order, each key once (the oldest row of a
        repeated key), in bounded memory.

        Yields (keys, X): keys ndarray (m,) ``S64``; X ndarray (m, dim), ``dtype`` (None: the
        on-disk dtype, a zero-copy view of the mapping when possible), m <= chunk_rows. Each
        record batch is checked against its checksum once per open (as :meth:`get` does).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer; got {chunk_rows!r}")
        index = self._refresh()
        masks = index.row_mask()
        for i, block in enumerate(index.blocks):
            if verify:
                self._check_block(block)
            keep = None if masks is None else masks[i]
            for s in range(0, len(block.keys), chunk_rows):
                k, X = block.keys[s : s + chunk_rows], block.vectors[s : s + chunk_rows]
                if keep is not None:
                    sel = keep[s : s + chunk_rows]
                    if not sel.all():
                        k, X = k[sel], X[sel]
                if len(k):
                    yield k, (X if dtype is None else X.astype(dtype, copy=False))
            release_pages([block])  # its shard's pages leave RSS: one shard resident at a time

    def gather(self, positions: np.ndarray, *, verify: bool = True, dtype: str = "float32") -> np.ndarray:
        """Vectors at ``positions`` of :meth:`key_array` (int array, shape (m,)): ndarray of
        shape (m, dim), ``dtype`` (the space's own: no cast). For samples and re-ranking."""
        index = self._refresh()
        positions = np.asarray(positions, dtype=np.int64)
        check_memory(len(positions) * self.dim * 4, f"loading {len(positions):,} vectors of space {self.fingerprint[:12]}…")
        X = np.empty((len(positions), self.dim), dtype=dtype)
        index.gather(positions, X, np.arange(len(positions)), check=self._check_block if verify else None)
        return X

    def check_batches(self) -> None:
        """Verify each record batch in use (once per open), each shard's pages released after it:
        a later pass in another order (export) reads verified batches, never all shards at once."""
        index = self._refresh()
        for block in index.blocks_of(np.arange(len(index))):
            self._check_block(block)
            release_pages([block])

    def release_pages(self) -> None:
        """Drop this process's resident pages of the shard mappings (:mod:`featurebank.store.pages`)."""
        release_pages(blocks[0] for blocks in self._blocks.values() if blocks)  # one mapping per shard

    def positions(self, keys: Iterable[str] | np.ndarray) -> np.ndarray:
        """ndarray of shape (n,), int64: where each of ``keys`` sits in :meth:`key_array` (what
        :meth:`gather` takes), -1 where the space lacks it."""
        return self._refresh().lookup(keys_to_array(keys))

    def contains(self, keys: Iterable[str] | np.ndarray) -> np.ndarray:
        """ndarray of shape (n,), bool: which of ``keys`` have a vector in this space."""
        return self.positions(keys) >= 0

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
        check_memory(len(q) * self.dim * 4, f"loading {len(q):,} vectors of space {self.fingerprint[:12]}…")
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
        check_finite_rows(X32, fix="refusing to store them: the model produced broken vectors for these images",
                          keys=q)
        if self.dtype == "float16":
            peak = float(np.abs(X32).max()) if X32.size else 0.0
            if peak > _FP16_MAX:
                raise ValueError(
                    f"X has values up to {peak:.6g}, beyond float16's range ({_FP16_MAX:.0f}); "
                    "this space stores float16: create the space with dtype='float32'"
                )
        path_list = label_list = None
        if paths is not None:
            self.store._require_catalog("record items")  # before any vector is written
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


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(n_bytes: int, what: str) -> None:
    """Refuse (StoreError, with how to proceed) an allocation that would not fit in memory."""
    avail = available_memory()
    if avail is not None and n_bytes > avail:
        raise StoreError(
            f"{what} needs {n_bytes / 2**30:.1f} GiB as float32 but only {avail / 2**30:.1f} GiB of memory is "
            "available; load a seeded sample of the keys, read the space in chunks (Space.iter_chunks, "
            "e.g. for a partial_fit classifier such as SGDClassifier), or export it with "
            "`featurebank store export` and memory-map the .npy"
        )


def read_space_meta(root: Path, fp: str) -> dict[str, Any] | None:
    """The ``space.json`` of space ``fp`` in the store at ``root``; None if there is none.
    Raises StoreError if it is unreadable or does not describe ``fp``."""
    p = root / "spaces" / fp / "space.json"
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{p}: unreadable space description: {exc}") from exc
    if meta.get("fingerprint") != fp or meta.get("dtype") not in DTYPES or not isinstance(meta.get("dim"), int):
        raise StoreError(f"{p}: space description is corrupt (fingerprint/dim/dtype)")
    return meta


def create_space_meta(root: Path, fp: str, dim: int, dtype: str, info: Mapping[str, Any] | None) -> dict[str, Any]:
    """Create space ``fp``'s folder and ``space.json`` (exclusively: when another process
    created it first, its description is returned and stands)."""
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
    d = root / "spaces" / fp
    (d / "shards").mkdir(parents=True, exist_ok=True)
    blob = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    # exclusive: if another process created it first, theirs stands and is checked
    try:
        write_bytes_atomic(d / "space.json", blob, exclusive=True)
    except FileExistsError:
        existing = read_space_meta(root, fp)
        assert existing is not None  # the link failed because it exists
        return existing
    return meta
