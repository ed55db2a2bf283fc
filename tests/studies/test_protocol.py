"""The protocol: seeded stratified folds, shot draws from the pool only, and fold scoring
in which nothing computed from a test row reaches the model that scores it."""

from __future__ import annotations

import numpy as np
import pytest

from featurebank.classifiers import LinearProbe
from featurebank.studies import draw_shots, make_folds, score_folds
from featurebank.studies.protocol import check_labels, holdout_split


def _blobs(n_per_class=20, n_features=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(["a", "b", "c"]), n_per_class)
    means = rng.normal(0, 1.5, size=(3, n_features))
    X = (means[np.searchsorted(["a", "b", "c"], y)] + rng.normal(size=(len(y), n_features))).astype(np.float32)
    return X, y


def test_folds_are_stratified_partition_and_seeded():
    y = np.repeat(["a", "b", "c"], [10, 20, 30])
    folds = make_folds(y, 5, seed=0)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(60))  # every row tested exactly once
    for tr, te in folds:
        assert np.intersect1d(tr, te).size == 0 and len(tr) + len(te) == 60
        assert sorted(np.unique(y[te], return_counts=True)[1].tolist()) == [2, 4, 6]
    again = make_folds(y, 5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = make_folds(y, 5, seed=1)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_folds_refuse_classes_smaller_than_the_fold_count():
    y = np.array(["a"] * 10 + ["b"] * 3)
    with pytest.raises(ValueError, match=r"folds=5 needs at least 5 images per class.*'b' \(3\).*Lower --folds"):
        make_folds(y, 5, seed=0)
    with pytest.raises(ValueError, match="folds must be an int >= 2; got folds=1"):
        make_folds(y, 1, seed=0)


def test_fold_model_is_a_function_of_its_training_rows_only():
    """Replacing the test rows of fold 0 by wild values changes nothing in fold 0's model:
    its standardisation and its choice of C never saw them."""
    X, y = _blobs()
    folds = make_folds(y, 4, seed=0)
    probe = LinearProbe(cv=3, random_state=0)
    clean = score_folds(probe, X, y, folds, keep_estimators=True)
    X_bad = X.copy()
    X_bad[folds[0][1]] = 1e3 * np.random.default_rng(1).normal(size=(len(folds[0][1]), X.shape[1]))
    dirty = score_folds(probe, X_bad, y, folds, keep_estimators=True)
    a, b = clean.estimators[0], dirty.estimators[0]
    np.testing.assert_array_equal(a.scaler_.mean_, b.scaler_.mean_)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.C_ == b.C_
    # the scaler was fitted on the training rows, not on all rows
    tr = folds[0][0]
    np.testing.assert_allclose(a.scaler_.mean_, X[tr].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.scaler_.mean_, X.mean(axis=0), atol=1e-4)
    # and the same as a probe fitted on those rows alone
    alone = LinearProbe(cv=3, random_state=0).fit(X[tr], y[tr])
    assert alone.C_ == a.C_
    np.testing.assert_array_equal(alone.coef_, a.coef_)


def test_score_folds_refuses_overlapping_folds():
    X, y = _blobs()
    with pytest.raises(ValueError, match="a fold has 2 rows in both its training and its test part"):
        score_folds(LinearProbe(cv=3), X, y, [(np.arange(0, 40), np.arange(38, 60))])


def test_draw_shots_takes_k_per_class_from_the_pool_only():
    y_pool = np.repeat(["x", "y"], [7, 9])
    idx = draw_shots(y_pool, 5, np.random.default_rng(0))
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert idx.max() < len(y_pool)
    assert np.unique(y_pool[idx], return_counts=True)[1].tolist() == [5, 5]
    assert not np.array_equal(idx, draw_shots(y_pool, 5, np.random.default_rng(1)))
    np.testing.assert_array_equal(idx, draw_shots(y_pool, 5, np.random.default_rng(0)))
    with pytest.raises(ValueError, match=r"class 'x' has 7 images in the training pool, fewer than shots=8"):
        draw_shots(y_pool, 8, np.random.default_rng(0))


def test_holdout_split_is_stratified_disjoint_and_validated():
    y = np.repeat(["a", "b"], [30, 10])
    pool, test = holdout_split(y, 0.25, seed=0)
    assert np.intersect1d(pool, test).size == 0 and len(pool) + len(test) == 40
    assert np.unique(y[test], return_counts=True)[1].tolist() == [8, 2]
    pool_n, test_n = holdout_split(y, 6, seed=0)
    assert len(test_n) == 6
    with pytest.raises(ValueError, match="test_size must be a float in"):
        holdout_split(y, 1.5, seed=0)
    with pytest.raises(ValueError, match=r"test_size=1 must hold at least one image per class \(2\)"):
        holdout_split(y, 1, seed=0)
    with pytest.raises(ValueError, match=r"classes \['c'\] have a single image"):
        holdout_split(np.array(["a", "a", "b", "b", "c"]), 0.4, seed=0)


def test_check_labels_refuses_unlabelled_and_single_class():
    with pytest.raises(ValueError, match=r"2 of 3 images of the source have no label.*class subfolders"):
        check_labels(["a", None, None])
    with pytest.raises(ValueError, match=r"single class \(\['a'\]\)"):
        check_labels(["a", "a"])
