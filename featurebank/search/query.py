"""Querying a saved index by vectors or by indexed ids, with file paths where the store knows them.

This is the seam for query-by-image: embed the query images with the index's model (same
space fingerprint), then pass the vectors here::

    Q = embedder.transform(["query.jpg"])                 # (n_queries, dim) float32
    hits = query_index("my_index", Q, k=10, space=fp)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from featurebank.search.index import SimilarityIndex, open_index
from featurebank.search.indexing import store_paths

__all__ = ["Neighbour", "query_index"]


@dataclass(frozen=True)
class Neighbour:
    """One search result: the indexed id (store content key), its score (cosine similarity,
    or squared L2 distance), its rank (0 = best) and, when known, the image path."""

    id: str
    score: float
    rank: int
    path: str | None = None


def query_index(
    index: SimilarityIndex | str | os.PathLike,
    Q=None,
    *,
    ids: Sequence[str] | None = None,
    k: int = 10,
    clip: bool = False,
    space: str | None = None,
    with_paths: bool = True,
) -> list[list[Neighbour]]:
    """The `k` nearest neighbours of query vectors `Q`, or of indexed `ids` (exactly one of them).

    Parameters
    ----------
    index : a SimilarityIndex, or the directory of a saved one
    Q : array-like of shape (n_queries, dim), float32
    ids : ids already in the index to use as queries (each finds itself first)
    k, clip : as `SimilarityIndex.search` (k > count is refused unless clip=True)
    space : fingerprint of the space `Q` comes from; refused if it is not the index's
    with_paths : look up image paths in the store named by ``index.source`` (if any)

    Returns
    -------
    One list per query of up to k `Neighbour` (IVF padding entries are dropped).
    """
    if (Q is None) == (ids is None):
        raise ValueError("give exactly one of Q (query vectors) or ids (indexed ids to query with)")
    if not isinstance(index, SimilarityIndex):
        index = open_index(index)
    if Q is not None:
        scores, found = index.search(Q, k, space=space, clip=clip)
    else:
        scores, found = index.search_by_id(list(ids), k, clip=clip)
    paths: dict[str, str] = {}
    store_dir = (index.source or {}).get("store") if with_paths else None
    if store_dir and os.path.isdir(store_dir):
        paths = store_paths(store_dir, {key for row in found for key in row if key is not None})
    return [
        [Neighbour(key, float(s), rank, paths.get(key)) for rank, (key, s) in enumerate(zip(row, srow)) if key is not None]
        for row, srow in zip(found, scores)
    ]
