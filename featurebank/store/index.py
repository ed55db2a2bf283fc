"""In-memory key -> (block, row) map over a space's memory-mapped shards.

Keys are sorted by their first 64 bits (uint64 compare is ~3x faster than comparing 64-byte
strings) and looked up with ``np.searchsorted``; the full key is always compared, and the
rare keys that share a 64-bit prefix are resolved by a short scan, so the map is exact.
Building it for 1M keys takes well under a second and holds ~90 bytes per key.

Persisted key map: a space of :data:`KEYMAP_MIN_ROWS` rows or more keeps its map in
``spaces/<fp>/keymap/`` (``<gen>.keys.npy`` S64, ``<gen>.prefix.npy`` uint64, ``<gen>.block.npy``
int32, ``<gen>.row.npy`` int64, and ``keymap.json`` naming the generation ``gen`` and the shard
files, with their record-batch counts, it maps). Opening the space then memory-maps those
arrays instead of concatenating and sorting every key (10M keys: ~4 s and 850 MB resident
otherwise). The map is used only when its shard list is exactly the shards on disk; after new
shards are added it is extended (the new keys merged in), after a compaction or a quarantine
(shards gone) it is rebuilt, and either way written again. ``keymap.json`` is written last
(atomic rename), so a reader sees a whole map or none.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from featurebank._atomic import write_bytes_atomic
from featurebank.store.shards import KEY_LEN, Block, key_prefix64

#: spaces with at least this many rows persist their key map (smaller ones rebuild it in
#: well under 50 ms); a module constant so tests can lower it
KEYMAP_MIN_ROWS = 200_000
KEYMAP_DIR, KEYMAP_META = "keymap", "keymap.json"
KEYMAP_VERSION = 1
_ARRAYS = ("keys", "prefix", "block", "row")


class KeyIndex:
    """Deduplicated, sorted view of every key in ``blocks`` (first occurrence wins).

    blocks : list of :class:`~featurebank.store.shards.Block`, oldest first.
    """

    def __init__(self, blocks: list[Block], arrays: dict[str, np.ndarray] | None = None) -> None:
        self.blocks = blocks
        sizes = np.array([len(b.keys) for b in blocks], dtype=np.int64)
        self.n_rows = int(sizes.sum())
        if arrays is not None:  # a persisted map (see load_keymap)
            self.keys, self.prefix, self.block, self.row = (arrays[a] for a in _ARRAYS)
            self.prefix_collisions = bool(arrays.get("collisions", True))
            return
        if self.n_rows == 0:
            self.keys = np.empty(0, dtype=f"S{KEY_LEN}")
            self.prefix = np.empty(0, dtype=np.uint64)
            self.block = np.empty(0, dtype=np.int32)
            self.row = np.empty(0, dtype=np.int64)
            self.prefix_collisions = False
            return
        all_keys = np.concatenate([b.keys for b in blocks])
        prefix = key_prefix64(all_keys)
        # stable: among equal prefixes the older block (lower global position) comes first
        order = np.argsort(prefix, kind="stable")
        sp = prefix[order]
        same = sp[1:] == sp[:-1]
        keep = np.ones(len(order), dtype=bool)
        if same.any():
            # Entries in runs of equal prefix: almost always true duplicates (the same image
            # embedded by two writers). Sort just those by (prefix, full key, position) and
            # drop every entry whose full key equals its predecessor's.
            involved = np.flatnonzero(np.r_[same, False] | np.r_[False, same])
            sub = order[involved]
            sub = sub[np.lexsort((sub, all_keys[sub], prefix[sub]))]
            order[involved] = sub
            dup = np.r_[False, all_keys[sub][1:] == all_keys[sub][:-1]]
            keep[involved[dup]] = False
            order = order[keep]
            sp = prefix[order]
        self.prefix = sp
        self.keys = all_keys[order]
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        block_of = np.repeat(np.arange(len(blocks), dtype=np.int32), sizes)
        self.block = block_of[order]
        self.row = (order - starts[self.block]).astype(np.int64)
        self.prefix_collisions = bool((sp[1:] == sp[:-1]).any())

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_duplicates(self) -> int:
        return self.n_rows - len(self.keys)

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Positions of ``q`` (S64 array, shape (m,)) in the sorted index; -1 where absent."""
        n = len(self.keys)
        out = np.full(len(q), -1, dtype=np.int64)
        if n == 0 or len(q) == 0:
            return out
        qp = key_prefix64(q)
        pos = np.searchsorted(self.prefix, qp, side="left")
        inside = pos < n
        pc = np.minimum(pos, n - 1)
        hit = inside & (self.keys[pc] == q)
        out[hit] = pos[hit]
        if self.prefix_collisions:
            for j in np.flatnonzero(~hit & inside & (self.prefix[pc] == qp)):
                k = int(pos[j])
                while k < n and self.prefix[k] == qp[j]:
                    if self.keys[k] == q[j]:
                        out[j] = k
                        break
                    k += 1
        return out

    def blocks_of(self, positions: np.ndarray) -> list[Block]:
        """The distinct blocks holding the rows at index ``positions``, in block order."""
        return [self.blocks[int(i)] for i in np.unique(self.block[positions])]

    def gather(
        self, positions: np.ndarray, out: np.ndarray, out_rows: np.ndarray, check: Callable[[Block], None] | None = None
    ) -> None:
        """Copy vectors at index ``positions`` into ``out[out_rows]`` (casting to out.dtype).

        check : called with each block just before its rows are copied (while its pages are
            being read anyway); raise from it to refuse the block.
        """
        if len(positions) == 0:
            return
        blk = self.block[positions]
        row = self.row[positions]
        # sort by (block, row): each block's mapped file is then read front to back, and a
        # request covering a run of rows (the usual "load everything") scatters straight from
        # the mapping without a temporary copy
        order = np.lexsort((row, blk))
        blk_sorted = blk[order]
        cuts = np.flatnonzero(np.diff(blk_sorted)) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(order)]):
            sel = order[s:e]
            block = self.blocks[int(blk_sorted[s])]
            if check is not None:
                check(block)
            vecs = block.vectors
            r = row[sel]
            if r[-1] - r[0] == len(r) - 1:  # sorted and unique, so a contiguous run
                out[out_rows[sel]] = vecs[r[0] : r[-1] + 1]
            else:
                out[out_rows[sel]] = vecs[r]

    def merged_with(self, blocks: list[Block]) -> "KeyIndex":
        """This map extended with the rows of newer ``blocks`` (appended after ``self.blocks``);
        keys already mapped keep their older row. Costs one pass over the map, no full sort."""
        new = KeyIndex(blocks)
        fresh = self.lookup(new.keys) < 0 if len(new) else np.zeros(0, bool)
        at = np.searchsorted(self.prefix, new.prefix[fresh], side="right")
        out = KeyIndex(self.blocks + blocks, {
            "keys": np.insert(np.asarray(self.keys), at, new.keys[fresh]),
            "prefix": np.insert(np.asarray(self.prefix), at, new.prefix[fresh]),
            "block": np.insert(np.asarray(self.block), at, new.block[fresh] + len(self.blocks)),
            "row": np.insert(np.asarray(self.row), at, new.row[fresh]),
            "collisions": True,
        })
        out.prefix_collisions = bool(len(out.prefix) > 1 and (out.prefix[1:] == out.prefix[:-1]).any())
        return out

    def row_mask(self) -> list[np.ndarray] | None:
        """Per block, which rows the map serves (False: an older row holds the same key);
        None when every row is served (no duplicates), so readers can stream blocks whole."""
        if self.n_duplicates == 0:
            return None
        masks = [np.zeros(len(b.keys), dtype=bool) for b in self.blocks]
        order = np.argsort(self.block, kind="stable")
        blk = np.asarray(self.block)[order]
        cuts = np.r_[0, np.searchsorted(blk, np.arange(1, len(self.blocks))), len(blk)]
        for i in range(len(self.blocks)):
            masks[i][np.asarray(self.row)[order[cuts[i]:cuts[i + 1]]]] = True
        return masks


# ----------------------------------------------------------------------------- persistence
def _shard_list(blocks_by_shard: dict[str, list[Block]], names: list[str]) -> list[list]:
    return [[n, len(blocks_by_shard[n])] for n in names]


def load_keymap(space_dir: Path, names: list[str], blocks_by_shard: dict[str, list[Block]]) -> KeyIndex | None:
    """The persisted map of a space whose shards are ``names`` (oldest first): memory-mapped
    when it maps exactly these shards, extended in memory when it maps an older prefix of
    them (shards added since), None when there is none or it maps shards that are gone."""
    d = space_dir / KEYMAP_DIR
    try:
        meta = json.loads((d / KEYMAP_META).read_text())
        if meta.get("version") != KEYMAP_VERSION:
            return None
        shards = [list(x) for x in meta["shards"]]
        m = len(shards)
        if shards != _shard_list(blocks_by_shard, names[:m]) or m == 0:
            return None
        arrays = {a: np.load(d / f"{meta['gen']}.{a}.npy", mmap_mode="r", allow_pickle=False) for a in _ARRAYS}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or replaced by a newer map while we read: rebuild
    if len({len(a) for a in arrays.values()}) != 1 or arrays["keys"].dtype != np.dtype(f"S{KEY_LEN}"):
        return None
    arrays["collisions"] = bool(meta.get("collisions", True))
    old = KeyIndex([b for n in names[:m] for b in blocks_by_shard[n]], arrays)
    if m == len(names):
        return old
    return old.merged_with([b for n in names[m:] for b in blocks_by_shard[n]])


def save_keymap(space_dir: Path, names: list[str], blocks_by_shard: dict[str, list[Block]], index: KeyIndex) -> bool:
    """Persist ``index`` (the map of shards ``names``); False when the store is read-only.
    Older generations are removed after the new ``keymap.json`` is in place."""
    d = space_dir / KEYMAP_DIR
    gen = uuid.uuid4().hex[:16]
    try:
        d.mkdir(exist_ok=True)
        for a in _ARRAYS:
            buf = np.ascontiguousarray(getattr(index, a))
            tmp = d / f".{gen}.{a}.npy.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, buf, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, d / f"{gen}.{a}.npy")
        meta = {"version": KEYMAP_VERSION, "gen": gen, "n_keys": len(index), "n_rows": index.n_rows,
                "collisions": index.prefix_collisions, "shards": _shard_list(blocks_by_shard, names)}
        write_bytes_atomic(d / KEYMAP_META, (json.dumps(meta) + "\n").encode())
    except OSError:
        return False
    for p in d.iterdir():  # readers that mapped an older generation keep their mapping
        if p.name.endswith(".npy") and not p.name.startswith(gen + "."):
            try:
                p.unlink()
            except OSError:
                pass
    return True
