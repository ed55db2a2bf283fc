"""Exporting a space's vectors with their keys, paths and labels to open formats (Parquet, npy)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank._atomic import atomic_directory, atomic_writer
from featurebank.store.catalog import printable
from featurebank.store.records import check_fingerprint
from featurebank.store.shards import KEY_LEN

if TYPE_CHECKING:
    from featurebank.store.store import EmbeddingStore

__all__ = ["export_space", "EXPORT_CHUNK"]

#: rows read, looked up in the catalog and written per step: memory stays bounded by one chunk
#: (16,384 x 512 float32 = 32 MiB) whatever the size of the space
EXPORT_CHUNK = 16_384


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
    writer = _export_parquet if format == "parquet" else _export_npy
    writer(space, out, _chunks(space, catalog, keys, chunk_size), n)
    return {"path": str(out), "format": format, "n_vectors": n, "dim": space.dim}


def _chunks(space, catalog, keys, chunk_size):
    """(keys <U64, X float32, paths, labels) per chunk of the sorted keys; paths "" and labels
    None where the catalog knows no file."""
    for s in range(0, len(keys), chunk_size):
        k = keys[s : s + chunk_size].astype(f"U{KEY_LEN}")
        X = space.gather(np.arange(s, s + len(k)))
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
        V = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, space.dim))
        K = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=f"U{KEY_LEN}", shape=(n,))
        paths: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        s = 0
        for k, X, p, lab in chunks:
            V[s : s + len(k)] = X
            K[s : s + len(k)] = k
            # per chunk as compact unicode arrays (no Python string per row kept)
            paths.append(np.asarray(p, dtype=str))
            labels.append(np.asarray([x or "" for x in lab], dtype=str))
            s += len(k)
        V.flush()
        K.flush()
        del V, K
        np.save(tmp / "paths.npy", np.concatenate(paths) if paths else np.empty(0, dtype="U1"))
        np.save(tmp / "labels.npy", np.concatenate(labels) if labels else np.empty(0, dtype="U1"))
        meta = {"fingerprint": space.fingerprint, "dim": space.dim, "dtype": space.dtype, "info": space.info}
        (tmp / "space.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
