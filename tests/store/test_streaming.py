"""Issue #16 in the store: the persisted key map (round trip, growth, compaction, stores written
before it), streaming reads (iter_chunks, export and verify of a store larger than one chunk),
checksums once per batch per open, and the clear refusal of a load larger than memory."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from store_helpers import FP_A, make_keys, make_vectors

import featurebank.store.export as export_mod
import featurebank.store.index as keymap_mod
import featurebank.store.pages as pages_mod
import featurebank.store.shards as shards_mod
import featurebank.store.space as space_mod
from featurebank.errors import StoreError
from featurebank.store import open_store


def filled(root, n_parts=3, per=40, dim=6, dup=True):
    keys, X = make_keys(n_parts * per), make_vectors(n_parts * per, dim)
    with open_store(root) as store:
        space = store.space(FP_A, dim=dim, dtype="float32")
        for p in range(n_parts):
            space.add(keys[p * per : (p + 1) * per], X[p * per : (p + 1) * per])
        if dup:  # rows of keys already stored (a second writer): readers keep the oldest
            space.add(keys[:3], X[:3] + 1)
    return keys, X


def test_key_map_is_persisted_memory_mapped_extended_and_rebuilt_after_compaction(tmp_path, monkeypatch):
    monkeypatch.setattr(keymap_mod, "KEYMAP_MIN_ROWS", 10)
    keys, X = filled(tmp_path / "s")
    kdir = tmp_path / "s" / "spaces" / FP_A / "keymap"
    with open_store(tmp_path / "s") as store:
        assert len(store.space(FP_A)) == 120  # the first read builds the map and saves it
    meta = json.loads((kdir / "keymap.json").read_text())
    assert meta["n_keys"] == 120 and meta["n_rows"] == 123 and len(meta["shards"]) == 4
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A)
        index = space._refresh()
        assert isinstance(index.keys, np.memmap)  # opened, not rebuilt
        got, found = space.get(keys[::-1])
        assert found.all()
        np.testing.assert_array_equal(got, X[::-1])  # the oldest row of the 3 repeated keys
        more_k, more_x = make_keys(5, start=1000), make_vectors(5, 6, seed=9)
        space.add(more_k, more_x)
    with open_store(tmp_path / "s") as store:  # a new shard: the map is extended, then saved again
        space = store.space(FP_A)
        got, found = space.get(keys[:2] + more_k)
        assert found.all() and len(space) == 125
        np.testing.assert_array_equal(got, np.vstack([X[:2], more_x]))
        assert json.loads((kdir / "keymap.json").read_text())["n_keys"] == 125
        store.compact(FP_A)  # moves every row into a new shard: the map's shards are gone
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A)
        assert len(space) == 125 and space._refresh().n_duplicates == 0
        np.testing.assert_array_equal(space.get(keys)[0], X)
        assert len(json.loads((kdir / "keymap.json").read_text())["shards"]) == 1
        assert sorted(p.name.split(".")[0] for p in kdir.glob("*.npy")) == [json.loads((kdir / "keymap.json").read_text())["gen"]] * 4


def test_a_store_written_before_the_key_map_and_a_stale_map_are_read_correctly(tmp_path, monkeypatch):
    keys, X = filled(tmp_path / "s")  # below KEYMAP_MIN_ROWS: no map, as an older featurebank wrote it
    assert not (tmp_path / "s" / "spaces" / FP_A / "keymap").exists()
    monkeypatch.setattr(keymap_mod, "KEYMAP_MIN_ROWS", 10)
    with open_store(tmp_path / "s") as store:
        assert len(store.space(FP_A)) == 120
    kdir = tmp_path / "s" / "spaces" / FP_A / "keymap"
    meta = json.loads((kdir / "keymap.json").read_text())
    # a map naming a shard that is gone (an older featurebank compacted without updating it)
    (kdir / "keymap.json").write_text(json.dumps({**meta, "shards": [["gone.arrow", 1]] + meta["shards"][1:]}))
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A)
        np.testing.assert_array_equal(space.get(keys)[0], X)
    assert json.loads((kdir / "keymap.json").read_text())["shards"] == meta["shards"]


def test_iter_chunks_streams_each_key_once_in_bounded_chunks(tmp_path):
    keys, X = filled(tmp_path / "s")
    with open_store(tmp_path / "s") as store:
        chunks = list(store.space(FP_A).iter_chunks(17))
    assert max(len(k) for k, _ in chunks) == 17
    got_k = np.concatenate([k for k, _ in chunks]).astype("U64")
    got_x = np.vstack([x for _, x in chunks])
    assert got_k.tolist() == keys  # storage order; the 3 repeated rows skipped
    np.testing.assert_array_equal(got_x, X)


def test_export_and_verify_of_a_store_larger_than_one_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "EXPORT_CHUNK", 7)
    keys, X = filled(tmp_path / "s", dim=5)
    order = np.argsort(keys)
    with open_store(tmp_path / "s") as store:
        store.record_items([str(tmp_path / f"img{i}.jpg") for i in range(4)], keys[:4], ["a", "b", None, "d"])
        store.export(FP_A, tmp_path / "v.parquet")
        store.export(FP_A, tmp_path / "npy", format="npy")
        rep = store.verify()
    t = pq.read_table(tmp_path / "v.parquet")
    assert t["key"].to_pylist() == [keys[i] for i in order]
    np.testing.assert_array_equal(np.stack(t["vector"].to_numpy(zero_copy_only=False)), X[order])
    by_key = dict(zip(t["key"].to_pylist(), zip(t["path"].to_pylist(), t["label"].to_pylist())))
    assert by_key[keys[1]] == (str(tmp_path / "img1.jpg"), "b") and by_key[keys[2]] == (str(tmp_path / "img2.jpg"), None)
    assert by_key[keys[50]] == (None, None)
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "vectors.npy"), X[order])
    assert np.load(tmp_path / "npy" / "keys.npy").tolist() == [keys[i] for i in order]
    assert np.load(tmp_path / "npy" / "labels.npy")[list(order).index(3)] == "d"
    paths = np.load(tmp_path / "npy" / "paths.npy")  # chunks of different widths, one column
    assert paths.shape == (120,) and paths[list(order).index(1)] == str(tmp_path / "img1.jpg")
    assert paths[list(order).index(50)] == "" and sorted(p.name for p in (tmp_path / "npy").iterdir()) == [
        "keys.npy", "labels.npy", "paths.npy", "space.json", "vectors.npy"]
    assert rep.ok and (rep.n_rows, rep.n_vectors, rep.n_shards) == (123, 120, 4)


def _rss_file() -> int:
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("RssFile:"))


@pytest.mark.skipif(pages_mod._madvise is None, reason="madvise(MADV_DONTNEED) is Linux-only")
def test_release_pages_drops_the_mapped_shards_from_rss_and_keeps_the_data(tmp_path):
    # 24 MB of float32 shards: read them all through the Space's mappings (as export does),
    # then release: the file pages leave this process's RSS, and reads still return the data
    rng = np.random.default_rng(0)
    keys = make_keys(12_000)
    X = rng.standard_normal((12_000, 512)).astype(np.float32)
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A, dim=512, dtype="float32")
        for s in range(0, 12_000, 4_000):
            space.add(keys[s : s + 4_000], X[s : s + 4_000])
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A)
        order = np.argsort(keys)
        before = _rss_file()
        np.testing.assert_array_equal(space.gather(np.arange(12_000)), X[order])
        touched = _rss_file()
        assert touched - before > 20e6  # every page of the three shards is mapped in
        space.release_pages()
        assert touched - _rss_file() > 20e6
        np.testing.assert_array_equal(space.gather(np.arange(12_000)), X[order])


def test_each_record_batch_is_checked_once_per_open_not_per_read(tmp_path, monkeypatch):
    keys, _ = filled(tmp_path / "s")
    calls = []
    real = shards_mod.batch_sum2d
    monkeypatch.setattr(shards_mod, "batch_sum2d", lambda k, x: calls.append(len(k)) or real(k, x))
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A)
        for _ in range(3):
            space.get(keys)
            list(space.iter_chunks(50))
    assert sorted(calls) == [3, 40, 40, 40]  # four batches, each checked once


def test_a_load_larger_than_memory_is_refused_with_how_to_proceed(tmp_path, monkeypatch):
    keys, _ = filled(tmp_path / "s", dim=6)
    monkeypatch.setattr(space_mod, "available_memory", lambda: 1000)
    with open_store(tmp_path / "s") as store:
        space = store.space(FP_A)
        with pytest.raises(StoreError, match=r"needs 0\.0 GiB as float32 but only 0\.0 GiB of memory is available; load a seeded sample.*iter_chunks.*partial_fit"):
            space.get(keys)  # 120 x 6 x 4 bytes > 1000
        assert len(list(space.iter_chunks(10))) == 12  # streaming still works
