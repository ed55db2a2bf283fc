"""hash_files: content keys of real image files, the stat cache, per-path errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import numpy as np

from featurebank.store import open_store
from featurebank.store.hashing import RACY_NS


def _age(path, seconds=10.0):
    """Set mtime back so the cache entry is not 'racily clean' (see RACY_NS)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_keys_are_sha256_of_the_file_bytes(store, photo_dir):
    paths = sorted(photo_dir.glob("*.jpg"))
    res = store.hash_files(paths)
    assert res.keys == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert res.errors == [None] * len(paths) and res.ok.all()
    assert (res.n_hashed, res.n_cached) == (len(paths), 0)
    assert res.paths == [str(p) for p in paths]


def test_unchanged_files_come_from_the_cache_and_changed_ones_are_rehashed(store, photo_dir, tmp_path):
    work = tmp_path / "imgs"
    shutil.copytree(photo_dir, work)
    paths = sorted(work.glob("*.jpg"))
    for p in paths:
        _age(p)
    first = store.hash_files(paths)
    assert first.n_hashed == len(paths)

    second = store.hash_files(paths)
    assert (second.n_cached, second.n_hashed) == (len(paths), 0)
    assert second.keys == first.keys

    # rewrite one file with other bytes of the same size: size matches, mtime/ctime do not
    target = paths[0]
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    _age(target, 5.0)
    third = store.hash_files(paths)
    assert third.n_hashed == 1 and third.n_cached == len(paths) - 1
    assert third.keys[0] == hashlib.sha256(bytes(data)).hexdigest() != first.keys[0]
    assert third.keys[1:] == first.keys[1:]

    # the cache lives in the store: a new process (fresh handle) hits it too
    with open_store(store.root) as again:
        assert again.hash_files(paths).n_cached == len(paths)


def test_racily_clean_files_are_hashed_again_before_being_trusted(store, tmp_path):
    p = tmp_path / "fresh.bin"
    p.write_bytes(b"abc")  # mtime == now: a same-tick rewrite could hide from stat
    assert store.hash_files([p]).n_hashed == 1
    assert store.hash_files([p]).n_hashed == 1
    _age(p, RACY_NS / 1e9 + 5)
    store.hash_files([p])
    assert store.hash_files([p]).n_cached == 1


def test_same_bytes_under_another_path_give_the_same_key(store, photo_dir, tmp_path):
    src = photo_dir / "coffee.jpg"
    dup = tmp_path / "renamed copy.jpg"
    shutil.copy(src, dup)
    res = store.hash_files([src, dup])
    assert res.keys[0] == res.keys[1]


def test_unreadable_paths_get_per_path_errors(store, photo_dir, tmp_path):
    good = photo_dir / "rocket.jpg"
    dangling = tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "nowhere.jpg")
    res = store.hash_files([tmp_path / "missing.jpg", good, tmp_path, dangling])
    np.testing.assert_array_equal(res.ok, [False, True, False, False])
    assert res.keys[1] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert res.errors[0] == "No such file or directory"
    assert res.errors[2] == "is a directory, not a file"
    assert res.errors[3] == "No such file or directory"
    assert [p for p, _ in res.failed()] == [str(tmp_path / "missing.jpg"), str(tmp_path), str(dangling)]


def test_empty_input(store):
    res = store.hash_files([])
    assert len(res) == 0 and res.ok.shape == (0,)


def test_cached_pass_is_much_faster_than_reading(store, tmp_path):
    # 200 files of 256 KiB: the cached pass only stats them and reads SQLite
    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(200):
        p = d / f"{i:03d}.bin"
        p.write_bytes(rng.bytes(256 * 1024))
        _age(p)
        paths.append(p)
    t0 = time.perf_counter()
    cold = store.hash_files(paths, n_jobs=1)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = store.hash_files(paths)
    t_warm = time.perf_counter() - t0
    assert warm.n_cached == 200 and warm.keys == cold.keys
    assert t_warm * 3 < t_cold, (t_cold, t_warm)
