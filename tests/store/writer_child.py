"""A writer process for the crash and concurrency tests (run as a script, not collected).

    python writer_child.py STORE FP FIRST_BATCH N_BATCHES BATCH DIM [--stall] [--sleep S]

Batch b holds keys make_keys(BATCH, start=b*BATCH) and vectors make_vectors(BATCH, DIM, seed=b),
so every process writes identical rows for the same batch. Like an embedding run, batches
already in the space are skipped (resume). Prints "done b" / "skip b" after each batch,
"stalled" when --stall leaves a shard half-written and waits to be killed.
"""

from __future__ import annotations

import argparse
import time

from store_helpers import make_keys, make_vectors

from featurebank.store import open_store
from featurebank.store.shards import ShardWriter, keys_to_array


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("fp")
    ap.add_argument("first", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("batch", type=int)
    ap.add_argument("dim", type=int)
    ap.add_argument("--stall", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    a = ap.parse_args()
    store = open_store(a.store)
    space = store.space(a.fp, dim=a.dim)
    if a.stall:
        w = ShardWriter(space.shard_dir, space._schema)
        w.write(keys_to_array(make_keys(a.batch)), make_vectors(a.batch, a.dim))
        print("stalled", flush=True)
        time.sleep(600)
    for b in range(a.first, a.first + a.n):
        keys = make_keys(a.batch, start=b * a.batch)
        if space.contains(keys).all():
            print(f"skip {b}", flush=True)
            continue
        space.add(keys, make_vectors(a.batch, a.dim, seed=b), paths=[f"/data/{b}/{i}.jpg" for i in range(a.batch)])
        store.record_failures(a.fp, [{"path": f"/data/{b}/broken.jpg", "reason": f"truncated (batch {b})"}])
        print(f"done {b}", flush=True)
        if a.sleep:
            time.sleep(a.sleep)


if __name__ == "__main__":
    main()
