"""featurebank.search: FAISS similarity indexes over embedding vectors.

Build, persist, query and grow an index keyed by the store's content keys, and group
near-duplicates. Imports faiss and numpy only (never torch).
"""

from featurebank.search.dedup import find_duplicates, find_index_duplicates, write_duplicates
from featurebank.search.index import SimilarityIndex, build_index, open_index, resolve_factory

__all__ = [
    "SimilarityIndex",
    "build_index",
    "open_index",
    "resolve_factory",
    "find_duplicates",
    "find_index_duplicates",
    "write_duplicates",
]
