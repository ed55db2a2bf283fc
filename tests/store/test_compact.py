"""Compaction: duplicates dropped, readers served across it, one at a time, target size."""

from __future__ import annotations

import numpy as np
import pytest
from store_helpers import FP_A, make_keys, make_vectors

from featurebank.errors import StoreError
from featurebank.store import open_store


def test_same_key_added_twice_is_one_vector_and_compaction_drops_the_copy(store):
    space = store.space(FP_A, dim=4)
    keys, X = make_keys(10), make_vectors(10, 4)
    space.add(keys[:6], X[:6])
    space.add(keys[4:], X[4:])  # keys 4, 5 again
    space.add(keys[:2] + keys[:2], np.vstack([X[:2], X[:2]]))  # repeated inside one call
    assert len(space) == 10
    info = store.info()["spaces"][0]
    assert info["n_vectors"] == 10 and info["n_duplicate_rows"] == 4
    report = store.compact()["spaces"][0]
    assert report["shards_before"] == 3 and report["shards_after"] == 1 and report["rows_dropped"] == 4
    Y, found = space.get(keys)
    assert found.all()
    np.testing.assert_array_equal(Y, X)
    assert store.info()["spaces"][0]["n_duplicate_rows"] == 0


def test_compaction_keeps_serving_a_reader_that_mapped_the_old_shards(store):
    space = store.space(FP_A, dim=8)
    keys, X = make_keys(200), make_vectors(200, 8)
    for s in range(0, 200, 20):
        space.add(keys[s : s + 20], X[s : s + 20])
    reader = open_store(store.root).space(FP_A)
    assert len(reader) == 200  # the reader has mapped the 10 small shards
    old = set(space.shards())
    report = store.compact()["spaces"][0]
    assert (report["shards_before"], report["shards_after"]) == (10, 1)
    assert not (old & set(space.shards()))  # the inputs are gone from disk
    Y, found = reader.get(keys[::-1])  # refreshes onto the merged shard
    assert found.all()
    np.testing.assert_array_equal(Y, X[::-1])
    reader.store.close()


def test_compaction_is_one_at_a_time(store):
    import fcntl

    space = store.space(FP_A, dim=4)
    for i in range(3):
        space.add(make_keys(2, start=2 * i), make_vectors(2, 4, seed=i))
    with open(store.root / "locks" / f"compact-{FP_A}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another process is compacting space"):
            store.compact()
    assert store.compact()["spaces"][0]["shards_after"] == 1


def test_compaction_respects_target_size_and_leaves_big_shards(store):
    space = store.space(FP_A, dim=64)
    keys, X = make_keys(400), make_vectors(400, 64)
    for s in range(0, 400, 50):
        space.add(keys[s : s + 50], X[s : s + 50])
    row = 64 * 4 + 64
    report = store.compact(target_bytes=120 * row)["spaces"][0]
    assert report["shards_before"] == 8 and 3 <= report["shards_after"] <= 4
    np.testing.assert_array_equal(space.get(keys)[0], X)
    again = store.compact(target_bytes=120 * row)["spaces"][0]
    assert again["rows_dropped"] == 0 and again["shards_after"] <= again["shards_before"]
