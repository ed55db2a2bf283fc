"""Spaces, vectors, dedupe, fp16, bad inputs, opening rules, items and failures."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.feather as feather
import pytest
from store_helpers import FP_A, FP_B, make_keys, make_vectors

from featurebank.errors import StoreError
from featurebank.store import FORMAT_VERSION, open_store
from featurebank.store.store import MARKER_NAME


def test_round_trip_in_requested_order_with_found_mask(store):
    space = store.space(FP_A, dim=16, info={"decode_mode": "exact"})
    keys, X = make_keys(50), make_vectors(50, 16)
    assert space.add(keys, X) == 50
    query = [keys[7], make_keys(1, start=999)[0], keys[0], keys[49]]
    Y, found = space.get(query)
    assert Y.dtype == np.float32 and Y.shape == (4, 16)
    np.testing.assert_array_equal(found, [True, False, True, True])
    np.testing.assert_array_equal(Y[[0, 2, 3]], X[[7, 0, 49]])
    assert np.isnan(Y[1]).all()  # a missing row cannot be used by accident
    np.testing.assert_array_equal(space.contains(query), found)
    assert len(space) == 50
    assert sorted(space.keys().tolist()) == sorted(keys)


def test_reopened_store_serves_the_same_vectors(tmp_path):
    keys, X = make_keys(20), make_vectors(20, 8)
    with open_store(tmp_path / "s") as s:
        s.space(FP_A, dim=8, info={"model": "lite0"}).add(keys, X)
    with open_store(tmp_path / "s", create=False) as s:
        space = s.space(FP_A)
        assert (space.dim, space.dtype, space.info) == (8, "float32", {"model": "lite0"})
        Y, found = space.get(keys)
    assert found.all()
    np.testing.assert_array_equal(Y, X)


def test_spaces_are_isolated(store):
    a = store.space(FP_A, dim=4)
    b = store.space(FP_B, dim=4)
    keys = make_keys(3)
    a.add(keys, make_vectors(3, 4))
    assert not b.contains(keys).any()
    assert b.get(keys)[1].sum() == 0
    assert [s.fingerprint for s in store.spaces()] == sorted([FP_A, FP_B])


def test_float16_space_stores_half_and_loads_float32(store):
    space = store.space(FP_A, dim=32, dtype="float16")
    keys, X = make_keys(40), make_vectors(40, 32)
    space.add(keys, X)
    Y, found = space.get(keys)
    assert Y.dtype == np.float32 and found.all()
    np.testing.assert_allclose(Y, X, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(Y, X.astype(np.float16).astype(np.float32))
    t = feather.read_table(space.shards()[0])
    assert str(t.schema.field("vector").type) == "fixed_size_list<item: halffloat>[32]"
    assert t.num_rows == 40
    with pytest.raises(ValueError, match="beyond float16's range.*dtype='float32'"):
        space.add(make_keys(1, start=100), np.full((1, 32), 1e6, dtype=np.float32))


def test_shards_are_plain_arrow_files(store):
    space = store.space(FP_A, dim=6)
    keys, X = make_keys(12), make_vectors(12, 6)
    space.add(keys, X)
    (shard,) = space.shards()
    t = feather.read_table(shard)
    assert t.column_names == ["key", "vector"]
    assert t["key"].to_pylist() == keys
    np.testing.assert_array_equal(np.stack(t["vector"].to_numpy(zero_copy_only=False)), X)


def test_keys_sharing_a_64bit_prefix_are_told_apart(store):
    # the index sorts by the first 16 hex chars; keys that agree there must still resolve exactly
    base = "0123456789abcdef"
    keys = [base + k[16:] for k in make_keys(5)] + [base + "f" * 48]
    X = make_vectors(6, 3)
    space = store.space(FP_A, dim=3)
    space.add(keys[:3], X[:3])
    space.add(keys[3:], X[3:])
    space.add(keys[1:2], X[1:2] + 100)  # duplicate of an older row: the older row wins
    Y, found = space.get(list(reversed(keys)) + [base + "e" * 48])
    np.testing.assert_array_equal(found, [True] * 6 + [False])
    np.testing.assert_array_equal(Y[:6], X[::-1])
    assert len(space) == 6


def test_create_needs_dim_and_reopen_checks_dim_and_dtype(store):
    with pytest.raises(StoreError, match="does not exist.*pass dim="):
        store.space(FP_A)
    store.space(FP_A, dim=8, dtype="float16")
    with pytest.raises(StoreError, match="holds dim=8 vectors; asked for dim=16"):
        store.space(FP_A, dim=16)
    with pytest.raises(StoreError, match="stores dtype=float16; asked for dtype=float32"):
        store.space(FP_A, dtype="float32")
    # a second process (a fresh handle) sees the same rule
    with open_store(store.root) as other:
        with pytest.raises(StoreError, match="holds dim=8 vectors; asked for dim=4"):
            other.space(FP_A, dim=4)
        assert other.space(FP_A).dtype == "float16"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 0}, "dim must be a positive integer"),
        ({"dim": 4, "dtype": "int8"}, "dtype must be one of float32, float16; got 'int8'"),
        ({"dim": 4, "info": {"x": object()}}, "info must be a JSON-serialisable dict"),
    ],
)
def test_bad_space_arguments(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        store.space(FP_A, **kwargs)


def test_bad_fingerprint(store):
    with pytest.raises(ValueError, match="64 lowercase hex characters"):
        store.space("not-a-fingerprint", dim=4)


def test_add_refuses_bad_vectors_and_keys(store):
    space = store.space(FP_A, dim=4)
    keys = make_keys(3)
    with pytest.raises(ValueError, match=r"X has shape \(3, 5\); expected \(n_keys, dim\) = \(3, 4\)"):
        space.add(keys, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"X has shape \(2, 4\); expected \(n_keys, dim\) = \(3, 4\)"):
        space.add(keys, np.zeros((2, 4), np.float32))
    X = make_vectors(3, 4)
    X[1, 2] = np.nan
    with pytest.raises(ValueError, match=f"^X has NaN or inf in 1 of 3 rows \\(rows 1; first key {keys[1]}\\); "
                                         "refusing to store them: the model produced broken vectors for these images$"):
        space.add(keys, X)
    with pytest.raises(ValueError, match=r"keys\[1\] = 'ABC' is not a sha256 hex digest"):
        space.add([keys[0], "ABC", keys[2]], make_vectors(3, 4))
    with pytest.raises(ValueError, match=r"keys\[0\] = .* is not a sha256 hex digest"):
        space.add([keys[0].upper()], make_vectors(1, 4))
    with pytest.raises(ValueError, match="not a single string"):
        space.contains(keys[0])
    with pytest.raises(ValueError, match="paths has 1 entries; expected one per key"):
        space.add(keys, make_vectors(3, 4), paths=["a.jpg"])
    assert len(space) == 0 and space.shards() == []  # nothing half-written


def test_not_a_store_and_unknown_version(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="is not a featurebank store .* and is not empty \\(cat.jpg\\)"):
        open_store(d)
    with pytest.raises(StoreError, match="does not exist; check the path"):
        open_store(tmp_path / "missing", create=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a store directory"):
        open_store(f)
    s = tmp_path / "future"
    open_store(s).close()
    (s / MARKER_NAME).write_text(json.dumps({"format": "featurebank-store", "version": FORMAT_VERSION + 1}))
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1} is not supported.*upgrade featurebank"):
        open_store(s)
    (s / MARKER_NAME).write_text("{not json")
    with pytest.raises(StoreError, match="unreadable store marker"):
        open_store(s)


def test_empty_directory_becomes_a_store(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with open_store(d) as s:
        assert s.info()["spaces"] == []
    assert json.loads((d / MARKER_NAME).read_text()) == {"format": "featurebank-store", "version": FORMAT_VERSION}


def test_labels_need_paths(store):
    space = store.space(FP_A, dim=2)
    with pytest.raises(ValueError, match="labels need paths"):
        space.add(make_keys(1), make_vectors(1, 2), labels=["cat"])


def test_failures_are_recorded_listed_and_cleared_on_success(store, tmp_path):
    space = store.space(FP_A, dim=3)
    bad = [str(tmp_path / "broken.jpg"), str(tmp_path / "huge.png")]
    n = store.record_failures(FP_A, [{"path": bad[0], "reason": "cannot identify image file"},
                                     {"path": bad[1], "reason": "too many pixels", "key": make_keys(1)[0]}])
    assert n == 2
    store.record_failures(FP_B, [{"path": bad[0], "reason": "other space"}])
    store.record_failures(FP_A, [{"path": bad[0], "reason": "still truncated"}])  # retried, failed again
    recs = {r.path: r for r in store.failures(FP_A)}
    assert recs[bad[0]].reason == "still truncated" and recs[bad[0]].attempts == 2
    assert recs[bad[1]].key == make_keys(1)[0] and recs[bad[1]].space == FP_A and recs[bad[1]].time > 0
    assert len(store.failures()) == 3
    # a retry that succeeds clears the failure of that path in that space only
    space.add(make_keys(1, start=5), make_vectors(1, 3), paths=[bad[0]])
    assert [r.path for r in store.failures(FP_A)] == [bad[1]]
    assert [r.path for r in store.failures(FP_B)] == [bad[0]]
    assert store.clear_failures(FP_A) == 1
    assert store.clear_failures() == 1 and store.failures() == []
    with pytest.raises(ValueError, match=r"records\[0\] needs 'path' and 'reason'"):
        store.record_failures(FP_A, [{"path": "x"}])
    with pytest.raises(ValueError, match="empty reason"):
        store.record_failures(FP_A, [{"path": "x", "reason": " "}])


def test_items_remember_paths_and_labels(store, tmp_path):
    space = store.space(FP_A, dim=2)
    keys = make_keys(2)
    space.add(keys, make_vectors(2, 2), paths=[tmp_path / "a.jpg", tmp_path / "b.jpg"], labels=["x", None])
    items = {i.path: (i.key, i.label) for i in store.items()}
    assert items == {str(tmp_path / "a.jpg"): (keys[0], "x"), str(tmp_path / "b.jpg"): (keys[1], None)}


def test_store_imports_neither_torch_nor_onnxruntime():
    import subprocess

    from store_helpers import PYTHON, subprocess_env

    code = ("import sys, featurebank.store, featurebank.cli.store_cmds; "
            "bad = [m for m in ('torch', 'onnxruntime', 'timm') if m in sys.modules]; print(bad)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
