"""The catalog's health and counts through the store's API."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from store_helpers import FP_A, make_keys, make_vectors

import featurebank.store
from featurebank.errors import StoreError
from featurebank.store import open_store


def test_info_counts_catalog_rows(store, tmp_path):
    store.record_items([tmp_path / "a.jpg", tmp_path / "b.jpg"], make_keys(2), ["x", None])
    store.record_failures(FP_A, [{"path": tmp_path / "c.jpg", "reason": "truncated"}])
    store.hash_files([Path(featurebank.store.__file__)])
    info = store.info()
    assert (info["n_stat_cache"], info["n_items"], info["n_failures"]) == (1, 2, 1)
    assert [(f.path, f.reason, f.attempts) for f in store.failures(FP_A)] == [(str(tmp_path / "c.jpg"), "truncated", 1)]
    assert [(i.path, i.label) for i in store.items()] == [(str(tmp_path / "a.jpg"), "x"), (str(tmp_path / "b.jpg"), None)]


def test_verify_reports_a_damaged_catalog(tmp_path):
    s = open_store(tmp_path / "s")
    s.record_items([f"/photos/{i}.jpg" for i in range(2000)], make_keys(2000))
    s.close()
    path = tmp_path / "s" / "catalog.sqlite"
    con = sqlite3.connect(path)
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    data[9 * page : 9 * page + 8] = b"\xab" * 8  # the header of a b-tree page of the items table
    path.write_bytes(bytes(data))
    rep = open_store(tmp_path / "s").verify()
    assert rep.problems == [f"{path}: database disk image is malformed"]


def test_a_store_opened_without_its_catalog_reads_and_adds_vectors_only(tmp_path):
    s = open_store(tmp_path / "s")
    keys, X = make_keys(6), make_vectors(6, 8)
    s.space(FP_A, dim=8).add(keys[:3], X[:3], paths=[tmp_path / f"{i}.jpg" for i in range(3)])
    s.close()
    (tmp_path / "s" / "catalog.sqlite").write_bytes(b"not a database, and never opened")  # proves it
    with pytest.raises(StoreError, match="catalog database is unusable"):
        open_store(tmp_path / "s")
    vec = open_store(tmp_path / "s", create=False, catalog=False)
    space = vec.space(FP_A)
    assert space.add(keys[3:], X[3:]) == 3
    got, found = space.get(keys)
    assert found.all() and np.array_equal(got, X)
    assert [sp.fingerprint for sp in vec.spaces()] == [FP_A]
    with pytest.raises(StoreError, match=r"opened with catalog=False \(vectors only\), so it cannot record items"):
        space.add(make_keys(1, start=9), make_vectors(1, 8), paths=[tmp_path / "x.jpg"])
    assert not space.contains(make_keys(1, start=9)).any()  # refused before writing
    for call, what in ((vec.items, "list items"), (vec.failures, "list failures"), (vec.verify, "check its catalog"),
                       (lambda: vec.hash_files([tmp_path / "0.jpg"]), "hash files")):
        with pytest.raises(StoreError, match=f"cannot {what}; open it with catalog=True"):
            call()
    assert (tmp_path / "s" / "catalog.sqlite").read_bytes() == b"not a database, and never opened"
    with pytest.raises(StoreError, match=r"does not exist; check the path"):
        open_store(tmp_path / "missing", create=False, catalog=False)
