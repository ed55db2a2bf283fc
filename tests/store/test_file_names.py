"""File names that are not valid UTF-8 (a Latin-1 ``caf\\xe9.jpg``): embedded, kept losslessly in
the catalog, listed escaped by every `featurebank store` command, and exported."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from store_helpers import FP_A, make_keys, make_vectors, subprocess_env

from featurebank.errors import StoreError
from featurebank.store import open_store, printable
from featurebank.store.catalog import CATALOG_NAME

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # 'caf\udce9.jpg': what Python makes of the byte 0xe9
BROKEN = os.fsdecode(b"br\xfbl\xe9.jpg")


def _cli(*args: str) -> subprocess.CompletedProcess:
    # PYTHONIOENCODING=utf-8 makes stdout strict, as in any UTF-8 terminal locale: printing a
    # surrogate escape there raises, so this is where an unescaped name would crash
    env = {**subprocess_env(), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "featurebank", *args], env=env, capture_output=True, text=True,
                          errors="strict", timeout=300)


def test_printable_escapes_only_what_utf8_cannot_hold():
    assert printable(LATIN1) == "caf\\xe9.jpg"
    assert printable("café.jpg") == "café.jpg"
    assert printable("x\ud800") == "x\\ud800"  # a lone surrogate that is not a file-name byte


def test_catalog_keeps_non_utf8_paths_and_labels_losslessly(store, tmp_path):
    path = str(tmp_path / LATIN1)
    label = os.fsdecode(b"cl\xe4sse")
    space = store.space(FP_A, dim=4)
    key = make_keys(1)
    space.add(key, make_vectors(1, 4), paths=[path], labels=[label])
    store.record_failures(FP_A, [{"path": str(tmp_path / BROKEN), "reason": f"{tmp_path / BROKEN}: not an image"}])
    store.close()
    again = open_store(store.root)
    (item,) = again.items()
    assert (item.path, item.label) == (path, label)
    assert os.fsencode(item.path) == os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    (fail,) = again.failures()
    assert fail.path == str(tmp_path / BROKEN)
    assert fail.reason == f"{printable(str(tmp_path / BROKEN))}: not an image"
    # the raw bytes are in the database (a BLOB), and valid UTF-8 stays TEXT
    con = sqlite3.connect(again.catalog.path)
    assert con.execute("SELECT typeof(path), path FROM items").fetchone() == ("blob", os.fsencode(path))
    con.close()
    assert again.clear_failures(FP_A, [str(tmp_path / BROKEN)]) == 1
    again.close()


def test_version_1_catalog_is_upgraded_and_a_newer_one_refused(tmp_path):
    s = open_store(tmp_path / "st")
    s.record_items([str(tmp_path / "a.jpg")], make_keys(1))
    s.close()
    con = sqlite3.connect(tmp_path / "st" / CATALOG_NAME)
    con.execute("PRAGMA user_version = 1")
    con.close()
    s = open_store(tmp_path / "st")
    assert [it.path for it in s.items()] == [str(tmp_path / "a.jpg")]
    assert s.catalog.query("PRAGMA user_version") == [(2,)]
    s.close()
    con = sqlite3.connect(tmp_path / "st" / CATALOG_NAME)
    con.execute("PRAGMA user_version = 3")
    con.close()
    with pytest.raises(StoreError, match=r"catalog schema version 3 is not supported .*supports 2.*upgrade featurebank"):
        open_store(tmp_path / "st")


def test_cli_embeds_lists_and_exports_a_folder_with_a_latin1_name(tmp_path, tiny_model, photos):
    src = tmp_path / "imgs"
    src.mkdir()
    for name, arr in (("a.jpg", photos["chelsea"]), ("b.jpg", photos["coffee"]), (LATIN1, photos["rocket"])):
        Image.fromarray(arr).resize((96, 72)).save(os.path.join(str(src), name), quality=90)
    with open(os.path.join(str(src), BROKEN), "wb") as f:
        f.write(b"not an image at all")
    store = tmp_path / "store"

    r = _cli("embed", str(src), "--model", str(tiny_model), "--store", str(store), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["total"], rep["embedded"], rep["failed"]) == (4, 3, 1)

    st = open_store(store)
    (space,) = st.spaces()
    assert len(space) == 3 and st.verify().ok
    by_name = {os.path.basename(it.path): it.key for it in st.items()}
    assert set(by_name) == {"a.jpg", "b.jpg", LATIN1}
    X, found = space.get([by_name[LATIN1]])
    assert found.all() and np.isfinite(X).all()
    st.close()

    r = _cli("store", "failures", str(store))
    assert r.returncode == 0, r.stderr
    assert f"{printable(str(src))}/br\\xfbl\\xe9.jpg\n" in r.stdout and "1 failures" in r.stdout
    r = _cli("store", "failures", str(store), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["path"].endswith("/br\\xfbl\\xe9.jpg")
    for cmd in (("info",), ("info", "--json"), ("verify",), ("verify", "--json")):
        r = _cli("store", *cmd, str(store))
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)

    out = tmp_path / "v.parquet"
    r = _cli("store", "export", str(store), "--space", space.fingerprint, "-o", str(out))
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out).to_pydict()
    assert sorted(os.path.basename(p) for p in t["path"]) == ["a.jpg", "b.jpg", "caf\\xe9.jpg"]
    r = _cli("store", "export", str(store), "--space", space.fingerprint, "-o", str(tmp_path / "npy"), "--format", "npy")
    assert r.returncode == 0, r.stderr
    paths = np.load(tmp_path / "npy" / "paths.npy")
    assert sorted(os.path.basename(os.fsencode(str(p))) for p in paths) == [b"a.jpg", b"b.jpg", b"caf\xe9.jpg"]

    # a re-run is served from the cache: the stat cache found the Latin-1 name again
    r = _cli("embed", str(src), "--model", str(tiny_model), "--store", str(store), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["embedded"], rep["cached"], rep["skipped_failed"]) == (0, 3, 1)
    assert open_store(store).verify().ok


def test_every_listing_writer_survives_a_latin1_name(tmp_path, tiny_model, photos):
    """predict's CSV, dedup's CSV and search's listing read paths back from the store: they
    print a name that is not UTF-8 escaped instead of failing the whole command."""
    names = sorted(photos)
    for c, cls in enumerate(("a", "b")):
        d = tmp_path / "imgs" / cls
        d.mkdir(parents=True)
        for i in range(3):
            name = LATIN1 if (c, i) == (0, 0) else f"{i}.jpg"
            Image.fromarray(photos[names[3 * c + i]]).resize((80, 64)).save(os.path.join(str(d), name), quality=90)
    src, store, latin = tmp_path / "imgs", tmp_path / "store", f"{tmp_path}/imgs/a/caf\\xe9.jpg"
    r = _cli("train", str(src), "--model", str(tiny_model), "--store", str(store), "--classifier", "prototype",
             "-o", str(tmp_path / "c.fbclf"))
    assert r.returncode == 0, r.stderr
    r = _cli("predict", str(src), "--model", str(tiny_model), "--store", str(store),
             "--classifier", str(tmp_path / "c.fbclf"))
    assert r.returncode == 0, r.stderr
    assert f"\n{latin},a," in r.stdout and len(r.stdout.splitlines()) == 7
    r = _cli("index", "build", "--store", str(store), "--index", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr
    r = _cli("dedup", "--index", str(tmp_path / "idx"), "--threshold", "-1", "--format", "csv",
             "-o", str(tmp_path / "d.csv"))
    assert r.returncode == 0, r.stderr
    assert f",{latin}," in (tmp_path / "d.csv").read_text()
    r = _cli("search", os.path.join(str(src), "a", LATIN1), "--index", str(tmp_path / "idx"),
             "--model", str(tiny_model), "-k", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"query {latin}\n") and "1.0000" in r.stdout
