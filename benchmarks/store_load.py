"""Load N x DIM vectors by key from an EmbeddingStore vs np.load of one .npy (the peer).

    python benchmarks/store_load.py [--n 100000] [--dim 1280] [--shard-rows 1000] [--dtype float32]

The store is filled the way an embedding run fills it (one shard per batch of --shard-rows),
then measured twice: as written (many small shards) and after compact(). Each load opens the
store afresh (builds the key map) and fetches every key in a shuffled order; the peer loads a
.npy of the same matrix in stored order (no keys, no reordering). Store loads are timed with
the checksum check on (``get()``, the default: each record batch's ``featurebank.sum2d`` is
verified the first time an opened store reads it, so every timed load pays it in full) and
off (``get(verify=False)``, reads as they were before verified reads existed), alternating,
so noise from a shared machine hits both alike. Files are read once before timing so both sides
run from the page cache. Prints and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from featurebank.store import open_store  # noqa: E402


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shard-rows", type=int, default=1000)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    X = rng.standard_normal((a.n, a.dim), dtype=np.float32)
    keys = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(a.n)]
    query = [keys[i] for i in rng.permutation(a.n)]
    order_of = {k: i for i, k in enumerate(keys)}
    fp = hashlib.sha256(b"bench").hexdigest()

    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "X.npy"
        np.save(npy, X)
        t0 = time.perf_counter()
        with open_store(Path(tmp) / "store") as store:
            space = store.space(fp, dim=a.dim, dtype=a.dtype)
            for s in range(0, a.n, a.shard_rows):
                space.add(keys[s : s + a.shard_rows], X[s : s + a.shard_rows])
        t_write = time.perf_counter() - t0

        def load_store(q=query, verify=True):
            with open_store(Path(tmp) / "store") as st:
                Y, found = st.space(fp).get(q, verify=verify)
            assert found.all()
            return Y

        def best_pair(q=query):
            """(unverified, verified) best times, the two runs interleaved."""
            plain, checked = [], []
            for _ in range(a.repeat):
                for verify, out in ((False, plain), (True, checked)):
                    t0 = time.perf_counter()
                    load_store(q, verify)
                    out.append(time.perf_counter() - t0)
            return min(plain), min(checked)

        perm = np.array([order_of[k] for k in query])

        def load_npy_shuffled():
            return np.load(npy)[perm]

        def build_index():
            with open_store(Path(tmp) / "store") as st:
                return len(st.space(fp))

        Y = load_store()  # warm the page cache, and check correctness
        expect = X if a.dtype == "float32" else X.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(Y[:1000], expect[[order_of[k] for k in query[:1000]]])
        del Y
        np.load(npy)
        t_npy = _best(lambda: np.load(npy), a.repeat)
        t_npy_shuffled = _best(load_npy_shuffled, a.repeat)
        t_store_many, t_verified_many = best_pair()
        t_store_inorder, t_verified_inorder = best_pair(keys)
        t_index_many = _best(build_index, a.repeat)
        n_shards_before = len(space.shards())
        t0 = time.perf_counter()
        with open_store(Path(tmp) / "store") as store:
            store.compact()
            n_shards_after = len(store.space(fp).shards())
        t_compact = time.perf_counter() - t0
        load_store()
        t_store_compact, t_verified_compact = best_pair()
        t_index_compact = _best(build_index, a.repeat)

    res = {
        "benchmark": "store_load",
        "n": a.n, "dim": a.dim, "dtype": a.dtype, "shard_rows": a.shard_rows, "repeat": a.repeat,
        "np_load_s": round(t_npy, 4),
        "store_get_shuffled_s_many_shards": round(t_store_many, 4),
        "store_get_shuffled_s_compacted": round(t_store_compact, 4),
        "store_get_in_write_order_s_many_shards": round(t_store_inorder, 4),
        "verified_get_shuffled_s_many_shards": round(t_verified_many, 4),
        "verified_get_shuffled_s_compacted": round(t_verified_compact, 4),
        "verified_get_in_write_order_s_many_shards": round(t_verified_inorder, 4),
        "ratio_verified_over_unverified_shuffled_many_shards": round(t_verified_many / t_store_many, 3),
        "ratio_verified_over_unverified_shuffled_compacted": round(t_verified_compact / t_store_compact, 3),
        "ratio_verified_over_unverified_in_order_many_shards": round(t_verified_inorder / t_store_inorder, 3),
        "np_load_then_shuffle_s": round(t_npy_shuffled, 4),
        "ratio_store_shuffled_over_npy_shuffled_many_shards": round(t_store_many / t_npy_shuffled, 2),
        "ratio_store_in_order_over_npy_many_shards": round(t_store_inorder / t_npy, 2),
        "open_and_index_s_many_shards": round(t_index_many, 4),
        "open_and_index_s_compacted": round(t_index_compact, 4),
        "ratio_store_over_npy_many_shards": round(t_store_many / t_npy, 2),
        "ratio_store_over_npy_compacted": round(t_store_compact / t_npy, 2),
        "write_s": round(t_write, 3),
        "compact_s": round(t_compact, 3),
        "shards_before_compact": n_shards_before,
        "shards_after_compact": n_shards_after,
        "machine": {**machine_info(), "platform": platform.platform(), "pyarrow": __import__("pyarrow").__version__},
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
