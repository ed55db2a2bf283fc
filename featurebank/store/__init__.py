"""The on-disk, content-addressed embedding store.

An image's key is the sha256 hex of its file bytes, so the same bytes under another path are
never embedded twice. Vectors live in *spaces*: one per (model output fingerprint, decode
mode), identified by a 64-hex fingerprint the embedder computes; the store treats it as an
opaque id plus an ``info`` dict saved once. Another space never sees these vectors.

Layout (format version 1; everything is an open format)::

    STORE/
      featurebank-store.json           {"format": "featurebank-store", "version": 1}
      catalog.sqlite                   SQLite (WAL): stat_cache, items, failures
      spaces/<fingerprint>/
        space.json                     {"fingerprint", "dim", "dtype", "info", "created", ...}
        shards/<time_ns>-<pid>-<rand>.arrow
        keymap/                        the persisted key -> (shard, row) map of a large space
                                       (<gen>.{keys,prefix,block,row}.npy + keymap.json naming the
                                       shards it maps; a validated cache, rebuilt when they change)
      locks/                           flock files (one compaction per space at a time)
      quarantine/<fingerprint>/        shards that ``verify(quarantine=True)`` moved aside

Each shard is an uncompressed Arrow IPC file (Feather v2) with columns ``key`` (string,
64-char sha256 hex) and ``vector`` (``fixed_size_list<float32 or float16>[dim]``); each
record batch carries a ``featurebank.sha256`` and a ``featurebank.sum2d`` checksum of its key
and vector bytes. Reads are verified: the first time an opened space reads a batch its sum2d
is checked (on a small thread pool, overlapping the copy), and a batch that fails refuses
with a StoreError naming the shard and ``featurebank store verify --quarantine``; damaged
vectors are never served, and never silently reported as missing. An embedding run instead
quarantines such shards (keeping their intact batches) and embeds their images again.
File names that are not UTF-8 are kept exactly in the catalog and shown escaped
(:func:`printable`). Read a shard without featurebank::

    import pyarrow.feather as feather, numpy as np
    t = feather.read_table("STORE/spaces/<fp>/shards/<name>.arrow")
    keys = t["key"].to_pylist()
    X = np.stack(t["vector"].to_numpy(zero_copy_only=False))      # (n, dim)

A key may appear in several shards (two writers embedding the same image, a crash between a
compaction's commit and its cleanup); readers keep the oldest row and ``compact`` drops the
rest. Crash safety: every shard is written to a dot-prefixed temporary file in the same
directory, fsynced and renamed; readers never list dot files and stale ones of dead writers
are removed on open. Concurrent writers each commit their own uniquely named shards.

Example
-------
>>> store = open_store("cache")                                    # doctest: +SKIP
>>> hashed = store.hash_files(paths)                               # doctest: +SKIP
>>> space = store.space(fp, dim=1280, dtype="float16", info={...}) # doctest: +SKIP
>>> todo = ~space.contains(hashed.keys)                            # doctest: +SKIP
>>> space.add(keys, X, paths=paths)                                # doctest: +SKIP
>>> X, found = space.get(keys)              # X: (n, 1280) float32 # doctest: +SKIP
"""

from featurebank.store.store import (
    DTYPES,
    FORMAT_VERSION,
    EmbeddingStore,
    FailureRecord,
    HashedFiles,
    Item,
    Space,
    VerifyReport,
    open_store,
)
from featurebank.store.catalog import printable

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "EmbeddingStore",
    "FailureRecord",
    "HashedFiles",
    "Item",
    "Space",
    "VerifyReport",
    "open_store",
    "printable",
]
