"""Checks on vectors that several rooms with no common upstream room make (the store, the
classifiers, the search indexes): each raises a ``ValueError`` that says which rows are at
fault and how to fix them."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["check_finite_rows"]


def check_finite_rows(X: np.ndarray, name: str = "X", *, fix: str, keys: Sequence[str | bytes] | None = None) -> None:
    """Refuse NaN or inf in ``X``, naming how many rows hold them and the first ones.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    name : what the caller calls ``X`` in its own signature
    fix : how to fix it, in the caller's terms
    keys : one name per row (e.g. content keys, str or ASCII bytes); the first bad row's is quoted

    A non-finite vector means an image or the model failed upstream; dropping or imputing it
    silently would hide that.

    >>> check_finite_rows(np.array([[0.0, 1.0], [np.nan, 1.0]]), fix="re-embed them")
    Traceback (most recent call last):
    ...
    ValueError: X has NaN or inf in 1 of 2 rows (rows 1); re-embed them
    """
    finite = np.isfinite(X).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    rows = ", ".join(str(int(i)) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    if keys is not None:
        key = keys[int(bad[0])]
        first_key = f"; first key {key.decode() if isinstance(key, bytes) else key}"
    else:
        first_key = ""
    raise ValueError(f"{name} has NaN or inf in {len(bad)} of {X.shape[0]} rows (rows {rows}{first_key}); {fix}")
