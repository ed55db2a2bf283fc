"""featurebank.search: FAISS similarity indexes over embedding vectors.

Build, persist, query and grow an index keyed by the store's content keys, and group
near-duplicates. Imports faiss, numpy and featurebank.store only (never torch).
"""

from featurebank.search.dedup import find_duplicates, find_index_duplicates, write_duplicates
from featurebank.search.index import SimilarityIndex, build_index, open_index, resolve_factory
from featurebank.search.indexing import find_store_duplicates, index_store, store_paths
from featurebank.search.query import Neighbour, query_index

__all__ = [
    "SimilarityIndex",
    "build_index",
    "open_index",
    "resolve_factory",
    "find_duplicates",
    "find_index_duplicates",
    "write_duplicates",
    "index_store",
    "find_store_duplicates",
    "store_paths",
    "Neighbour",
    "query_index",
]
