"""Shard files: Arrow IPC (Feather v2) files holding ``key`` + ``vector`` columns.

One shard is an uncompressed Arrow IPC *file* (so it can be memory-mapped, zero copy) with

* ``key``    : ``string``, the 64-char lowercase sha256 hex of the image file bytes
* ``vector`` : ``fixed_size_list<float32 | float16>[dim]``

Schema metadata carries ``featurebank.space`` (the space fingerprint) and
``featurebank.store_format``; each record batch carries two checksums of its key and vector
bytes in its custom metadata:

* ``featurebank.sum2d`` (:func:`batch_sum2d`), checked the first time a reader touches the
  batch (:meth:`Block.verify`), so damaged vectors are never served. It runs at memory speed
  (two numpy integer reductions, ~22 ms per 512 MB); zlib's CRC-32 (~6.5 GB/s) made a
  verified load 1.4x slower and sha256 (~1.9 GB/s) would be ~2x (benchmarks/RESULTS.md);
* ``featurebank.sha256``, the cryptographic digest, which ``store verify``
  (:func:`check_blocks`) recomputes as well.

Shards written before ``featurebank.sum2d`` existed are verified on read with their sha256.
Both are plain metadata entries: readers that do not know them ignore them.

Plain pyarrow reads a shard with ``pyarrow.feather.read_table(path)`` or
``pyarrow.ipc.open_file(path).read_all()``.

Writes are atomic (:mod:`featurebank._atomic`): the file is written under a dot-prefixed
temporary name in the same directory, flushed, fsynced, renamed into place, and the directory
is fsynced. Readers list only names that do not start with a dot, so a writer killed mid-write
leaves at most a temporary file that nobody reads;
:func:`featurebank._atomic.remove_stale_temps` deletes those whose writer is gone.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from featurebank._atomic import AtomicFile
from featurebank.errors import StoreError

SHARD_SUFFIX = ".arrow"
KEY_LEN = 64
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
_HEX_LUT[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


# ----------------------------------------------------------------------------- files
def file_size(path: Path) -> int:
    """Size in bytes of ``path``; 0 if it vanished (a concurrent compaction removed it)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def list_shards(directory: Path) -> list[str]:
    """Names of committed shard files in ``directory``, oldest first (names sort by time)."""
    try:
        names = [e.name for e in os.scandir(directory) if e.name.endswith(SHARD_SUFFIX) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    names.sort()
    return names


def new_shard_name() -> str:
    # time first so that names sort by commit time; pid + random so concurrent writers
    # (threads, processes, hosts) never pick the same name.
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"


# ----------------------------------------------------------------------------- keys
def keys_to_array(keys: Iterable[str] | np.ndarray, what: str = "keys") -> np.ndarray:
    """Validate keys and return them as an ``S64`` array (ASCII bytes), shape (n,).

    Raises ValueError naming the first bad key: keys must be 64-char lowercase sha256 hex.
    """
    if isinstance(keys, np.ndarray) and keys.dtype.kind in ("S", "U"):
        arr = keys.reshape(-1)
    else:
        if isinstance(keys, (str, bytes)):
            raise ValueError(f"{what} must be a sequence of sha256 hex strings, not a single string")
        keys = list(keys)
        for k in keys:
            if not isinstance(k, (str, bytes, np.str_, np.bytes_)):
                raise ValueError(f"{what} must be sha256 hex strings; got {type(k).__name__} {k!r}")
        arr = np.asarray(keys)
        if arr.size == 0:
            return np.empty(0, dtype=f"S{KEY_LEN}")
    if arr.size and arr.dtype.itemsize // (4 if arr.dtype.kind == "U" else 1) > KEY_LEN:
        long_rows = np.flatnonzero(np.char.str_len(arr) > KEY_LEN)
        if long_rows.size:
            bad = int(long_rows[0])
            raise ValueError(f"{what}[{bad}] = {arr[bad]!r} is not a sha256 hex digest (64 lowercase hex characters)")
    if arr.dtype.kind == "U":
        try:
            arr = np.char.encode(arr, "ascii")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{what} must be sha256 hex digests (64 lowercase hex characters); found non-ASCII text") from exc
    arr = np.ascontiguousarray(arr.astype(f"S{KEY_LEN}")) if arr.dtype != np.dtype(f"S{KEY_LEN}") else np.ascontiguousarray(arr)
    if arr.size:
        raw = arr.view(np.uint8).reshape(-1, KEY_LEN)
        bad_rows = np.flatnonzero((_HEX_LUT[raw] == 255).any(axis=1))
        if bad_rows.size:
            bad = int(bad_rows[0])
            raise ValueError(
                f"{what}[{bad}] = {arr[bad].decode('ascii', 'replace')!r} is not a sha256 hex digest "
                "(64 lowercase hex characters); compute keys with EmbeddingStore.hash_files"
            )
    return arr


def key_prefix64(keys: np.ndarray) -> np.ndarray:
    """The first 16 hex characters of ``S64`` keys as uint64, shape (n,). Order-preserving."""
    raw = keys.view(np.uint8).reshape(-1, KEY_LEN)[:, :16]
    nib = _HEX_LUT[raw].astype(np.uint64)
    out = np.zeros(len(keys), dtype=np.uint64)
    for i in range(16):
        out |= nib[:, i] << np.uint64(4 * (15 - i))
    return out


# ----------------------------------------------------------------------------- writing
def vector_type(dtype: str, dim: int) -> pa.DataType:
    return pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim)


def shard_schema(space_fp: str, dtype: str, dim: int, format_version: int) -> pa.Schema:
    return pa.schema(
        [pa.field("key", pa.string(), nullable=False), pa.field("vector", vector_type(dtype, dim), nullable=False)],
        metadata={"featurebank.space": space_fp, "featurebank.store_format": str(format_version)},
    )


def batch_checksum(keys: np.ndarray, X: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(keys)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(X)).cast("B"))
    return h.hexdigest()


_LINE = 4096  # bytes per line of the 2-D sums: 512 lanes of 8 bytes


def _sums2d(buf: np.ndarray) -> bytes:
    """The bytes of ``buf`` as lines of 4 KiB, each line 512 little-endian uint64 lanes
    (the last line zero-padded): the sum of each line and the sum of each lane, mod 2**64,
    plus the byte length."""
    raw = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    k = len(raw) // _LINE
    main = raw[: k * _LINE].view("<u8").reshape(k, _LINE // 8)
    tail = np.zeros(_LINE, np.uint8)
    tail[: len(raw) - k * _LINE] = raw[k * _LINE :]
    with np.errstate(over="ignore"):
        lines = main.sum(axis=1, dtype=np.uint64)
        lanes = main.sum(axis=0, dtype=np.uint64)
    return lines.tobytes() + lanes.tobytes() + tail.tobytes() + len(raw).to_bytes(8, "little")


def batch_sum2d(keys: np.ndarray, X: np.ndarray) -> str:
    """The read-time checksum of a batch: sha256 (first 32 hex digits) of the 2-D sums of its
    key bytes and of its vector bytes.

    Each byte string is laid out as lines of 4 KiB, each line as 512 uint64 lanes, and both the
    line sums and the lane sums (mod 2**64) enter the digest. A change confined to one line or
    to one lane is always detected (a nonzero change of one word changes its line's sum, and
    changes to several words of one line change their distinct lanes); so is a pair of
    changed words anywhere, and an 8-byte overwrite, a zeroed page or a truncated tail. Two
    rows swapped are detected unless their word sums are equal mod 2**64. Changes that cancel
    in every line and every lane at once (+d, -d, -d, +d at the corners of a rectangle) are
    not: ``store verify`` recomputes the sha256 as well. Costs two memory-speed passes."""
    return hashlib.sha256(_sums2d(keys) + _sums2d(X)).hexdigest()[:32]


def make_batch(keys: np.ndarray, X: np.ndarray, schema: pa.Schema) -> tuple[pa.RecordBatch, dict[str, str]]:
    """keys : (n,) S64; X : (n, dim) in the space dtype, C-contiguous."""
    n, dim = X.shape
    key_arr = pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(np.arange(0, (n + 1) * KEY_LEN, KEY_LEN, dtype=np.int32)), pa.py_buffer(keys)]
    )
    values = pa.array(X.reshape(-1), type=schema.field("vector").type.value_type)
    vec = pa.FixedSizeListArray.from_arrays(values, dim)
    batch = pa.record_batch([key_arr, vec], schema=schema)
    return batch, {"featurebank.sha256": batch_checksum(keys, X), "featurebank.sum2d": batch_sum2d(keys, X)}


class ShardWriter:
    """Streams record batches into one shard, committed atomically by :meth:`commit`
    (:class:`featurebank._atomic.AtomicFile`: the shard gets its name, which sorts by
    commit time, when it is renamed into place).

    >>> w = ShardWriter(shard_dir, schema); w.write(keys, X); name = w.commit()
    """

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = schema
        self._out = AtomicFile(directory, suffix=SHARD_SUFFIX)
        self._writer = ipc.new_file(self._out.file, schema)
        self.n_rows = 0

    def write(self, keys: np.ndarray, X: np.ndarray) -> None:
        if len(keys) == 0:
            return
        batch, meta = make_batch(keys, X, self.schema)
        self._writer.write_batch(batch, custom_metadata=meta)
        self.n_rows += len(keys)

    def commit(self) -> str:
        try:
            self._writer.close()
        except BaseException:
            self._out.abort()
            raise
        name = new_shard_name()
        self._out.commit(self.directory / name)
        return name

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file is removed below
            pass
        self._out.abort()


def write_shard(directory: Path, schema: pa.Schema, keys: np.ndarray, X: np.ndarray) -> str:
    """Write one shard atomically; returns its file name."""
    w = ShardWriter(directory, schema)
    try:
        w.write(keys, X)
        return w.commit()
    except BaseException:
        w.abort()
        raise


def write_shard_blocks(directory: Path, schema: pa.Schema, blocks: "list[Block]") -> str:
    """Write the rows of ``blocks`` (one record batch each) as one new shard, atomically."""
    w = ShardWriter(directory, schema)
    try:
        for b in blocks:
            w.write(b.keys, b.vectors)
        return w.commit()
    except BaseException:
        w.abort()
        raise


# ----------------------------------------------------------------------------- reading
@dataclass
class Block:
    """One record batch of a shard, memory-mapped.

    keys : (n,) S64 view into the file; vectors : (n, dim) float32/float16 view into the file;
    checksum, sum2d : the batch's ``featurebank.sha256`` / ``featurebank.sum2d`` (None if absent).
    """

    shard: str
    batch: int
    keys: np.ndarray
    vectors: np.ndarray
    checksum: str | None
    sum2d: str | None = None
    #: result of :meth:`verify`, computed once per opened shard (None: not checked yet)
    intact: bool | None = field(default=None, compare=False)
    #: (address, length) of the shard's whole read-only file mapping (:mod:`featurebank.store.pages`)
    mapping: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    def verify(self) -> bool:
        """True if the batch's bytes match its checksum (:func:`batch_sum2d`, or sha256 for
        shards written without one; a batch with neither is not intact). Computed once, then
        remembered: the mapping is read-only, so the answer cannot change while it lives."""
        if self.intact is None:
            if self.sum2d is not None:
                self.intact = batch_sum2d(self.keys, self.vectors) == self.sum2d
            elif self.checksum is not None:
                self.intact = batch_checksum(self.keys, self.vectors) == self.checksum
            else:
                self.intact = False
        return self.intact


def _string_column_as_s64(col: pa.Array, where: str) -> np.ndarray:
    if col.type != pa.string():
        raise StoreError(f"{where}: column 'key' has type {col.type}, expected string")
    n = len(col)
    if n == 0:
        return np.empty(0, dtype=f"S{KEY_LEN}")
    if col.null_count:
        raise StoreError(f"{where}: column 'key' has {col.null_count} nulls")
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=col.offset + n + 1)[col.offset :]
    if not np.all(np.diff(offsets) == KEY_LEN):
        raise StoreError(f"{where}: column 'key' holds strings that are not {KEY_LEN} characters long")
    data = col.buffers()[2]
    return np.frombuffer(data, dtype=f"S{KEY_LEN}", count=n, offset=int(offsets[0]))


def read_blocks(path: Path, dim: int, dtype: str) -> list[Block]:
    """Memory-map a shard and return its record batches as numpy views.

    The file descriptor is closed before returning; the mapping stays alive as long as the
    arrays do, so a shard deleted by a concurrent compaction keeps serving this reader.
    Raises FileNotFoundError if the shard vanished, StoreError if it does not parse or
    its schema does not match (dim, dtype).
    """
    where = str(path)
    try:
        mm = pa.memory_map(str(path))
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not path.exists():
            raise FileNotFoundError(str(path)) from exc
        raise StoreError(f"{where}: cannot open shard: {exc}") from exc
    try:
        whole = mm.read_buffer()  # zero-copy: the mapping itself (page-aligned base)
        mapping = (whole.address, whole.size) if whole.size else None
        del whole
        mm.seek(0)
        try:
            reader = ipc.open_file(mm)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{where}: not a readable Arrow IPC file (truncated or corrupt): {exc}") from exc
        want = vector_type(dtype, dim)
        names = reader.schema.names
        if names[:2] != ["key", "vector"] or reader.schema.field("vector").type != want:
            raise StoreError(
                f"{where}: schema {reader.schema.field('vector').type if 'vector' in names else names} "
                f"does not match the space (vector {want})"
            )
        blocks = []
        for i in range(reader.num_record_batches):
            try:
                batch, meta = reader.get_batch_with_custom_metadata(i)
            except (pa.ArrowInvalid, OSError) as exc:
                raise StoreError(f"{where}: record batch {i} is unreadable (truncated or corrupt): {exc}") from exc
            keys = _string_column_as_s64(batch.column(0), where)
            vcol = batch.column(1)
            if vcol.null_count:
                raise StoreError(f"{where}: column 'vector' has {vcol.null_count} nulls")
            flat = vcol.flatten().to_numpy(zero_copy_only=True)
            vectors = flat.reshape(len(batch), dim)
            checksum = sum2d = None
            if meta is not None:
                raw = meta.get(b"featurebank.sha256")
                checksum = raw.decode("ascii", "replace") if raw is not None else None
                raw = meta.get(b"featurebank.sum2d")
                sum2d = raw.decode("ascii", "replace") if raw is not None else None
            blocks.append(Block(shard=path.name, batch=i, keys=keys, vectors=vectors, checksum=checksum, sum2d=sum2d,
                                mapping=mapping))
        return blocks
    finally:
        mm.close()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has the executor object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def verify_ahead(blocks: list[Block]) -> dict[int, Future]:
    """Start checking the not yet verified ``blocks`` on a small thread pool (numpy's
    reductions release the GIL), in the given order; returns {id(block): future}. A reader
    that copies block after block waits only for the block it is about to copy, so the
    checks of the next blocks overlap its copying instead of adding to it. A single block is
    left to the caller (checked inline)."""
    todo = [b for b in blocks if b.intact is None]
    if len(todo) < 2:
        return {}
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="fb-verify")
        return {id(b): _pool.submit(b.verify) for b in todo}


def check_blocks(blocks: list[Block], where: str) -> list[str]:
    """Deep checks of a parsed shard: key syntax, finite vectors, checksums. Returns problems."""
    problems = []
    for b in blocks:
        label = f"{where} batch {b.batch}"
        try:
            keys_to_array(b.keys, what="key")
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
        if b.vectors.size and not np.isfinite(b.vectors).all():
            n_bad = int((~np.isfinite(b.vectors)).any(axis=1).sum())
            problems.append(f"{label}: {n_bad} vectors contain NaN or inf")
        if b.checksum is None:
            problems.append(f"{label}: no featurebank.sha256 checksum in batch metadata")
        elif batch_checksum(b.keys, b.vectors) != b.checksum:
            problems.append(f"{label}: sha256 checksum mismatch (the file was modified or corrupted)")
        elif b.sum2d is not None and not b.verify():
            problems.append(f"{label}: sum2d checksum mismatch (the batch metadata was modified or corrupted)")
    return problems


def iter_rows_chunks(blocks: list[Block], chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for b in blocks:
        for s in range(0, len(b.keys), chunk):
            yield b.keys[s : s + chunk], b.vectors[s : s + chunk]
