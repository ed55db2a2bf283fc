"""Checking a whole store (every shard of every space, and the catalog) and moving broken
shards aside."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from featurebank._atomic import TEMP_PREFIX, is_stale_temp
from featurebank.errors import StoreError
from featurebank.store.records import VerifyReport
from featurebank.store.shards import check_blocks, list_shards, read_blocks
from featurebank.store.space import read_space_meta

if TYPE_CHECKING:
    from featurebank.store.store import EmbeddingStore

__all__ = ["verify_store"]


def verify_store(store: EmbeddingStore, *, quarantine: bool = False) -> VerifyReport:
    """:meth:`EmbeddingStore.verify <featurebank.store.EmbeddingStore.verify>` (documented there)."""
    rep = VerifyReport(path=str(store.root))
    catalog = store._require_catalog("check its catalog")
    found = catalog.quick_check()
    if found:
        rep.problems.append(f"{catalog.path}: " + "; ".join(found[:5]))
    for fp in sorted(os.listdir(store.root / "spaces")):
        try:
            meta = read_space_meta(store.root, fp)
        except StoreError as exc:
            rep.problems.append(str(exc))
            continue
        if meta is None:
            continue
        rep.n_spaces += 1
        space = store.space(fp)
        for t in sorted(space.shard_dir.glob(TEMP_PREFIX + "*")):
            if is_stale_temp(t):
                rep.stale_temps.append(str(t))
        keys_seen: set[bytes] = set()
        for name in list_shards(space.shard_dir):
            path = space.shard_dir / name
            try:
                blocks = read_blocks(path, space.dim, space.dtype)
            except FileNotFoundError:  # compacted away meanwhile
                continue
            except StoreError as exc:
                problems = [str(exc)]
            else:
                rep.n_shards += 1
                problems = check_blocks(blocks, str(path))
                if not problems:
                    for b in blocks:
                        rep.n_rows += len(b.keys)
                        keys_seen.update(b.keys.tolist())
                del blocks
            if problems:
                rep.problems.extend(problems)
                if quarantine:
                    rep.quarantined.extend(str(p) for p in space.quarantine([name]))
        rep.n_vectors += len(keys_seen)
    return rep
