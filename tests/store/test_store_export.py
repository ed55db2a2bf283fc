"""Export to Parquet and npy: readable without featurebank, written whole or not at all."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from store_helpers import FP_A, make_keys, make_vectors

from featurebank.store import open_store


def test_export_parquet_and_npy_readable_without_featurebank(store, tmp_path):
    space = store.space(FP_A, dim=5, dtype="float16", info={"decode_mode": "fast"})
    keys, X = make_keys(30), make_vectors(30, 5)
    paths = [str(tmp_path / f"img{i}.jpg") for i in range(30)]
    labels = ["cat" if i % 2 else "dog" for i in range(30)]
    space.add(keys[:20], X[:20], paths=paths[:20], labels=labels[:20])
    space.add(keys[20:], X[20:])  # no paths known for these
    expected = X.astype(np.float16).astype(np.float32)
    order = np.argsort(keys)

    res = store.export(FP_A, tmp_path / "v.parquet")
    assert res == {"path": str(tmp_path / "v.parquet"), "format": "parquet", "n_vectors": 30, "dim": 5}
    t = pq.read_table(tmp_path / "v.parquet")
    assert t.column_names == ["key", "path", "label", "vector"]
    assert t["key"].to_pylist() == [keys[i] for i in order]
    np.testing.assert_array_equal(np.stack(t["vector"].to_numpy(zero_copy_only=False)), expected[order])
    by_key = dict(zip(t["key"].to_pylist(), zip(t["path"].to_pylist(), t["label"].to_pylist())))
    assert by_key[keys[3]] == (paths[3], "cat") and by_key[keys[25]] == (None, None)

    store.export(FP_A, tmp_path / "npy", format="npy")
    V = np.load(tmp_path / "npy" / "vectors.npy", allow_pickle=False)
    K = np.load(tmp_path / "npy" / "keys.npy", allow_pickle=False)
    L = np.load(tmp_path / "npy" / "labels.npy", allow_pickle=False)
    assert V.dtype == np.float32 and V.shape == (30, 5)
    assert K.tolist() == [keys[i] for i in order]
    np.testing.assert_array_equal(V, expected[order])
    assert L[K.tolist().index(keys[4])] == "dog"
    assert json.loads((tmp_path / "npy" / "space.json").read_text())["info"] == {"decode_mode": "fast"}

    with pytest.raises(FileExistsError, match=r"exists; choose another output path, remove it, or pass --overwrite \(overwrite=True in Python\)"):
        store.export(FP_A, tmp_path / "v.parquet")
    with pytest.raises(ValueError, match="format must be 'parquet' or 'npy'; got 'csv'"):
        store.export(FP_A, tmp_path / "v.csv", format="csv")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _temps(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".tmp-"))


def test_overwriting_replaces_the_output_whole_and_refuses_the_wrong_kind(store, tmp_path):
    space = store.space(FP_A, dim=4)
    space.add(make_keys(3), make_vectors(3, 4))
    out = tmp_path / "npy"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    store.export(FP_A, out, format="npy", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keys.npy", "labels.npy", "paths.npy", "space.json", "vectors.npy"]
    with pytest.raises(IsADirectoryError, match=r"npy is a directory; give a file name for parquet output"):
        store.export(FP_A, out, overwrite=True)
    (tmp_path / "v.parquet").write_bytes(b"old")
    with pytest.raises(NotADirectoryError, match=r"v\.parquet is a file; npy output is a directory"):
        store.export(FP_A, tmp_path / "v.parquet", format="npy", overwrite=True)
    assert (tmp_path / "v.parquet").read_bytes() == b"old" and len(np.load(out / "keys.npy")) == 3
    assert _temps(tmp_path) == []


def test_an_export_that_fails_midway_leaves_the_previous_output(store, tmp_path):
    from featurebank.errors import StoreError

    space = store.space(FP_A, dim=4)
    keys, X = make_keys(40), make_vectors(40, 4)
    space.add(keys[:20], X[:20])
    space.add(keys[20:], X[20:])
    store.export(FP_A, tmp_path / "v.parquet")
    store.export(FP_A, tmp_path / "npy", format="npy")
    before = (tmp_path / "v.parquet").read_bytes(), (tmp_path / "npy" / "vectors.npy").read_bytes()
    shard = space.shards()[1]
    data = bytearray(shard.read_bytes())
    at = bytes(data).index(X[25].tobytes())
    data[at] ^= 0xFF  # one damaged byte in a vector: its record batch fails its checksum
    shard.write_bytes(bytes(data))
    again = open_store(store.root)  # a fresh reader of the damaged shard
    for fmt, out in (("parquet", tmp_path / "v.parquet"), ("npy", tmp_path / "npy")):
        with pytest.raises(StoreError, match=r"vectors do not match their checksum"):
            again.export(FP_A, out, format=fmt, overwrite=True, chunk_size=10)
    assert ((tmp_path / "v.parquet").read_bytes(), (tmp_path / "npy" / "vectors.npy").read_bytes()) == before
    assert _temps(tmp_path) == []
    again.close()
