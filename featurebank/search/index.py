"""A FAISS similarity index over embedding vectors, keyed by string ids, persisted in a directory.

The directory holds four files, written together (temporary directory, then rename)::

    index_dir/
    ├── index.faiss   the FAISS index (``faiss.write_index``); FAISS labels are int64
    ├── ids.npy       label -> id, UTF-8 bytes (``S`` dtype); b"" marks a removed label
    ├── ids_order.npy the labels sorted by id (int64): id -> label by binary search, so
    │                 opening a 10M index builds no dict of 10M Python strings
    └── index.json    factory, metric, dim, count, nprobe, rerank, vector-space fingerprint, versions

Format version 2 added ``ids_order.npy`` and ``rerank``; version-1 indexes are read (the order
is computed on open) and written back as version 2 by the next save.

Ids are the store's content keys (64-hex sha256) or any other non-empty strings (paths).
Cosine similarity is inner product on L2-normalised vectors; ``metric="l2"`` scores are
squared Euclidean distances, FAISS's own convention (smaller is closer).

>>> import numpy as np
>>> X = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
>>> index = build_index(X, [f"v{i}" for i in range(100)])
>>> scores, ids = index.search(X[:2], k=3)
>>> ids[0][0], scores.shape
('v0', (2, 3))
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

from featurebank import __version__
from featurebank._atomic import atomic_directory
from featurebank._faiss_errors import faiss_reason
from featurebank._validation import check_finite_rows
from featurebank.errors import FingerprintMismatchError, IndexFileError, UnknownIdError

__all__ = ["SimilarityIndex", "build_index", "open_index", "resolve_factory", "default_nprobe", "METRICS", "AUTO_FLAT_MAX",
           "AUTO_COMPRESS_MIN", "parse_bytes", "is_compressed", "train_size"]

METRICS = ("cosine", "l2")
FORMAT_NAME = "featurebank.similarity_index"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
INDEX_FILE, IDS_FILE, ORDER_FILE, META_FILE = "index.faiss", "ids.npy", "ids_order.npy", "index.json"
#: optional: each label's row in the store's sorted key array, valid while the store's shards
#: are the ones ``source["rows_for"]`` names (re-rank reads them without a key lookup)
ROWS_FILE = "store_rows.npy"

# `factory="auto"` stays exact (Flat) below this many vectors; see `resolve_factory`.
AUTO_FLAT_MAX = 50_000

#: queries re-ranked per gather from the store: their distinct candidates, at most 64 x 300 x
#: 512-d float32 = 39 MB, are the memory a re-rank holds
_RERANK_BLOCK = 64


@functools.lru_cache(maxsize=None)
def _fp16_decoder(dim: int) -> faiss.ScalarQuantizer:
    """FAISS's fp16 scalar quantizer for ``dim`` (needs no training), to widen stored rows."""
    return faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)

_TRAIN_ERROR = re.compile(r"Number of training points \((\d+)\) should be at least as large as number of clusters \((\d+)\)")


# ---------------------------------------------------------------------------- validation


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    return metric


def _check_space(space: str | None) -> str | None:
    if space is not None and (not isinstance(space, str) or not space):
        raise ValueError(f"space must be a non-empty vector-space fingerprint string or None; got {space!r}")
    return space


def as_vectors(X, *, name: str = "X", dim: int | None = None, metric: str = "l2") -> np.ndarray:
    """Validate and convert vectors for FAISS.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), real numbers
    dim : expected n_features, or None to accept any
    metric : "cosine" also L2-normalises the rows (and refuses all-zero rows)

    Returns
    -------
    ndarray of shape (n_samples, n_features), float32, C-contiguous (a copy when normalised).
    """
    arr = np.asarray(X)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = f" Use {name}.reshape(1, -1) for a single vector." if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D of shape (n_samples, n_features); got shape {arr.shape}.{hint}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: n_samples=0")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has {arr.shape[1]} features but the index holds {dim}-dimensional vectors")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    check_finite_rows(arr, name, fix="drop or re-embed them before indexing or searching")
    if metric == "cosine":
        norms = np.linalg.norm(arr, axis=1)
        zero = norms == 0
        if zero.any():
            raise ValueError(
                f"{name} has {int(zero.sum())} all-zero row(s) (first at row {np.flatnonzero(zero)[0]}); "
                "cosine similarity is undefined for them; drop them or use metric='l2'"
            )
        arr = arr / norms[:, None]
    return arr


def _as_ids(ids, n: int, *, name: str = "ids") -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of strings, not a single {type(ids).__name__}")
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} entries but X has n_samples={n}; give one id per row")
    for i, key in enumerate(ids):
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}[{i}] must be a non-empty string; got {key!r}")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(k for k in ids if k in seen or seen.add(k))
        raise ValueError(f"{name} holds duplicates (e.g. {dup!r}); each id may appear once")
    return ids


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    return int(k)


# ---------------------------------------------------------------------------- factory choice


#: `factory="auto"` compresses (IVF-PQ / IVF-SQ8 + exact re-rank from the store) from this many
#: vectors on, or earlier when the float32 vectors would not fit in `max_memory`
AUTO_COMPRESS_MIN = 1_000_000
#: memory budget of an "auto" index when none is given (bytes)
DEFAULT_MAX_MEMORY = 4 << 30
#: IVF lists from which the coarse quantizer is an HNSW graph (assigning a vector to 16k
#: centroids by brute force costs ~0.1 ms at 512-d on this 2-core machine; HNSW ~20x less)
HNSW_QUANTIZER_MIN_LISTS = 4096


def parse_bytes(text: str | int) -> int:
    """'4GB', '512MiB', '800M', 1000000 -> bytes (powers of 1024 for GB/MB/KB alike)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"max_memory must be a size such as '4GB', '512MB' or a number of bytes; got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _pq_m(dim: int, n_samples: int, budget: int) -> int | None:
    """PQ sub-quantizers: about 8 dimensions each (the FAISS wiki's usual trade-off once an exact
    re-rank restores the order), fewer when the codes must shrink to fit ``budget``."""
    for m in sorted((m for m in range(1, dim // 4 + 1) if dim % m == 0 and m <= max(1, dim // 8)), reverse=True):
        if n_samples * (m + 8) <= budget:
            return m
    return None


def resolve_factory(factory: str, n_samples: int, *, dim: int | None = None, max_memory: int | str | None = None) -> str:
    """Turn ``"auto"`` into a FAISS factory string for `n_samples` vectors; others pass verbatim.

    Why: below `AUTO_FLAT_MAX` (50,000) vectors an exact ``"Flat"`` scan of a query costs
    at most 50k dot products (~13 M flops at 256-d, well under a millisecond on a modern core), so an
    approximate index would buy nothing and cost a training pass. Above it, ``"IVF{nlist},Flat"``
    with nlist ~ 4*sqrt(n) (the low end of the FAISS wiki's 4*sqrt(n) .. 16*sqrt(n) guideline,
    rounded to a power of two) keeps k-means training cheap while a query scans only
    nprobe/nlist of the vectors. Flat codes keep distances exact within the scanned lists.

    Large spaces (``dim`` given): from `AUTO_COMPRESS_MIN` vectors, or when n * (4 * dim + 8)
    bytes exceed ``max_memory`` (default 4 GiB), a compressed index: ``IVF{nlist},SQ8`` (dim + 8
    bytes a vector) while that fits in half the budget below `AUTO_COMPRESS_MIN`, else
    ``OPQ{2m},IVF{nlist},PQ{2m}x4fs`` with m ~ dim/8 (m bytes of 4-bit fast-scan codes + 8 of
    id: 72 at 512-d; ``IVF{nlist},PQ{m}`` where 2m does not divide dim), made to fit the
    budget. nlist ~ 2*sqrt(n) there (k-means on 40*nlist points stays within minutes on 2
    cores), with an HNSW coarse quantizer from `HNSW_QUANTIZER_MIN_LISTS` lists. Such indexes
    are searched with an exact re-rank of their candidates from the store (`index_store`).
    """
    if factory != "auto":
        return factory
    if n_samples < AUTO_FLAT_MAX:
        return "Flat"
    budget = DEFAULT_MAX_MEMORY if max_memory is None else parse_bytes(max_memory)
    nlist = 2 ** round(math.log2(4 * math.sqrt(n_samples)))
    if dim is None or (n_samples < AUTO_COMPRESS_MIN and n_samples * (4 * dim + 8) <= budget):
        return f"IVF{nlist},Flat"
    nlist = 2 ** round(math.log2(2 * math.sqrt(n_samples)))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_LISTS else f"IVF{nlist}"
    if n_samples < AUTO_COMPRESS_MIN and n_samples * (dim + 8) <= budget // 2:
        return f"{coarse},SQ8"
    m = _pq_m(dim, n_samples, budget)
    if m is None:
        raise ValueError(
            f"{n_samples:,} vectors do not fit in max_memory={budget / 2**30:.2f} GiB even as 1-byte PQ codes "
            f"(>= {n_samples * 9 / 2**30:.2f} GiB); raise --max-memory"
        )
    if dim % (2 * m) == 0:
        # the same m bytes as 2m 4-bit codes, scanned with SIMD lookups ("fast scan", ~10x the
        # codes per second of 8-bit PQ), after an OPQ rotation that spreads the variance
        # evenly over the sub-spaces. benchmarks/scale.py, 2M x 512, nprobe 32 of 2048, re-rank
        # x30: PQ64 0.988 recall@10 at 1,106 q/s; PQ128x4fs 0.965 at 9,726; with OPQ 0.987 at 9,247
        return f"OPQ{2 * m},{coarse},PQ{2 * m}x4fs"
    return f"{coarse},PQ{m}"


def is_compressed(factory: str) -> bool:
    """True for factories whose codes lose precision (PQ, SQ, LSH...): searched with re-rank."""
    last = factory.split(",")[-1].upper()
    return last != "FLAT" and not last.startswith("HNSW")


def train_size(index: faiss.Index, n_samples: int) -> int:
    """Vectors to train ``index`` on (a seeded sample of that many): 40 per inverted list (FAISS
    warns below 39 per centroid; its wiki suggests 30 to 256), at least 10,000 for scalar codes
    and 65,536 for PQ codebooks (256 centroids per sub-quantizer want ~256 points each)."""
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 1
    floor = 65_536 if "PQ" in type(faiss.downcast_index(ivf if ivf is not None else index)).__name__ else 10_000
    return int(min(n_samples, max(40 * nlist, floor)))


#: least efSearch of an HNSW coarse quantizer: its default (16) finds only 84% of the right
#: 128 lists at 10M x 512 (benchmarks/scale.py: recall@10 0.936 with re-rank x30 at nprobe 128,
#: 0.972 at efSearch 128, for 0.05 ms more a query)
QUANTIZER_EF_SEARCH = 128


def fit_quantizer_search(ivf) -> None:
    """Give an HNSW coarse quantizer an efSearch of at least max(`QUANTIZER_EF_SEARCH`, nprobe),
    so that the nprobe lists it hands the inverted index are the nearest ones."""
    q = faiss.downcast_index(ivf.quantizer)
    if isinstance(q, faiss.IndexHNSW):
        q.hnsw.efSearch = max(QUANTIZER_EF_SEARCH, int(ivf.nprobe), int(q.hnsw.efSearch))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query for an IVF index: nlist/64, at least 8 (never above nlist).

    FAISS's default of 1 loses much recall as soon as neighbours straddle cell borders;
    scanning ~1.5 % of the lists gives recall@10 around 0.9+ on clustered embeddings
    (see benchmarks/search_knn.py) while still skipping ~98 % of the vectors.
    """
    return int(min(nlist, max(8, nlist // 64)))


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def _new_faiss_index(dim: int, factory: str, metric: str) -> faiss.Index:
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory must be 'Flat', 'auto' or a FAISS factory string such as 'IVF1024,Flat'; got {factory!r}")
    if factory.upper().startswith("IDMAP"):
        raise ValueError(
            f"factory {factory!r} must not contain IDMap: SimilarityIndex maps ids itself; "
            f"pass {factory.split(',', 1)[-1]!r}"
        )
    try:
        return faiss.index_factory(dim, factory, _faiss_metric(metric))
    except RuntimeError as exc:
        raise ValueError(
            f"factory {factory!r} is not a FAISS factory string FAISS accepts for dim={dim} "
            f"({faiss_reason(exc)}); examples: 'Flat', 'IVF1024,Flat', 'IVF256,PQ32', 'HNSW32'"
        ) from None


def _train(index: faiss.Index, X: np.ndarray, factory: str, random_state: int) -> None:
    n = X.shape[0]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and n < ivf.nlist:
        raise ValueError(
            f"factory {factory!r} needs at least {ivf.nlist} training vectors (one per inverted list) "
            f"but got n_samples={n}; use factory='Flat' or fewer lists (about n_samples/39, e.g. "
            f"'IVF{max(1, n // 39)},Flat')"
        )
    n_train = train_size(index, n)
    pq_index = faiss.downcast_index(ivf) if ivf is not None else None
    if getattr(pq_index, "do_polysemous_training", False):
        # the factory turns it on for IVF-PQ, but searches never use the polysemous (Hamming)
        # filter; it is ~40x the cost of the PQ codebooks (31 s vs 0.7 s for 2,500 x 192-d)
        pq_index.do_polysemous_training = False
    if n_train < n:
        rows = np.sort(np.random.default_rng(random_state).choice(n, size=n_train, replace=False))
        sample = X[rows]
    else:
        sample = X
    try:
        index.train(sample)
    except RuntimeError as exc:
        m = _TRAIN_ERROR.search(str(exc))
        if m:
            raise ValueError(
                f"factory {factory!r} needs at least {m.group(2)} training vectors but got n_samples={n}; "
                "use factory='Flat' or a smaller quantizer"
            ) from None
        raise ValueError(f"FAISS could not train factory {factory!r} on n_samples={n}: {faiss_reason(exc)}") from None


# ---------------------------------------------------------------------------- the index


class SimilarityIndex:
    """Nearest-neighbour search over vectors keyed by string ids.

    Create one with `build_index` or `open_index`; do not call the constructor directly.

    Attributes
    ----------
    factory : str, the FAISS factory string actually built ("auto" already resolved)
    metric : "cosine" (scores are cosine similarities, larger is closer) or "l2" (scores are
        squared Euclidean distances, smaller is closer)
    dim : int, n_features of every vector
    space : str or None, fingerprint of the vector space (model/layer) the vectors come from
    count : int, number of vectors currently indexed
    source : dict or None, JSON-serialisable note of where the vectors came from (for
        `index_store`: ``{"store": "/abs/store/dir"}``), saved with the index
    """

    def __init__(self, index: faiss.Index, labels: np.ndarray, *, factory: str, metric: str, space: str | None) -> None:
        self._index = index
        self._labels = labels  # label -> UTF-8 id (S dtype); b"" = removed; may be memory-mapped
        self._order: np.ndarray | None = None  # labels sorted by id (lazily computed)
        self._mmapped = False  # opened memory-mapped (read-only)
        self._store_space = None  # the store space candidates are re-ranked from (opened lazily)
        #: re-rank: search rerank*k candidates in the (compressed) index, then order them by
        #: exact scores from the store's vectors; 0 = off. Set by `index_store` for PQ/SQ.
        self.rerank = 0
        #: True once a re-ranking search found the store's shards changed (compaction) since
        #: the build; candidates are then found through the store's rebuilt key map
        self.store_changed = False
        self._store_checked = False
        #: each label's position in the store space's sorted keys when the shards were
        #: ``source["rows_for"]`` (set by `index_store`); None: found by key
        self.store_rows: np.ndarray | None = None
        self._file_bytes: int | None = None
        self.factory = factory
        self.metric = metric
        self.space = space
        self.source: dict | None = None
        self.dim = int(index.d)

    # FAISS indexes are SWIG objects and cannot be pickled; ship their serialized bytes
    # (what faiss.write_index writes) so an index can cross process boundaries.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_index"] = faiss.serialize_index(self._index)
        state["_labels"] = np.array(self._labels)
        state["_store_space"] = None
        state["_store_checked"] = False
        state["_mmapped"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["_index"] = faiss.deserialize_index(state["_index"])
        self.__dict__.update(state)

    # -- introspection

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(key) and self._lookup([key])[0] >= 0

    def __repr__(self) -> str:
        space = f", space={self.space!r}" if self.space else ""
        return f"SimilarityIndex(factory={self.factory!r}, metric={self.metric!r}, dim={self.dim}, count={self.count}{space})"

    @property
    def ids(self) -> list[str]:
        """The indexed ids, in the order they were added."""
        return [b.decode() for b in self._labels if b]

    @property
    def nprobe(self) -> int | None:
        """Inverted lists scanned per query (IVF indexes); None for indexes without lists."""
        ivf = faiss.try_extract_index_ivf(self._index)
        return None if ivf is None else int(ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is None:
            raise ValueError(f"nprobe applies to IVF indexes only; factory {self.factory!r} has no inverted lists")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= ivf.nlist:
            raise ValueError(f"nprobe must be an integer in [1, nlist={ivf.nlist}]; got {value!r}")
        ivf.nprobe = int(value)
        fit_quantizer_search(ivf)

    def _sorted_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.argsort(self._labels, kind="stable")
        return self._order

    def _lookup(self, ids) -> np.ndarray:
        """Labels of ``ids`` (str sequence or ``S`` array), -1 where not indexed: a binary search
        over the ids in sorted order, no Python object per indexed id."""
        q = ids if isinstance(ids, np.ndarray) and ids.dtype.kind == "S" else np.array([k.encode() for k in ids], dtype="S")
        out = np.full(len(q), -1, dtype=np.int64)
        if len(self._labels) == 0 or len(q) == 0:
            return out
        order = self._sorted_order()
        pos = np.minimum(np.searchsorted(self._labels, q, sorter=order), len(order) - 1)
        cand = order[pos]
        hit = (self._labels[cand] == q) & (q != b"")
        out[hit] = cand[hit]
        return out

    def _writable(self, what: str) -> None:
        if self._mmapped:
            raise ValueError(f"cannot {what} an index opened memory-mapped (read-only); open it with open_index(path)")
        if isinstance(self._labels, np.memmap) or not self._labels.flags.writeable:
            self._labels = np.array(self._labels)

    def _check_space(self, space: str | None, what: str) -> None:
        _check_space(space)
        if space is not None and space != self.space:
            built = f"vector space {self.space!r}" if self.space else "no vector-space fingerprint"
            raise FingerprintMismatchError(
                f"cannot {what} vectors of space {space!r}: this index was built for {built}; "
                "build a separate index for that model/layer"
            )

    def _labels_of(self, ids: Sequence[str]) -> np.ndarray:
        labels = self._lookup(list(ids))
        missing = np.flatnonzero(labels < 0)
        if len(missing):
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UnknownIdError(f"id {ids[int(missing[0])]!r}{more} is not in the index (count={self.count})")
        return labels

    # -- mutation

    def add(self, X, ids: Iterable[str], *, space: str | None = None) -> int:
        """Add the rows of `X` whose ids are not indexed yet; rows with known ids are skipped.

        No retraining and no rebuild: IVF indexes keep the lists learnt by `build_index`.

        Parameters
        ----------
        X : array-like of shape (n_samples, dim), float32 (other real dtypes are cast)
        ids : sequence of n_samples unique non-empty strings
        space : fingerprint of the space `X` comes from; refused if it is not this index's

        Returns
        -------
        int, the number of vectors added.
        """
        self._check_space(space, "add")
        Xv = as_vectors(X, dim=self.dim, metric=self.metric)
        return self._add(Xv, _as_ids(ids, Xv.shape[0]))

    def _add(self, Xv: np.ndarray, ids) -> int:
        """Add rows whose ids (str list or ``S`` array) are not indexed yet."""
        encoded = ids if isinstance(ids, np.ndarray) and ids.dtype.kind == "S" else np.array([k.encode() for k in ids])
        new = self._lookup(encoded) < 0
        if not new.any():
            return 0
        return self._append(Xv[new], encoded[new])

    def _append(self, Xv: np.ndarray, encoded: np.ndarray) -> int:
        """Add rows whose ids (``S`` array) are known to be new and unique."""
        self._writable("add to")
        start = len(self._labels)
        labels = np.arange(start, start + len(encoded), dtype=np.int64)
        self._index.add_with_ids(np.ascontiguousarray(Xv), labels)
        width = max(self._labels.dtype.itemsize, encoded.dtype.itemsize, 1)
        self._labels = np.concatenate([self._labels.astype(f"S{width}", copy=False), encoded.astype(f"S{width}", copy=False)])
        self._order = None
        return len(encoded)

    def remove(self, ids: Iterable[str]) -> int:
        """Remove vectors by id. Unknown ids raise `UnknownIdError` (nothing is removed then).

        Works for Flat and IVF indexes; graph indexes (HNSW) cannot remove and raise ValueError.
        Returns the number of vectors removed.
        """
        ids = list(dict.fromkeys(ids))
        if not ids:
            return 0
        labels = self._labels_of(ids)
        self._writable("remove from")
        try:
            removed = int(self._index.remove_ids(labels))
        except RuntimeError as exc:
            raise ValueError(
                f"factory {self.factory!r} does not support removal ({faiss_reason(exc)}); "
                "rebuild the index without these ids"
            ) from None
        self._labels[labels] = b""
        self._order = None
        return removed

    # -- queries

    def search(self, Q, k: int = 10, *, space: str | None = None, clip: bool = False) -> tuple[np.ndarray, list[list[str | None]]]:
        """The `k` nearest indexed vectors of each query row.

        Parameters
        ----------
        Q : array-like of shape (n_queries, dim)
        k : number of neighbours; k > count is refused unless ``clip=True`` (then k = count)
        space : fingerprint of the space `Q` comes from; refused if it is not this index's

        Returns
        -------
        scores : ndarray of shape (n_queries, k), float32, best first (cosine similarity, or
            squared L2 distance for metric="l2")
        ids : list of n_queries lists of k ids. An IVF index whose probed lists hold fewer
            than k vectors pads with id None and score NaN; raise `nprobe` to avoid that.
        """
        self._check_space(space, "search with")
        Qv = as_vectors(Q, name="Q", dim=self.dim, metric=self.metric)
        k = self._clip_k(_check_k(k), clip)
        return self._search(Qv, k)

    def search_by_id(self, ids: Sequence[str], k: int = 10, *, clip: bool = False) -> tuple[np.ndarray, list[list[str | None]]]:
        """`search` with the indexed vectors of `ids` as queries (each finds itself first).

        For compressed indexes (PQ, SQ) the query is the decoded, approximate vector.
        """
        if isinstance(ids, str):
            raise ValueError("ids must be a sequence of ids; wrap a single id in a list")
        k = self._clip_k(_check_k(k), clip)
        space = self._rerank_space()
        if space is not None:  # the exact stored vectors, not the decoded codes
            Q = self._store_vectors(space, self._labels[self._labels_of(list(ids))])
        else:
            Q = self.reconstruct(ids)
        if self.metric == "cosine":  # decoding compressed codes can drift off the unit sphere
            Q /= np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        return self._search(Q, k)

    def reconstruct(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of `ids`, ndarray of shape (len(ids), dim), float32.

        For metric="cosine" these are the L2-normalised vectors; compressed indexes return
        their approximate decoding.
        """
        labels = self._labels_of(list(ids))
        try:
            return np.ascontiguousarray(self._index.reconstruct_batch(labels), dtype=np.float32)
        except RuntimeError as exc:
            raise ValueError(f"factory {self.factory!r} cannot return stored vectors ({faiss_reason(exc)})") from None

    def _clip_k(self, k: int, clip: bool) -> int:
        if self.count == 0:
            raise ValueError("the index is empty (count=0); add vectors before searching")
        if k > self.count:
            if not clip:
                raise ValueError(
                    f"k={k} is larger than the number of indexed vectors (count={self.count}); "
                    f"pass k<={self.count} or clip=True"
                )
            k = self.count
        return k

    def _rerank_space(self):
        """The store space to re-rank from, or None (no re-rank, or no store recorded)."""
        if not self.rerank or not (self.source or {}).get("store") or not self.space:
            return None
        if self._store_space is None:
            from featurebank.store import open_store

            store = open_store(self.source["store"], create=False, catalog=False)
            self._store_space = store.space(self.space)
        return self._store_space

    def _check_store(self, space) -> None:
        """Set `store_changed`, once per opened index (a listing of the shard folder): compacted
        or grown since the build, rows are then found by key through the store's key map, which
        the store rebuilds (re-maps) when its shards changed."""
        if not self._store_checked:
            built = (self.source or {}).get("shards")
            self.store_changed = built is not None and _shards_signature(space) != built
            self._store_checked = True

    def _store_vectors(self, space, keys: np.ndarray) -> np.ndarray:
        """Exact vectors of indexed ``keys`` (S array) from the store (memory-mapped shards, key
        map persisted by the store); refuses when some are gone."""
        self._check_store(space)
        X, found = space.get(keys)
        if not found.all():
            raise IndexFileError(
                f"{int((~found).sum())} indexed vectors are no longer in the store {self.source['store']} "
                f"(e.g. {keys[~found][0].decode()}; quarantined or removed since the index was built); rebuild it: "
                f"featurebank index build --store {self.source['store']} --space {self.space} --index INDEX --rebuild"
            )
        return X

    def _candidates(self, space, labels: np.ndarray) -> np.ndarray:
        """Store vectors of index ``labels``: by their recorded rows while the store's shards
        are those the rows were taken from (no key lookup: at 10M keys a lookup is ~23 cache
        misses), else by key."""
        rows = self.store_rows
        src = self.source or {}
        if rows is not None and len(rows) == len(self._labels) and src.get("rows_for") is not None:
            self._check_store(space)
            at = np.asarray(rows[labels], dtype=np.int64)
            if not self.store_changed and src.get("rows_for") == src.get("shards") and (at >= 0).all():
                if space.dtype != "float16":
                    return space.gather(at)
                # fp16 rows copied as they are, widened by FAISS's F16C decoder (numpy's cast
                # was most of a re-rank's time: ~0.8 ns a value, 0.4 us per 512-d candidate)
                return _fp16_decoder(self.dim).decode(space.gather(at, dtype="float16").view(np.uint8))
        return self._store_vectors(space, self._labels[labels])

    def _search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        space = self._rerank_space()
        if space is not None:
            D, I = self._rerank(space, Q, k)
        else:
            D, I = self._index.search(Q, k)
        D = np.asarray(D, dtype=np.float32)
        missing = I < 0
        D[missing] = np.nan
        names = self._labels[np.where(missing, 0, I)]
        out = [[None if miss else b.decode() for b, miss in zip(row, mrow)] for row, mrow in zip(names, missing)]
        return D, out

    def _rerank(self, space, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search ``rerank * k`` candidates in the index, then order them by exact scores
        computed from the store's vectors: per block of queries, one gather of their distinct
        candidates, then FAISS's ``knn_*_by_idx`` scores each query against its own candidates
        only (no query x candidate x dim array), so memory is bounded by the block."""
        kc = min(self.count, k * self.rerank)
        _, I_all = self._index.search(Q, kc)
        D_out = np.empty((len(Q), k), np.float32)
        I_out = np.empty((len(Q), k), np.int64)
        knn = faiss.knn_inner_products_by_idx if self.metric == "cosine" else faiss.knn_L2sqr_by_idx
        for s in range(0, len(Q), _RERANK_BLOCK):
            q, I = np.ascontiguousarray(Q[s : s + _RERANK_BLOCK], dtype=np.float32), I_all[s : s + _RERANK_BLOCK]
            live = I >= 0
            uniq, inv = np.unique(I[live], return_inverse=True)
            V = np.ascontiguousarray(self._candidates(space, uniq), dtype=np.float32)
            if self.metric == "cosine":
                faiss.normalize_L2(V)  # in place, C++; zero rows stay zero
            sub = np.full(I.shape, -1, np.int64)  # each query's candidates as rows of V; -1 skipped
            sub[live] = inv
            D = np.empty((len(q), k), np.float32)
            J = np.empty((len(q), k), np.int64)
            knn(faiss.swig_ptr(q), faiss.swig_ptr(V), faiss.swig_ptr(sub), self.dim, len(q), len(uniq), kc, k,
                faiss.swig_ptr(D), faiss.swig_ptr(J), kc)  # ld_ids given: its default -1 reads row 0 only (1.15)
            D_out[s : s + len(q)] = D
            I_out[s : s + len(q)] = np.where(J >= 0, uniq[np.clip(J, 0, None)] if len(uniq) else -1, -1)
        return np.where(I_out < 0, np.nan, D_out).astype(np.float32), I_out

    def range_search(self, Q, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All indexed vectors within `threshold` of each (already validated) query row.

        Cosine keeps similarity >= threshold; l2 keeps squared distance <= threshold.

        Returns
        -------
        lims : ndarray (n_queries + 1,), int64, results of query i are [lims[i], lims[i+1])
        scores : ndarray (n_results,), float32
        labels : ndarray (n_results,), int64, internal labels (see `id_of_labels`)
        """
        Qv = as_vectors(Q, name="Q", dim=self.dim, metric=self.metric)
        ip = self.metric == "cosine"
        # FAISS keeps strictly-better results (ip: > radius, l2: < radius); widen by one ulp
        # and filter exactly so that "similarity >= threshold" holds at the boundary.
        radius = np.nextafter(np.float32(threshold), np.float32(-np.inf if ip else np.inf))
        try:
            lims, D, I = self._index.range_search(Qv, float(radius))
        except RuntimeError as exc:
            raise ValueError(f"factory {self.factory!r} does not support range search ({faiss_reason(exc)})") from None
        lims = lims.astype(np.int64)  # FAISS hands back uint64
        keep = (D >= threshold) if ip else (D <= threshold)
        query_of = np.repeat(np.arange(Qv.shape[0]), np.diff(lims))
        counts = np.bincount(query_of[keep], minlength=Qv.shape[0])
        new_lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return new_lims, D[keep].astype(np.float32), I[keep].astype(np.int64)

    def id_of_labels(self, labels: np.ndarray) -> list[str]:
        """Ids of internal labels as returned by `range_search`."""
        return [b.decode() for b in self._labels[np.asarray(labels, dtype=np.int64)]]

    # -- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to directory `path` atomically and return the path.

        The files go to a temporary sibling directory first, are fsynced, then that
        directory is renamed into place (an existing index there is swapped out and
        deleted). A non-empty directory that is not an index is never overwritten.
        """
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"cannot save the index to {path}: it exists and is not a directory")
            if any(path.iterdir()) and not (path / META_FILE).is_file():
                raise ValueError(f"refusing to overwrite {path}: it is a non-empty directory without {META_FILE}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(path) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            self._file_bytes = (tmp / INDEX_FILE).stat().st_size
            with open(tmp / IDS_FILE, "wb") as fh:
                np.save(fh, self._labels, allow_pickle=False)
            with open(tmp / ORDER_FILE, "wb") as fh:
                np.save(fh, self._sorted_order(), allow_pickle=False)
            if self.store_rows is not None and len(self.store_rows) == len(self._labels):
                with open(tmp / ROWS_FILE, "wb") as fh:
                    np.save(fh, np.asarray(self.store_rows), allow_pickle=False)
            with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
                json.dump(self.info(), fh, indent=2)
                fh.write("\n")
        return path

    def info(self) -> dict:
        """What index.json records: factory, metric, dim, count, nprobe, space, source, versions."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "factory": self.factory,
            "metric": self.metric,
            "dim": self.dim,
            "count": self.count,
            "nprobe": self.nprobe,
            "rerank": self.rerank,
            "space": self.space,
            "source": self.source,
            "featurebank_version": __version__,
            "faiss_version": faiss.__version__,
            "index_bytes": self.nbytes,
            "index_bytes_per_vector": None if self.nbytes is None else round(self.nbytes / max(self.count, 1), 2),
        }

    @property
    def nbytes(self) -> int | None:
        """Bytes of the saved FAISS index file (codes, FAISS ids, quantizers, direct map; the id
        strings in ``ids.npy`` and ``ids_order.npy`` are counted apart); None until saved or opened."""
        return self._file_bytes


# ---------------------------------------------------------------------------- public functions


def build_index(
    X,
    ids: Iterable[str],
    *,
    factory: str = "Flat",
    metric: str = "cosine",
    space: str | None = None,
    nprobe: int | None = None,
    random_state: int = 0,
) -> SimilarityIndex:
    """Build a similarity index over the rows of `X`.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), float32 (other real dtypes are cast);
        NaN/inf rows are refused.
    ids : sequence of n_samples unique non-empty strings (store content keys or paths)
    factory : "Flat" (exact), "auto" (see `resolve_factory`: Flat below 50,000 vectors,
        else "IVF{~4*sqrt(n)},Flat"), or any FAISS factory string verbatim, e.g.
        "IVF1024,Flat", "IVF256,PQ32", "HNSW32".
    metric : "cosine" (L2-normalise, then inner product) or "l2" (squared Euclidean)
    space : fingerprint of the vector space (model/layer) the vectors come from; later
        adds and searches that name another space are refused.
    nprobe : inverted lists scanned per query for IVF factories (default `default_nprobe`)
    random_state : seed of the training sample for factories that need training

    Indexes that need training (IVF, PQ) are trained on a seeded sample of at most
    max(40 * nlist, 10,000) rows; too few rows raise ValueError naming n_samples.
    """
    _check_metric(metric)
    _check_space(space)
    Xv = as_vectors(X, metric=metric)
    ids = _as_ids(ids, Xv.shape[0])
    resolved = resolve_factory(factory, Xv.shape[0])
    inner = _new_faiss_index(Xv.shape[1], resolved, metric)
    if not inner.is_trained:
        _train(inner, Xv, resolved, random_state)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        # IVF indexes store our labels natively. IndexIDMap around them would be wrong after
        # remove_ids (it compacts its label table while IVF keeps internal ids), and the hash
        # direct map lets reconstruct() find vectors by label.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.nprobe = default_nprobe(ivf.nlist)
        index = inner
    else:
        index = faiss.IndexIDMap2(inner)
    sim = SimilarityIndex(index, np.array([], dtype="S1"), factory=resolved, metric=metric, space=space)
    if nprobe is not None:
        sim.nprobe = nprobe
    sim._add(Xv, ids)
    return sim


def _shards_signature(space) -> str:
    """Which shard files a store space consists of: compaction and quarantine change it."""
    import hashlib

    return hashlib.sha256("\n".join(p.name for p in space.shards()).encode()).hexdigest()[:16]


def open_index(path: str | os.PathLike, *, mmap: bool = False) -> SimilarityIndex:
    """Load an index saved by `SimilarityIndex.save`; checks that its files agree.

    mmap : memory-map the FAISS index (codes and inverted lists) and the id arrays instead of
        reading them: opening costs ~nothing whatever the size and pages are read as searches
        touch them. The index is then read-only (add/remove raise ValueError)."""
    path = Path(path)
    if not path.is_dir():
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*/index")) if path.parent.is_dir() else []
        hint = f"; an interrupted save left the previous index at {leftovers[0]}, move it back" if leftovers else ""
        raise FileNotFoundError(2, f"no similarity index directory{hint}", str(path))
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFileError(f"{path} is not a similarity index: {META_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"{meta_path} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise IndexFileError(f"{meta_path} is not a featurebank similarity index description")
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise IndexFileError(
            f"{path} has index format_version {meta.get('format_version')!r}; this featurebank "
            f"({__version__}) reads versions {_READABLE_VERSIONS[0]} to {FORMAT_VERSION}; rebuild the index or upgrade featurebank"
        )
    for key in ("factory", "metric", "dim", "count"):
        if key not in meta:
            raise IndexFileError(f"{meta_path} lacks the field {key!r}")
    if meta["metric"] not in METRICS:
        raise IndexFileError(f"{meta_path} names unknown metric {meta['metric']!r}")
    flags = 0
    if mmap:  # inverted lists of IVF indexes, or the codes of flat-code indexes (Flat, SQ, PQ)
        flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if "IVF" in str(meta["factory"]).upper() else faiss.IO_FLAG_MMAP_IFC)
    try:
        index = faiss.read_index(str(path / INDEX_FILE), flags)
    except RuntimeError as exc:
        raise IndexFileError(f"{path / INDEX_FILE} cannot be read by FAISS: {faiss_reason(exc)}") from None
    try:
        labels = np.load(path / IDS_FILE, allow_pickle=False, mmap_mode="r" if mmap else None)
        # version 1 has no order file: computed when first needed (migrated by the next save)
        order = np.load(path / ORDER_FILE, allow_pickle=False, mmap_mode="r") if (path / ORDER_FILE).is_file() else None
    except (OSError, ValueError) as exc:
        raise IndexFileError(f"{path / IDS_FILE} is unreadable: {exc}") from None
    if labels.ndim != 1 or labels.dtype.kind != "S":
        raise IndexFileError(f"{path / IDS_FILE} must be a 1-D bytes array; got {labels.dtype} {labels.shape}")
    n_live = int(np.count_nonzero(labels))
    if not (index.ntotal == meta["count"] == n_live) or index.d != meta["dim"]:
        raise IndexFileError(
            f"{path} is inconsistent: FAISS holds {index.ntotal} vectors of dim {index.d}, "
            f"{IDS_FILE} names {n_live} ids, {META_FILE} says count={meta['count']} dim={meta['dim']}; rebuild it"
        )
    if order is not None and (order.shape != labels.shape or order.dtype != np.int64):
        raise IndexFileError(f"{path / ORDER_FILE} does not match {IDS_FILE}; rebuild the index")
    sim = SimilarityIndex(index, labels, factory=meta["factory"], metric=meta["metric"], space=meta.get("space"))
    sim._order = order
    sim._mmapped = mmap
    sim._file_bytes = (path / INDEX_FILE).stat().st_size
    sim.source = meta.get("source")
    if (path / ROWS_FILE).is_file():
        try:
            rows = np.load(path / ROWS_FILE, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"{path / ROWS_FILE} is unreadable: {exc}; rebuild the index") from None
        if rows.shape != labels.shape or rows.dtype.kind != "i":
            raise IndexFileError(f"{path / ROWS_FILE} does not match {IDS_FILE}; rebuild the index")
        sim.store_rows = rows
    sim.rerank = int(meta.get("rerank") or 0)
    if meta.get("nprobe") is not None and sim.nprobe is not None:
        sim.nprobe = int(meta["nprobe"])
    return sim
