"""Near-duplicate groups: connected components of the graph "similarity >= threshold".

Edges come from FAISS range search (exact with a Flat index), components from a union-find,
so A~B and B~C put A, B, C in one group even when A and C are further apart.

>>> import numpy as np
>>> X = np.array([[1, 0], [0.999, 0.04], [0, 1], [0.03, 1]], dtype=np.float32)
>>> find_duplicates(X, ["a", "a2", "b", "b2"], threshold=0.99)
[['a', 'a2'], ['b', 'b2']]
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import IO, Iterable, Mapping, Sequence

import numpy as np

from featurebank.search.index import SimilarityIndex, _as_ids, _check_metric, as_vectors, build_index
from featurebank.store.catalog import printable

__all__ = ["find_duplicates", "find_index_duplicates", "write_duplicates", "DUPLICATE_FORMATS"]

DUPLICATE_FORMATS = ("json", "csv")
_BATCH = 4096  # queries per range_search call: bounds the result buffers FAISS allocates


def _check_threshold(threshold, metric: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) or not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number; got {threshold!r}")
    if metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity for metric='cosine' and must lie in [-1, 1]; got {threshold}")
    if metric == "l2" and threshold < 0:
        raise ValueError(f"threshold is a squared L2 distance for metric='l2' and must be >= 0; got {threshold}")
    return float(threshold)


def find_duplicates(
    X,
    ids: Iterable[str],
    *,
    threshold: float = 0.95,
    metric: str = "cosine",
    factory: str = "Flat",
    return_scores: bool = False,
):
    """Group near-duplicate vectors.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), float32 (other real dtypes are cast)
    ids : sequence of n_samples unique non-empty strings
    threshold : cosine similarity >= threshold (metric="cosine"), or squared L2 distance
        <= threshold (metric="l2"), links two vectors
    factory : index used for the range search; "Flat" is exact (O(n_samples^2) work),
        "auto" or an IVF string trades completeness for speed above ~100k vectors
    return_scores : also return, per member, its best link score inside its group

    Returns
    -------
    groups : list of groups, each a sorted list of >= 2 ids; groups sorted by first id;
        vectors without a near-duplicate are omitted
    scores : only with return_scores; list parallel to groups of lists of floats
    """
    _check_metric(metric)
    threshold = _check_threshold(threshold, metric)
    Xv = as_vectors(X, metric=metric)
    ids = _as_ids(ids, Xv.shape[0])
    index = build_index(Xv, ids, factory=factory, metric=metric)
    # build_index labels rows 0..n-1 in order, so query row i is label i.
    batches = ((Xv[s : s + _BATCH], np.arange(s, min(s + _BATCH, len(ids)), dtype=np.int64)) for s in range(0, len(ids), _BATCH))
    return _group(index, batches, threshold, return_scores)


def find_index_duplicates(index: SimilarityIndex, *, threshold: float = 0.95, return_scores: bool = False):
    """`find_duplicates` over the vectors already in `index` (queries are its stored vectors;
    approximate for compressed factories such as PQ). Same return value."""
    threshold = _check_threshold(threshold, index.metric)
    if index.count < 2:
        return ([], []) if return_scores else []
    return _group(index, _stored_batches(index), threshold, return_scores)


def _stored_batches(index: SimilarityIndex):
    # Chunk by chunk over the live labels (no list of every id), so a large index is never held
    # twice in memory; an index that re-ranks from a store queries with the store's exact vectors.
    live = np.flatnonzero(index._labels != b"")
    space = index._rerank_space()
    for start in range(0, len(live), _BATCH):
        labels = live[start : start + _BATCH]
        if space is not None:
            Q = index._store_vectors(space, index._labels[labels])
        else:
            try:
                Q = np.ascontiguousarray(index._index.reconstruct_batch(labels), dtype=np.float32)
            except RuntimeError as exc:
                raise ValueError(f"factory {index.factory!r} cannot return stored vectors: {exc}") from None
        if index.metric == "cosine":  # decoded PQ/SQ codes drift off the unit sphere
            Q /= np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        yield Q, labels.astype(np.int64)


def _group(index: SimilarityIndex, batches, threshold: float, return_scores: bool):
    """Union-find over the range-search edges of (queries, their labels) batches."""
    ip = index.metric == "cosine"
    parent: dict[int, int] = {}
    best: dict[int, float] = {}

    def find(a: int) -> int:
        root = a
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(a, a) != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    better = max if ip else min
    for Q, query_labels in batches:
        lims, D, I = index.range_search(Q, threshold)
        rows = np.repeat(query_labels, np.diff(lims))
        other = I != rows
        for a, b, score in zip(rows[other].tolist(), I[other].tolist(), D[other].tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
            best[a] = better(best.get(a, score), score)
            best[b] = better(best.get(b, score), score)

    members: dict[int, list[int]] = {}
    for label in best:
        members.setdefault(find(label), []).append(label)
    groups = []
    for labels in members.values():
        names = index.id_of_labels(np.array(labels, dtype=np.int64))
        order = sorted(range(len(names)), key=names.__getitem__)
        groups.append(([names[i] for i in order], [float(best[labels[i]]) for i in order]))
    groups.sort(key=lambda g: g[0][0])
    if return_scores:
        return [g for g, _ in groups], [s for _, s in groups]
    return [g for g, _ in groups]


def write_duplicates(
    groups: Sequence[Sequence[str]],
    file: str | os.PathLike | IO[str],
    *,
    format: str = "json",
    scores: Sequence[Sequence[float]] | None = None,
    paths: Mapping[str, str] | None = None,
) -> None:
    """Write duplicate groups as JSON or CSV, one record per member: group, id, path, score.

    `file` is a path (written atomically: temporary file in the same directory, then
    rename) or an open text stream. `scores` (from ``return_scores=True``) and `paths`
    (id -> image path, e.g. from the store) are optional; missing values are written as
    null (JSON) or an empty field (CSV).

    JSON layout: ``{"n_groups": G, "groups": [{"group": 0, "members": [{"id", "path", "score"}]}]}``.
    """
    if format not in DUPLICATE_FORMATS:
        raise ValueError(f"format must be one of {DUPLICATE_FORMATS}; got {format!r}")
    if scores is not None and [len(s) for s in scores] != [len(g) for g in groups]:
        raise ValueError("scores must be parallel to groups (one list of floats per group, one float per id)")
    paths = paths or {}
    records = [
        {
            "group": gi,
            "id": key,
            "path": None if paths.get(key) is None else printable(paths[key]),  # text: \xNN for non-UTF-8 names
            "score": None if scores is None else round(float(scores[gi][mi]), 6),
        }
        for gi, group in enumerate(groups)
        for mi, key in enumerate(group)
    ]
    buf = io.StringIO()
    if format == "json":
        out = {"n_groups": len(groups), "groups": []}
        for rec in records:
            if rec["group"] == len(out["groups"]):
                out["groups"].append({"group": rec["group"], "members": []})
            out["groups"][-1]["members"].append({k: rec[k] for k in ("id", "path", "score")})
        json.dump(out, buf, indent=2)
        buf.write("\n")
    else:
        writer = csv.DictWriter(buf, fieldnames=["group", "id", "path", "score"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in rec.items()} for rec in records)
    text = buf.getvalue()
    if hasattr(file, "write"):
        file.write(text)
        return
    _write_atomic(Path(file), text)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    from featurebank._atomic import atomic_writer

    with atomic_writer(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
