"""Compaction: merge a space's small shards into few large ones and drop duplicate rows,
safely beside concurrent readers and writers."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from featurebank._atomic import fsync_dir, remove_stale_temps
from featurebank.errors import StoreError
from featurebank.store.index import KeyIndex
from featurebank.store.shards import KEY_LEN, Block, ShardWriter, file_size, list_shards, read_blocks
from featurebank.store.space import Space

__all__ = ["COMPACT_TARGET_BYTES", "compact_space"]

COMPACT_TARGET_BYTES = 256 << 20
COMPACT_BATCH_BYTES = 32 << 20


def compact_space(space: Space, target_bytes: int = COMPACT_TARGET_BYTES) -> dict[str, Any]:
    """Compact one space under its lock file; returns its report (see
    :meth:`EmbeddingStore.compact <featurebank.store.EmbeddingStore.compact>`)."""
    import fcntl

    lock_path = space.store.root / "locks" / f"compact-{space.fingerprint}.lock"
    with open(lock_path, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another process is compacting space {space.fingerprint[:12]}… of {space.store.root}; wait for it to finish"
            ) from None
        remove_stale_temps(space.shard_dir)
        names = list_shards(space.shard_dir)
        sizes = {n: file_size(space.shard_dir / n) for n in names}
        small = [n for n in names if sizes[n] < target_bytes // 2]
        keep = [n for n in names if n not in small]
        report = {"fingerprint": space.fingerprint, "shards_before": len(names), "shards_merged": 0,
                  "shards_written": 0, "shards_after": len(names), "shards_added_meanwhile": 0, "rows_dropped": 0}
        # keys as fixed-width bytes in one sorted map (KeyIndex), not a Python set of row objects:
        # rows of the large shards win, then the small ones oldest first, as before
        keep_blocks = [b for n in keep for b in read_blocks(space.shard_dir / n, space.dim, space.dtype)]
        small_blocks: list[list[Block]] = [read_blocks(space.shard_dir / n, space.dim, space.dtype) for n in small]
        flat_small = [b for blocks in small_blocks for b in blocks]
        key_map = KeyIndex(keep_blocks + flat_small)
        masks = key_map.row_mask()
        small_masks = [np.ones(len(b.keys), bool) for b in flat_small] if masks is None else masks[len(keep_blocks):]
        del keep_blocks, key_map
        if len(small) < 2 and all(m.all() for m in small_masks):
            return report
        for blocks in small_blocks:
            for b in blocks:
                space._check_block(b)
        row_bytes = space.dim * np.dtype(space.dtype).itemsize + KEY_LEN
        written: list[str] = []
        writer: ShardWriter | None = None
        pend_k: list[np.ndarray] = []
        pend_x: list[np.ndarray] = []
        pend_rows = 0

        def flush() -> None:
            nonlocal pend_rows, writer
            if not pend_rows:
                return
            if writer is None:
                writer = ShardWriter(space.shard_dir, space._schema)
            writer.write(np.concatenate(pend_k), np.concatenate(pend_x))
            pend_k.clear()
            pend_x.clear()
            pend_rows = 0
            if writer.n_rows * row_bytes >= target_bytes:
                written.append(writer.commit())
                writer = None

        try:
            for b, mask in zip(flat_small, small_masks):
                report["rows_dropped"] += int(len(mask) - mask.sum())
                if mask.any():
                    pend_k.append(np.ascontiguousarray(b.keys[mask]))
                    pend_x.append(np.ascontiguousarray(b.vectors[mask]))
                    pend_rows += int(mask.sum())
                    if pend_rows * row_bytes >= min(COMPACT_BATCH_BYTES, target_bytes):
                        flush()
            flush()
            if writer is not None:
                written.append(writer.commit())
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        del small_blocks, flat_small
        # merged rows are durable now; only then remove the inputs
        for n in small:
            try:
                os.unlink(space.shard_dir / n)
            except FileNotFoundError:
                pass
        fsync_dir(space.shard_dir)
        report["shards_merged"], report["shards_written"] = len(small), len(written)
        report["shards_after"] = len(names) - len(small) + len(written)
        report["shards_added_meanwhile"] = len(set(list_shards(space.shard_dir)) - set(names) - set(written))
        return report

