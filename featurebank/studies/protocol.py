"""The evaluation protocol of the studies: seeded stratified folds, per-class shot draws,
and fold scoring where every fitting step sees the training rows only.

Leakage is prevented by construction: :func:`score_folds` hands each fold's estimator
``X[train]`` alone, and the estimators standardise and choose their hyper-parameters inside
``fit`` (``LinearProbe`` fits its ``StandardScaler`` and picks ``C`` on inner splits of the
data it is given), so nothing computed from a test row reaches a model that scores it.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["make_folds", "holdout_split", "draw_shots", "score_folds", "FoldScores", "check_labels", "one_blas_thread"]


def one_blas_thread():
    """A context in which BLAS runs on one thread.

    A study fits hundreds of small models (lbfgs on a few thousand rows at most): OpenBLAS's
    threads cost more in synchronisation than they bring there, and on a busy machine they
    wait on each other. Measured on the shared 2-core dev machine (load ~9), LinearProbe
    fits took 0.29 s vs 11.2 s (400 x 256, 10 classes) and 1.5 s vs 32 s (1600 x 1280)
    with 1 vs 2 BLAS threads.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def check_labels(labels: Sequence[Any], what: str = "source") -> np.ndarray:
    """Labels as an array; refuse unlabelled images and single-class sets."""
    missing = [i for i, lab in enumerate(labels) if lab is None]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(labels)} images of the {what} have no label; a study needs labelled images: "
            "put them in class subfolders (folder/CLASS/img.jpg) or give a list file with a label column"
        )
    y = np.asarray(labels)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"the {what} has a single class ({classes.tolist()!r}); a study needs at least 2 classes")
    return y


def make_folds(y: Any, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified k-fold: a list of ``(train, test)`` index arrays (int64, sorted).

    The same ``(y, n_splits, seed)`` always gives the same folds, so every layer of a sweep
    is scored on identical splits.
    """
    from sklearn.model_selection import StratifiedKFold

    if not isinstance(n_splits, numbers.Integral) or isinstance(n_splits, bool) or n_splits < 2:
        raise ValueError(f"folds must be an int >= 2; got folds={n_splits!r}")
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    small = counts < n_splits
    if small.any():
        listed = ", ".join(f"{c!r} ({n})" for c, n in zip(classes[small].tolist(), counts[small].tolist()))
        raise ValueError(
            f"folds={n_splits} needs at least {n_splits} images per class (each test fold holds one of each); "
            f"these classes have fewer: {listed}. Lower --folds or add images"
        )
    splitter = StratifiedKFold(n_splits=int(n_splits), shuffle=True, random_state=int(seed))
    return [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in splitter.split(np.zeros(len(y)), y)]


def holdout_split(y: Any, test_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified ``(pool, test)`` split of indices (int64, sorted).

    test_size : float in (0, 1) (fraction) or int >= number of classes (count).
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise ValueError(f"test_size must be a float in (0, 1) or an int count; got test_size={test_size!r}")
    if isinstance(test_size, numbers.Integral):
        if not len(classes) <= test_size < len(y) - len(classes) + 1:
            raise ValueError(
                f"test_size={test_size} must hold at least one image per class ({len(classes)}) and leave at "
                f"least one per class for training (n_images={len(y)})"
            )
        n_test = int(test_size)
    else:
        if not 0.0 < float(test_size) < 1.0:
            raise ValueError(f"test_size must be a float in (0, 1) or an int count; got test_size={test_size!r}")
        n_test = max(int(np.ceil(float(test_size) * len(y))), len(classes))
    if counts.min() < 2:
        raise ValueError(
            f"classes {classes[counts < 2].tolist()!r} have a single image, so they cannot be in both the "
            "training pool and the test split; add images or drop those classes"
        )
    idx = np.arange(len(y))
    pool, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=int(seed))
    return np.sort(pool).astype(np.int64), np.sort(test).astype(np.int64)


def draw_shots(y: Any, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices of each class of ``y``, drawn without replacement: int64, sorted.

    y : array of shape (n_pool,), the labels of the training pool only (the indices
    returned index into it, so test images cannot be drawn).
    """
    y = np.asarray(y)
    out = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < k:
            raise ValueError(
                f"class {c.item() if hasattr(c, 'item') else c!r} has {len(members)} images in the training pool, "
                f"fewer than shots={k}; lower the shot count or add images"
            )
        out.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


@dataclass
class FoldScores:
    """Scores of one estimator on every fold.

    accuracy : ndarray of shape (n_folds,), float64
    fit_seconds : ndarray of shape (n_folds,), float64 (wall time of each ``fit``)
    estimators : the fitted estimator of each fold (only when ``keep_estimators=True``)
    convergence_warnings : ConvergenceWarnings the fits raised (counted, not printed: a
        sweep fits hundreds of models and weak regularisation often stops at max_iter)
    """

    accuracy: np.ndarray
    fit_seconds: np.ndarray
    estimators: list[Any]
    convergence_warnings: int = 0

    @property
    def mean(self) -> float:
        return float(self.accuracy.mean())

    @property
    def std(self) -> float:
        return float(self.accuracy.std())


def score_folds(estimator: Any, X: np.ndarray, y: Any, folds: Sequence[tuple[np.ndarray, np.ndarray]], *,
                keep_estimators: bool = False) -> FoldScores:
    """Fit a clone of ``estimator`` on each fold's training rows and score it on its test rows.

    X : ndarray of shape (n_samples, n_features); y : array of shape (n_samples,)
    folds : ``(train, test)`` index arrays, e.g. from :func:`make_folds`

    Only ``X[train]`` and ``y[train]`` reach ``fit``; the test rows are used by
    ``predict`` alone.
    """
    import warnings

    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning

    y = np.asarray(y)
    acc, secs, fitted, n_warn = [], [], [], 0
    for train, test in folds:
        overlap = np.intersect1d(train, test)
        if overlap.size:
            raise ValueError(f"a fold has {overlap.size} rows in both its training and its test part")
        est = clone(estimator)
        t = time.perf_counter()
        with one_blas_thread(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            est.fit(X[train], y[train])
        secs.append(time.perf_counter() - t)
        n_warn += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        acc.append(float(np.mean(est.predict(X[test]) == y[test])))
        if keep_estimators:
            fitted.append(est)
    return FoldScores(np.asarray(acc), np.asarray(secs), fitted, n_warn)
