"""Exporting a space's vectors with their keys, paths and labels to open formats (Parquet, npy)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank._atomic import atomic_directory, atomic_writer
from featurebank.store.catalog import printable
from featurebank.store.pages import release_array
from featurebank.store.records import check_fingerprint
from featurebank.store.shards import KEY_LEN

if TYPE_CHECKING:
    from featurebank.store.store import EmbeddingStore

__all__ = ["export_space", "EXPORT_CHUNK"]

#: rows read, looked up in the catalog and written per step: memory stays bounded by one chunk
#: (16,384 x 512 float32 = 32 MiB) whatever the size of the space
EXPORT_CHUNK = 16_384
#: rows gathered between two releases of the shards' mapped pages (see `_chunks`)
RELEASE_ROWS = 128


def export_space(
    store: EmbeddingStore,
    space_fp: str,
    out_path: str | os.PathLike[str],
    *,
    format: str = "parquet",
    overwrite: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """:meth:`EmbeddingStore.export <featurebank.store.EmbeddingStore.export>` (documented there)."""
    if format not in ("parquet", "npy"):
        raise ValueError(f"format must be 'parquet' or 'npy'; got {format!r}")
    space = store.space(check_fingerprint(space_fp))
    space.check_embeddings()
    out = Path(out_path).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; choose another output path, remove it, or pass --overwrite (overwrite=True in Python)"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} is not a directory; create it first")
    catalog = store._require_catalog("export paths and labels")
    chunk_size = chunk_size or EXPORT_CHUNK
    keys = space.key_array()  # S64, memory-mapped for large spaces: no Python string per key
    n = len(keys)
    space.check_batches()  # checksums first, shard by shard: the sorted pass below reads every shard per chunk
    writer = _export_parquet if format == "parquet" else _export_npy
    writer(space, out, _chunks(space, catalog, keys, chunk_size), n)
    return {"path": str(out), "format": format, "n_vectors": n, "dim": space.dim}


def _chunks(space, catalog, keys, chunk_size):
    """(keys <U64, X float32, paths, labels) per chunk of the sorted keys; paths "" and labels
    None where the catalog knows no file."""
    for s in range(0, len(keys), chunk_size):
        k = keys[s : s + chunk_size].astype(f"U{KEY_LEN}")
        # sorted-key order reads rows spread over every shard, and each row read maps its whole
        # page-cache folio (up to 2 MB) into the process: a chunk of 16,384 rows mapped all 2 GB
        # of a 2M-vector store. Read RELEASE_ROWS at a time and let go of the pages in between,
        # so RSS stays near RELEASE_ROWS folios whatever the size of the store.
        X = np.empty((len(k), space.dim), dtype=np.float32)
        for j in range(0, len(k), RELEASE_ROWS):
            X[j : j + RELEASE_ROWS] = space.gather(np.arange(s + j, s + min(len(k), j + RELEASE_ROWS)))
            space.release_pages()
        release_array(keys)  # the key map's pages read so far (memory-mapped for large spaces)
        latest = catalog.items_of_keys(k.tolist())
        yield k, X, [latest.get(x, ("", None))[0] for x in k], [latest.get(x, ("", None))[1] for x in k]


def _export_parquet(space, out, chunks, n) -> None:
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
        for k, X, paths, labels in chunks:
            vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), space.dim)
            # Parquet strings are UTF-8: a name that is not is written with \xNN escapes
            p = [printable(x) or None for x in paths]
            lab = [None if x is None else printable(x) for x in labels]
            w.write_table(
                pa.table([pa.array(k.tolist(), pa.string()), pa.array(p, pa.string()),
                          pa.array(lab, pa.string()), vec], schema=schema)
            )


def _export_npy(space, out, chunks, n) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; npy output is a directory")
    with atomic_directory(out) as tmp:
        # appended chunk by chunk with plain writes (not a writable memory map, whose dirty
        # pages would count in the process's RSS up to the size of the output)
        paths, labels = _TextColumn(tmp / ".paths"), _TextColumn(tmp / ".labels")
        with open(tmp / "vectors.npy", "wb") as fv, open(tmp / "keys.npy", "wb") as fk:
            _npy_header(fv, np.float32, (n, space.dim))
            _npy_header(fk, f"U{KEY_LEN}", (n,))
            s = 0
            for k, X, p, lab in chunks:
                fv.write(np.ascontiguousarray(X, dtype=np.float32).data)
                fk.write(np.ascontiguousarray(k, dtype=f"U{KEY_LEN}").data)
                paths.append(p)
                labels.append([x or "" for x in lab])
                s += len(k)
            if s != n:  # pragma: no cover - the space changed under the export
                raise RuntimeError(f"exported {s} rows, expected {n}; the space changed during the export, run it again")
        paths.finish(tmp / "paths.npy")
        labels.finish(tmp / "labels.npy")
        meta = {"fingerprint": space.fingerprint, "dim": space.dim, "dtype": space.dtype, "info": space.info}
        (tmp / "space.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _npy_header(fh, dtype, shape: tuple[int, ...]) -> None:
    """Write the .npy header of a C-order array of ``dtype`` and ``shape`` whose bytes follow."""
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )


class _TextColumn:
    """A unicode .npy column written in bounded memory: each chunk is parked in a file of its
    own (its width unknown until the last chunk), then all are streamed into one array of the
    widest width and the parts deleted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.parts = 0
        self.rows = 0
        self.width = 1

    def append(self, values) -> None:
        a = np.asarray(values, dtype=str)
        if a.size == 0:
            return
        self.width = max(self.width, a.dtype.itemsize // 4)
        np.save(self.folder / f"{self.parts}.npy", a)
        self.parts += 1
        self.rows += len(a)

    def finish(self, path: Path) -> None:
        dtype = np.dtype(f"<U{self.width}")
        with open(path, "wb") as fh:
            _npy_header(fh, dtype, (self.rows,))
            for i in range(self.parts):
                fh.write(np.ascontiguousarray(np.load(self.folder / f"{i}.npy"), dtype=dtype).data)
                (self.folder / f"{i}.npy").unlink()
        self.folder.rmdir()
