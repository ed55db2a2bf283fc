"""Indexes over an embedding store: build or grow the index of one space, dedup a space.

The store (`featurebank.store`) keeps vectors by content key in spaces; an index built
here remembers the space fingerprint and the store directory (``index.source``), so a
later run adds only the keys it has not seen and searches can print file paths.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
from tqdm.auto import tqdm

from featurebank.errors import FingerprintMismatchError
from featurebank.search.dedup import _BATCH, _check_threshold, _group
from featurebank.search.index import (
    META_FILE,
    SimilarityIndex,
    _check_metric,
    _new_faiss_index,
    _shards_signature,
    _train,
    as_vectors,
    default_nprobe,
    fit_quantizer_search,
    is_compressed,
    open_index,
    resolve_factory,
    train_size,
)
from featurebank.store import open_store

__all__ = ["index_store", "build_store_index", "find_store_duplicates", "store_paths", "RERANK_DEFAULT", "RERANK_FAST_SCAN", "default_rerank", "CHUNK"]

#: vectors read from the store per add: 64 MiB at 256-d float32; a module constant so tests can
#: lower it (the build's memory is this chunk plus the index and 64 bytes of id per vector)
CHUNK = 65_536
#: candidates per wanted neighbour that a compressed index hands to the exact re-rank (8-bit
#: PQ and scalar codes)
RERANK_DEFAULT = 10
#: the same for 4-bit fast-scan PQ codes, coarser per sub-quantizer (benchmarks/scale.py, 2M x
#: 512, OPQ128,IVF2048,PQ128x4fs at nprobe 64: recall@10 0.955 at x10, 0.986 at x20, 0.993 at x30)
RERANK_FAST_SCAN = 30


def default_rerank(factory: str) -> int:
    """Re-rank depth for a factory: 0 for exact codes, `RERANK_FAST_SCAN` for 4-bit
    fast-scan PQ (``x4fs``), `RERANK_DEFAULT` for other compressed codes."""
    if not is_compressed(factory):
        return 0
    return RERANK_FAST_SCAN if "X4FS" in factory.upper().split(",")[-1] else RERANK_DEFAULT


def build_store_index(space, *, factory: str = "auto", metric: str = "cosine", nprobe: int | None = None,
                      max_memory: int | str | None = None, rerank: int | None = None, random_state: int = 0,
                      progress: bool = False) -> SimilarityIndex:
    """Build the index of a store space streaming: train on a seeded sample (`train_size`
    vectors, read from the memory-mapped shards), then add the vectors chunk by chunk in
    storage order. No Python object per vector: ids stay ``S64`` bytes.

    rerank : candidates per neighbour re-ranked exactly from the store's vectors; None picks
        `default_rerank` (compressed factories: PQ, SQ; 0, off, otherwise).
    """
    n = len(space)
    if n == 0:
        raise ValueError(f"space {space.fingerprint} of store {space.store.root} holds no vectors yet; embed images first")
    resolved = resolve_factory(factory, n, dim=space.dim, max_memory=max_memory)
    inner = _new_faiss_index(space.dim, resolved, metric)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if not inner.is_trained:
        n_train = train_size(inner, n)
        t0 = time.perf_counter()
        rows = np.sort(np.random.default_rng(random_state).choice(n, size=n_train, replace=False))
        sample = as_vectors(space.gather(rows), metric=metric)
        say(f"training {resolved} on a seeded sample of {n_train:,} of {n:,} vectors ...")
        _train(inner, sample, resolved, random_state)
        del sample
        say(f"trained in {time.perf_counter() - t0:.1f} s")
    compressed = is_compressed(resolved)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        # compressed indexes re-rank from the store, so they keep no direct map (8-16 bytes a
        # vector saved); IVF,Flat keeps the hash map that lets reconstruct() find vectors by label
        if not compressed:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        # compressed codes misplace near neighbours more than exact ones: scan at least 16 lists
        # (benchmarks/scale.py, 100k x 512 IVF512,PQ64 + re-rank x10: recall@10 0.938 at
        # nprobe 8, 0.981 at 16, 0.992 at 32)
        ivf.nprobe = min(ivf.nlist, max(16, default_nprobe(ivf.nlist))) if compressed else default_nprobe(ivf.nlist)
        index = inner
    else:
        index = faiss.IndexIDMap2(inner)
    labels = np.empty(n, dtype="S64")
    pos = 0
    with tqdm(total=n, unit="vec", unit_scale=True, desc="index", disable=not progress, mininterval=1.0) as bar:
        for keys, X in space.iter_chunks(CHUNK):
            Xv = as_vectors(X, metric=metric)
            index.add_with_ids(Xv, np.arange(pos, pos + len(keys), dtype=np.int64))
            labels[pos : pos + len(keys)] = keys
            pos += len(keys)
            bar.update(len(keys))
    if ivf is not None:  # after the adds: each vector's list is found at the quantizer's default effort
        fit_quantizer_search(ivf)
    sim = SimilarityIndex(index, labels[:pos], factory=resolved, metric=metric, space=space.fingerprint)
    if nprobe is not None:
        sim.nprobe = nprobe
    sim.rerank = default_rerank(resolved) if rerank is None else int(rerank)
    sim.source = {"store": str(space.store.root), "shards": _shards_signature(space)}
    return sim


def index_store(
    store_dir: str | os.PathLike,
    space_fp: str,
    index_dir: str | os.PathLike,
    *,
    factory: str = "auto",
    metric: str = "cosine",
    nprobe: int | None = None,
    rebuild: bool = False,
    progress: bool = False,
    max_memory: int | str | None = None,
    rerank: int | None = None,
) -> tuple[SimilarityIndex, int]:
    """Build the index of a store space in `index_dir`, or add the space's new vectors to it.

    When `index_dir` holds no index (or ``rebuild=True``) every vector of the space is
    indexed with `factory` by `build_store_index` (streaming; "auto" picks Flat, IVF or a
    compressed IVF-PQ/SQ with exact re-rank by size and `max_memory`, see `resolve_factory`).
    Otherwise the existing index is opened and only keys it lacks are added, in chunks,
    without retraining; it must be of the same space (else FingerprintMismatchError) and
    metric, and of `factory` unless that is "auto". The index is saved atomically either way.

    Returns
    -------
    index : the saved SimilarityIndex (ids are the store's 64-hex content keys)
    n_added : number of vectors added by this call
    """
    _check_metric(metric)
    if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0):
        raise ValueError(f"rerank must be a non-negative integer (0: off); got {rerank!r}")
    index_dir = Path(index_dir)
    with open_store(store_dir, create=False) as store:
        space = store.space(space_fp)
        space.check_embeddings()
        if rebuild or not (index_dir / META_FILE).is_file():
            index = build_store_index(space, factory=factory, metric=metric, nprobe=nprobe, max_memory=max_memory,
                                      rerank=rerank, progress=progress)
            n_added = index.count
        else:
            index = open_index(index_dir)
            _check_compatible(index, index_dir, space_fp, factory, metric)
            if nprobe is not None:
                index.nprobe = nprobe
            if rerank is not None:
                index.rerank = rerank
            keys = space.key_array()
            new = np.flatnonzero(index._lookup(keys) < 0)
            n_added = 0
            with tqdm(total=len(new), unit="vec", desc="index", disable=not progress or not len(new)) as bar:
                for start in range(0, len(new), CHUNK):
                    rows = new[start : start + CHUNK]
                    X = as_vectors(space.gather(rows), metric=index.metric)
                    n_added += index._append(X, np.asarray(keys[rows]))
                    bar.update(len(rows))
            index.source = {"store": str(store.root), "shards": _shards_signature(space)}
        # each label's row in the store's sorted keys, for the re-rank (no key lookups)
        index.store_rows = store_rows(space, index._labels) if index.rerank else None
        index.source["rows_for"] = index.source.get("shards") if index.rerank else None
    index.save(index_dir)
    return index, n_added


def store_rows(space, labels: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Each label's position in ``space.key_array()`` (:meth:`Space.positions
    <featurebank.store.space.Space.positions>`), -1 for a removed label (b"") or a key the space
    lacks: int32 (int64 past 2**31 keys), looked up 1M labels at a time."""
    out = np.full(len(labels), -1, dtype=np.int32 if len(space) < 2**31 else np.int64)
    for s in range(0, len(labels), chunk):
        lab = np.asarray(labels[s : s + chunk])
        live = lab != b""
        out[s : s + len(lab)][live] = space.positions(lab[live])
    return out


def _check_compatible(index: SimilarityIndex, index_dir: Path, space_fp: str, factory: str, metric: str) -> None:
    if index.space != space_fp:
        raise FingerprintMismatchError(
            f"the index at {index_dir} holds vectors of space {index.space!r}, not {space_fp!r}; "
            "use another index directory for this space, or rebuild=True to replace it"
        )
    if index.metric != metric:
        raise ValueError(
            f"the index at {index_dir} uses metric={index.metric!r}, not {metric!r}; "
            "use another index directory, or rebuild=True to replace it"
        )
    if factory != "auto" and factory != index.factory:
        raise ValueError(
            f"the index at {index_dir} was built with factory {index.factory!r}, not {factory!r}; "
            "pass factory='auto' to keep it, or rebuild=True to replace it"
        )


def find_store_duplicates(
    store_dir: str | os.PathLike,
    space_fp: str,
    *,
    threshold: float = 0.95,
    metric: str = "cosine",
    factory: str = "Flat",
    return_scores: bool = False,
):
    """`find_duplicates` over every vector of a store space; ids are content keys.

    Identical files share one key, so groups are of *different* files whose vectors are
    near each other. Use `store_paths` to turn keys into file paths.
    """
    _check_metric(metric)
    threshold = _check_threshold(threshold, metric)
    with open_store(store_dir, create=False) as store:
        space = store.space(space_fp)
        space.check_embeddings()
        if len(space) < 2:
            return ([], []) if return_scores else []
        # streaming: the index is built chunk by chunk, then queried with the same chunks in the
        # same order, so query chunk i holds labels [start, start + len) (no copy of the space)
        index = build_store_index(space, factory=factory, metric=metric, rerank=0)

        def batches():
            start = 0
            for _, X in space.iter_chunks(_BATCH):
                yield as_vectors(X, metric=metric), np.arange(start, start + len(X), dtype=np.int64)
                start += len(X)

        return _group(index, batches(), threshold, return_scores)


def store_paths(store_dir: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, str]:
    """content key -> file path, from the store's record of embedded files.

    When several files share one key (identical bytes) the most recently embedded path is
    given. With `keys`, only those keys are looked up (keys never embedded from a path are
    absent from the result).
    """
    wanted = None if keys is None else set(keys)
    with open_store(store_dir, create=False) as store:
        items = store.items()  # oldest first, so later paths win
    return {it.key: it.path for it in items if wanted is None or it.key in wanted}
