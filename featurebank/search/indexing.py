"""Indexes over an embedding store: build or grow the index of one space, dedup a space.

The store (`featurebank.store`) keeps vectors by content key in spaces; an index built
here remembers the space fingerprint and the store directory (``index.source``), so a
later run adds only the keys it has not seen and searches can print file paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from featurebank.errors import FingerprintMismatchError
from featurebank.search.dedup import find_duplicates
from featurebank.search.index import META_FILE, SimilarityIndex, _check_metric, build_index, open_index
from featurebank.store import open_store

__all__ = ["index_store", "find_store_duplicates", "store_paths"]

_CHUNK = 65_536  # vectors read from the store per add: 64 MiB at 256-d float32


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
) -> tuple[SimilarityIndex, int]:
    """Build the index of a store space in `index_dir`, or add the space's new vectors to it.

    When `index_dir` holds no index (or ``rebuild=True``) every vector of the space is
    indexed with `factory` (see `build_index`; "auto" picks Flat or IVF by size). Otherwise
    the existing index is opened and only keys it lacks are added, in chunks, without
    retraining; it must be of the same space (else FingerprintMismatchError) and metric,
    and of `factory` unless that is "auto". The index is saved atomically either way.

    Returns
    -------
    index : the saved SimilarityIndex (ids are the store's 64-hex content keys)
    n_added : number of vectors added by this call
    """
    _check_metric(metric)
    index_dir = Path(index_dir)
    with open_store(store_dir, create=False) as store:
        space = store.space(space_fp)
        space.check_embeddings()
        keys = [str(k) for k in space.keys()]
        source = {"store": str(store.root)}
        if rebuild or not (index_dir / META_FILE).is_file():
            if not keys:
                raise ValueError(f"space {space_fp} of store {store.root} holds no vectors yet; embed images first")
            X, _ = space.get(keys)
            index = build_index(X, keys, factory=factory, metric=metric, space=space_fp, nprobe=nprobe)
            n_added = len(keys)
        else:
            index = open_index(index_dir)
            _check_compatible(index, index_dir, space_fp, factory, metric)
            if nprobe is not None:
                index.nprobe = nprobe
            new = [k for k in keys if k not in index]
            n_added = 0
            with tqdm(total=len(new), unit="vec", desc="index", disable=not progress or not new) as bar:
                for start in range(0, len(new), _CHUNK):
                    chunk = new[start : start + _CHUNK]
                    X, _ = space.get(chunk)
                    n_added += index.add(X, chunk, space=space_fp)
                    bar.update(len(chunk))
    index.source = source
    index.save(index_dir)
    return index, n_added


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
    with open_store(store_dir, create=False) as store:
        space = store.space(space_fp)
        space.check_embeddings()
        keys = [str(k) for k in space.keys()]
        if len(keys) < 2:
            return ([], []) if return_scores else []
        X, _ = space.get(keys)
    return find_duplicates(X, keys, threshold=threshold, metric=metric, factory=factory, return_scores=return_scores)


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
