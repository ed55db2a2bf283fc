"""featurebank._validation: the one finite-rows check of the store, the classifiers and the search indexes."""

from __future__ import annotations

import numpy as np
import pytest

from featurebank._validation import check_finite_rows


def test_finite_rows_pass():
    check_finite_rows(np.zeros((3, 2), np.float32), fix="unused")
    check_finite_rows(np.zeros((0, 2), np.float32), fix="unused")


def test_bad_rows_are_counted_and_the_first_five_named():
    X = np.zeros((10, 3), np.float32)
    X[[1, 2, 4, 6, 8, 9], 0] = [np.nan, np.inf, -np.inf, np.nan, np.nan, np.nan]
    with pytest.raises(ValueError, match=r"^Q has NaN or inf in 6 of 10 rows \(rows 1, 2, 4, 6, 8, \.\.\.\); drop them$"):
        check_finite_rows(X, "Q", fix="drop them")


def test_the_first_bad_rows_key_is_quoted():
    X = np.ones((3, 2))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"^X has NaN or inf in 1 of 3 rows \(rows 2; first key c\); re-embed$"):
        check_finite_rows(X, fix="re-embed", keys=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(rows 2; first key c\)"):  # the store's keys are ASCII bytes
        check_finite_rows(X, fix="re-embed", keys=np.array([b"a", b"b", b"c"]))
