"""Real processes: SIGKILL in the middle of writing, then resume; two writers at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from store_helpers import FP_A, PYTHON, make_keys, make_vectors, subprocess_env

from featurebank.store import open_store
from featurebank._atomic import TEMP_PREFIX

CHILD = str(Path(__file__).with_name("writer_child.py"))
N_BATCHES, BATCH, DIM = 24, 400, 256


def _spawn(store_dir, first, n, *extra):
    args = [PYTHON, CHILD, str(store_dir), FP_A, str(first), str(n), str(BATCH), str(DIM), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _read_until(proc, n_done, timeout=120.0):
    """Read the child's lines until it reported n_done committed batches; return all lines."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited early: {proc.wait()} {proc.stderr.read()}")
        lines.append(line.split())
        if sum(w == "done" for w, *_ in lines) >= n_done or line.startswith("stalled"):
            return lines
    raise AssertionError("child too slow")


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reap it, so its pid is really gone
    proc.stdout.close()
    proc.stderr.close()


def _batch_presence(space):
    """For each batch: 'all' | 'none' | 'partial' (partial would break atomicity)."""
    out = []
    for b in range(N_BATCHES):
        c = space.contains(make_keys(BATCH, start=b * BATCH))
        out.append("all" if c.all() else "none" if not c.any() else "partial")
    return out


def _assert_batches_exact(space, batches):
    for b in batches:
        X, found = space.get(make_keys(BATCH, start=b * BATCH))
        assert found.all(), b
        np.testing.assert_array_equal(X, make_vectors(BATCH, DIM, seed=b))


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_committed_and_resume_redoes_only_the_rest(tmp_path):
    store_dir = tmp_path / "store"
    # 1. a writer killed half-way through a shard leaves only an ignored temp file
    proc = _spawn(store_dir, 0, 1, "--stall")
    assert _read_until(proc, 0)[-1] == ["stalled"]
    shard_dir = store_dir / "spaces" / FP_A / "shards"
    temps = [p for p in shard_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    _kill(proc)

    # 2. a run killed with SIGKILL right after its third commit, while writing the fourth
    proc = _spawn(store_dir, 0, N_BATCHES)
    lines = _read_until(proc, 3)
    _kill(proc)
    committed = [int(b) for w, b in lines if w == "done"]
    assert committed == [0, 1, 2]

    with open_store(store_dir) as store:
        assert not [p for p in shard_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]  # cleaned on open
        report = store.verify()
        assert report.ok, report.problems
        space = store.space(FP_A)
        presence = _batch_presence(space)
        assert "partial" not in presence  # a shard is all or nothing
        assert presence[:3] == ["all"] * 3
        _assert_batches_exact(space, committed)
        n_before = presence.count("all")

    # 3. resume: committed batches are skipped, the rest is written, nothing twice
    out = subprocess.run([PYTHON, CHILD, str(store_dir), FP_A, "0", str(N_BATCHES), str(BATCH), str(DIM)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    words = [line.split() for line in out.stdout.splitlines()]
    assert [int(b) for w, b in words if w == "skip"] == list(range(n_before))
    assert [int(b) for w, b in words if w == "done"] == list(range(n_before, N_BATCHES))
    with open_store(store_dir) as store:
        assert store.verify().ok
        space = store.space(FP_A)
        assert len(space) == N_BATCHES * BATCH
        assert store.info()["spaces"][0]["n_duplicate_rows"] == 0
        _assert_batches_exact(space, range(N_BATCHES))


@pytest.mark.slow
def test_two_writers_and_a_compactor_at_once(tmp_path):
    store_dir = tmp_path / "store"
    with open_store(store_dir) as store:
        store.space(FP_A, dim=DIM)
    # overlapping halves: batches 0-15 and 8-23, written at the same time
    a = _spawn(store_dir, 0, 16, "--sleep", "0.01")
    b = _spawn(store_dir, 8, 16, "--sleep", "0.01")
    reader = open_store(store_dir)
    space = reader.space(FP_A)
    n_compactions = 0
    while a.poll() is None or b.poll() is None:
        # compaction and reads race the writers
        reader.compact()
        n_compactions += 1
        present = [i for i, p in enumerate(_batch_presence(space)) if p == "all"]
        _assert_batches_exact(space, present)
    for p in (a, b):
        assert p.wait() == 0, p.stderr.read()
        p.stdout.close()
        p.stderr.close()
    assert n_compactions >= 1
    report = reader.verify()
    assert report.ok, report.problems
    assert _batch_presence(space) == ["all"] * N_BATCHES
    _assert_batches_exact(space, range(N_BATCHES))
    assert len(space) == N_BATCHES * BATCH
    # both writers recorded items and failures in the shared SQLite catalog
    assert len(reader.items()) == N_BATCHES * BATCH
    assert len(reader.failures(FP_A)) == N_BATCHES
    reader.compact()
    assert reader.info()["spaces"][0]["n_duplicate_rows"] == 0
    reader.close()
