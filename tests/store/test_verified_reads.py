"""Reads check each record batch's checksum: 8 overwritten bytes in a shard's vector data are
refused by get, export, index build and compaction (never served, never dropped silently), and
quarantine keeps the intact batches of a damaged shard. Also: export onto an existing path,
and what compaction reports while other writers commit shards."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from store_helpers import FP_A, PYTHON, make_keys, make_vectors, subprocess_env

from featurebank.cli import main
from featurebank.errors import StoreError
from featurebank.store import open_store
from featurebank.store.shards import ShardWriter, batch_checksum, keys_to_array

DIM = 16


def overwrite_8_bytes(shard, vector: np.ndarray, at: int = 4) -> None:
    """Overwrite 8 bytes inside ``vector``'s bytes in the shard file (as a bad disk or a stray
    write would), with a value a float32 reads as ~1e15."""
    data = bytearray(shard.read_bytes())
    start = bytes(data).index(vector.astype(np.float32).tobytes()) + at * 4
    data[start : start + 8] = np.array([9.5e14, 9.5e14], np.float32).tobytes()
    shard.write_bytes(bytes(data))


def _damaged_store(store):
    """Two shards of 20 rows; the first one's row 3 is damaged. Returns (space, keys, X, shard)."""
    space = store.space(FP_A, dim=DIM)
    keys, X = make_keys(40), make_vectors(40, DIM)
    space.add(keys[:20], X[:20])
    space.add(keys[20:], X[20:])
    shard = space.shards()[0]
    overwrite_8_bytes(shard, X[3])
    return space, keys, X, shard


def _hint(store, shard) -> str:
    return rf"{shard.name} \(record batch 0\): vectors do not match their checksum.*featurebank store verify {store.root} --quarantine"


def test_get_refuses_damaged_vectors_and_serves_the_rest(store):
    space, keys, X, shard = _damaged_store(store)
    fresh = open_store(store.root).space(FP_A)
    with pytest.raises(StoreError, match=_hint(store, shard)):
        fresh.get(keys[:20])
    with pytest.raises(StoreError, match=_hint(store, shard)):
        fresh.get([keys[3], keys[30]])
    Y, found = fresh.get(keys[20:])  # the other shard is intact
    assert found.all()
    np.testing.assert_array_equal(Y, X[20:])
    # without the check the damage goes through, which is what the check is for
    Y, _ = fresh.get([keys[3]], verify=False)
    assert Y[0, 4] == np.float32(9.5e14)
    assert fresh.damaged_shards() == [shard.name] and fresh.damaged_shards(keys[20:]) == []
    fresh.store.close()


def test_the_check_runs_once_per_opened_batch(store):
    space = store.space(FP_A, dim=DIM)
    space.add(make_keys(10), make_vectors(10, DIM))
    space.get(make_keys(3))
    (block,) = space._refresh().blocks
    assert block.intact is True  # remembered: later reads of this batch do not recompute it
    space.add(make_keys(5, start=10), make_vectors(5, DIM))
    old, new = space._refresh().blocks
    assert old is block and old.intact is True and new.intact is None


def test_shards_written_with_only_a_sha256_are_verified_with_it(store):
    """Shards written before featurebank.sum2d existed carry only featurebank.sha256."""
    space = store.space(FP_A, dim=DIM)
    keys, X = make_keys(8), make_vectors(8, DIM)
    k = keys_to_array(keys)
    batch = pa.record_batch(
        [pa.array(keys, pa.string()), pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), DIM)],
        schema=space._schema,
    )
    path = space.shard_dir / f"{time.time_ns():020d}-1-oldshard0000.arrow"
    with pa.OSFile(str(path), "wb") as f, ipc.new_file(f, space._schema) as w:
        w.write_batch(batch, custom_metadata={"featurebank.sha256": batch_checksum(k, X)})
    Y, found = space.get(keys)
    assert found.all()
    np.testing.assert_array_equal(Y, X)
    overwrite_8_bytes(path, X[5])
    fresh = open_store(store.root).space(FP_A)
    with pytest.raises(StoreError, match=rf"{path.name} \(record batch 0\): vectors do not match their checksum"):
        fresh.get(keys)
    fresh.store.close()


def test_cli_export_refuses_a_damaged_space_and_writes_nothing(store, tmp_path, capsys):
    space, keys, X, shard = _damaged_store(store)
    for fmt, out in (("parquet", tmp_path / "v.parquet"), ("npy", tmp_path / "npy")):
        assert main(["store", "export", str(store.root), "--space", FP_A, "-o", str(out), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("featurebank: error: ")
        assert f"{shard} (record batch 0): vectors do not match their checksum" in err
        assert f"`featurebank store verify {store.root} --quarantine`" in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary file left either


def test_index_build_refuses_a_damaged_space(store, tmp_path, capsys):
    space, keys, X, shard = _damaged_store(store)
    assert main(["index", "build", "--store", str(store.root), "--space", FP_A, "--index", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert f"{shard} (record batch 0): vectors do not match their checksum" in err and "--quarantine" in err
    assert not (tmp_path / "idx").exists()


def test_compaction_refuses_to_merge_damaged_vectors(store):
    space, keys, X, shard = _damaged_store(store)
    before = sorted(p.name for p in space.shard_dir.iterdir())
    with pytest.raises(StoreError, match=_hint(store, shard)):
        store.compact()
    assert sorted(p.name for p in space.shard_dir.iterdir()) == before  # nothing merged, nothing left behind
    assert store.verify(quarantine=True).quarantined
    report = store.compact()["spaces"][0]
    assert (report["shards_before"], report["shards_after"]) == (1, 1)
    assert store.verify().ok


def test_quarantine_keeps_the_intact_batches_of_a_damaged_shard(store):
    space = store.space(FP_A, dim=DIM)
    keys, X = make_keys(30), make_vectors(30, DIM)
    w = ShardWriter(space.shard_dir, space._schema)  # one shard, three record batches (as compaction writes)
    for s in (0, 10, 20):
        w.write(keys_to_array(keys[s : s + 10]), X[s : s + 10])
    shard = space.shard_dir / w.commit()
    overwrite_8_bytes(shard, X[14])  # in batch 1
    rep = store.verify()
    assert len(rep.problems) == 1 and "batch 1: sha256 checksum mismatch" in rep.problems[0]
    rep = store.verify(quarantine=True)
    assert rep.quarantined == [str(store.root / "quarantine" / FP_A / shard.name)]
    assert store.verify().ok
    fresh = open_store(store.root).space(FP_A)
    Y, found = fresh.get(keys)
    np.testing.assert_array_equal(found, [True] * 10 + [False] * 10 + [True] * 10)
    np.testing.assert_array_equal(Y[found], X[found])
    fresh.store.close()


def test_cli_export_onto_an_existing_path_is_one_line(store, tmp_path, capsys):
    store.space(FP_A, dim=DIM).add(make_keys(4), make_vectors(4, DIM))
    out = tmp_path / "v.parquet"
    out.write_bytes(b"keep me")
    assert main(["store", "export", str(store.root), "--space", FP_A, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"featurebank: error: {out} exists; choose another output path, remove it, or pass --overwrite "
                   "(overwrite=True in Python)\n")
    assert out.read_bytes() == b"keep me"
    assert main(["store", "export", str(store.root), "--space", FP_A, "-o", str(out), "--overwrite"]) == 0


def test_cli_compact_reports_what_it_did(store, capsys):
    space = store.space(FP_A, dim=DIM)
    for s in (0, 5, 10):
        space.add(make_keys(5, start=s), make_vectors(5, DIM, seed=s))
    assert main(["store", "compact", str(store.root)]) == 0
    assert capsys.readouterr().out == f"space {FP_A[:12]}…: 3 -> 1 shards (3 merged into 1), 0 duplicate rows dropped\n"
    assert main(["store", "compact", str(store.root)]) == 0
    assert capsys.readouterr().out == f"space {FP_A[:12]}…: 1 -> 1 shards (nothing to merge), 0 duplicate rows dropped\n"


@pytest.mark.slow
def test_compaction_counts_only_its_own_work_while_another_writer_commits(store, tmp_path):
    """`compact` printed "3 -> 6 shards" while embed runs kept committing: the "after" count
    was a fresh listing that included their new shards. Its own result and theirs are now
    reported apart, so "after" is never more than "before"."""
    from pathlib import Path

    space = store.space(FP_A, dim=256)
    child = str(Path(__file__).with_name("writer_child.py"))
    proc = subprocess.Popen([PYTHON, child, str(store.root), FP_A, "0", "200", "50", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
    reports = []
    try:
        while proc.poll() is None:
            r = store.compact()["spaces"][0]
            reports.append(r)
            assert r["shards_after"] == r["shards_before"] - r["shards_merged"] + r["shards_written"]
            assert r["shards_after"] <= r["shards_before"]
    finally:
        proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    proc.stderr.close()
    assert any(r["shards_added_meanwhile"] > 0 for r in reports), reports
    store.compact()
    assert store.verify().ok and len(space) == 200 * 50


def _get_in_child(root: str, keys: list[str], q) -> None:
    from featurebank.store import open_store as reopen

    with reopen(root) as st:
        X, found = st.space(FP_A).get(keys)
    q.put((bool(found.all()), X.tobytes()))


def test_a_forked_child_checks_batches_without_the_parents_threads(store):
    """The checks run on a module-level thread pool; a child forked after the parent used it
    has the pool object but none of its threads, and must not wait on them forever."""
    import multiprocessing as mp

    space = store.space(FP_A, dim=DIM)
    keys, X = make_keys(30), make_vectors(30, DIM)
    for s in (0, 10, 20):
        space.add(keys[s : s + 10], X[s : s + 10])
    np.testing.assert_array_equal(open_store(store.root).space(FP_A).get(keys)[0], X)  # the pool is running
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_get_in_child, args=(str(store.root), keys, q))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the verification pool")
    ok, raw = q.get(timeout=5)
    assert ok and child.exitcode == 0
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(30, DIM), X)


def test_a_damaged_key_byte_is_a_store_error_naming_the_shard(store):
    space = store.space(FP_A, dim=4)
    keys = make_keys(10)
    space.add(keys, make_vectors(10, 4))
    (shard,) = space.shards()
    data = bytearray(shard.read_bytes())
    data[bytes(data).index(keys[3].encode()) + 5] = 0x9D  # not ASCII: the key can no longer be text
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{shard.name}: keys do not match their checksum .*store verify .* --quarantine"):
        open_store(store.root).space(FP_A).keys()
