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

__all__ = ["export_space"]


def export_space(
    store: EmbeddingStore,
    space_fp: str,
    out_path: str | os.PathLike[str],
    *,
    format: str = "parquet",
    overwrite: bool = False,
    chunk_size: int = 16384,
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
    keys = space.keys()
    latest: dict[str, tuple[str, str | None]] = {}
    for it in store.items():
        latest[it.key] = (it.path, it.label)
    paths = [latest.get(k, ("", None))[0] for k in keys]
    labels = [latest.get(k, ("", None))[1] for k in keys]
    n = len(keys)
    if format == "parquet":
        _export_parquet(space, out, keys, paths, labels, chunk_size)
    else:
        _export_npy(space, out, keys, paths, labels, chunk_size)
    return {"path": str(out), "format": format, "n_vectors": n, "dim": space.dim}


def _export_parquet(space, out, keys, paths, labels, chunk_size) -> None:
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


def _export_npy(space, out, keys, paths, labels, chunk_size) -> None:
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
