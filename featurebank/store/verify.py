"""Checking a whole store (every shard of every space, and the catalog) and moving broken
shards aside."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from featurebank._atomic import TEMP_PREFIX, is_stale_temp
from featurebank.errors import StoreError
from featurebank.store.index import KeyIndex
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
        space_problems = len(rep.problems)
        good: list[str] = []
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
                    rep.n_rows += sum(len(b.keys) for b in blocks)
                    good.append(name)
                del blocks  # unmapped: one shard's pages at a time, whatever the size of the store
            if problems:
                rep.problems.extend(problems)
                if quarantine:
                    rep.quarantined.extend(str(p) for p in space.quarantine([name]))
        # distinct keys from the space's key map (persisted for large spaces: no set of 10M keys)
        if len(rep.problems) == space_problems:
            rep.n_vectors += len(space)
        else:  # distinct keys of the intact shards only
            blocks = []
            for name in good:
                try:
                    blocks += read_blocks(space.shard_dir / name, space.dim, space.dtype)
                except FileNotFoundError:
                    continue
            rep.n_vectors += len(KeyIndex(blocks))
    return rep
