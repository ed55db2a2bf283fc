"""The store's value types (hashing results, items, failures, verify reports), its format
constants and the check of a space fingerprint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from featurebank.store.shards import keys_to_array

__all__ = ["FORMAT_VERSION", "DTYPES", "HashedFiles", "FailureRecord", "Item", "VerifyReport", "check_fingerprint"]

#: On-disk layout version written to the marker file and each shard; bump on any incompatible change.
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")


def check_fingerprint(fp: Any, what: str = "space fingerprint") -> str:
    if not isinstance(fp, str):
        raise ValueError(f"{what} must be a 64-character hex string; got {type(fp).__name__}")
    try:
        keys_to_array([fp], what=what)
    except ValueError:
        raise ValueError(f"{what} must be 64 lowercase hex characters (a sha256 digest); got {fp!r}") from None
    return fp


@dataclass(frozen=True)
class HashedFiles:
    """Result of :meth:`EmbeddingStore.hash_files`, aligned with the input paths.

    paths : absolute paths, as given (not resolved through symlinks)
    keys : sha256 hex of each file's bytes, ``None`` where the file could not be read
    errors : ``None``, or why the file could not be read ("No such file or directory", ...)
    n_cached : how many keys came from the stat cache without reading the file
    n_hashed : how many files were read and hashed
    """

    paths: list[str]
    keys: list[str | None]
    errors: list[str | None]
    n_cached: int
    n_hashed: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def ok(self) -> np.ndarray:
        """ndarray of shape (n,), bool: True where a key was computed."""
        return np.array([k is not None for k in self.keys], dtype=bool)

    def failed(self) -> list[tuple[str, str]]:
        """(path, error) of each file that could not be read."""
        return [(p, e) for p, e in zip(self.paths, self.errors) if e is not None]


@dataclass(frozen=True)
class FailureRecord:
    """An image that could not be embedded into ``space``. ``time`` is a Unix timestamp."""

    path: str
    reason: str
    key: str | None = None
    space: str | None = None
    time: float | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Item:
    """A file that was embedded: its path, content key and optional label.

    ``path`` is the str Python uses for the file name: bytes that are not UTF-8 appear as
    surrogate escapes (``os.fsdecode``), so ``open(path)`` works; show it with
    :func:`featurebank.store.printable`.
    """

    path: str
    key: str
    label: str | None
    updated: float


@dataclass
class VerifyReport:
    """Result of :meth:`EmbeddingStore.verify`. ``ok`` is False when ``problems`` is not empty."""

    path: str
    n_spaces: int = 0
    n_shards: int = 0
    n_rows: int = 0
    n_vectors: int = 0
    problems: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    stale_temps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}
