"""Label issues, outliers and duplicates that hurt, found on cached vectors.

* **Label issues** by confident learning (Northcutt, Jiang & Chuang, "Confident Learning:
  Estimating Uncertainty in Dataset Labels", JAIR 2021): out-of-fold predicted probabilities
  (seeded stratified k-fold, :func:`sklearn.model_selection.cross_val_predict`), one threshold
  per class (the mean probability of class j over the images labelled j), the confident joint
  calibrated to the label counts, then, in each given class, the images with the largest margin
  towards each other class are flagged, as many as that off-diagonal entry of the joint holds
  ("prune by noise rate"). An image whose out-of-fold prediction is its given label is never
  flagged. Ranked by self-confidence (the out-of-fold probability of the given label), lowest first.
* **Outliers**: the mean cosine distance of each image to its ``k`` nearest neighbours, scored
  against the dataset's own distribution of that distance (a robust z-score: distance to the
  median in units of 1.4826 MAD); and the cosine distance to the nearest class mean, scored
  against the distances of the images to their own class mean.
* **Duplicates that hurt**: identical (same content key) or near-identical (cosine similarity
  >= ``duplicate_threshold``, :func:`featurebank.search.find_duplicates`) images with different
  labels, and images of the test set that are also (or nearly) in the training set: leakage.

The array functions here take ``X`` (n_samples, n_features) float32 and ``y`` (n_samples,)
labels; :func:`featurebank.curation.images.audit_images` joins them to image sources and a
store.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from featurebank.errors import ImageSourceError

__all__ = ["out_of_fold_proba", "find_label_issues", "baseline_label_issues", "outlier_scores", "find_conflicts",
           "find_leaks", "audit_vectors", "ISSUE_KINDS"]

#: Kinds of suspect, in the order the report ranks them (the worst for a model first).
ISSUE_KINDS = ("leakage", "conflict", "label", "outlier", "far_from_classes")

_MAD = 1.4826  # MAD -> standard deviation of a normal distribution


def _check_classes(y: np.ndarray) -> None:
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        raise ImageSourceError(
            f"only one class ({labels[0]!r}) in {len(y)} images; an audit needs at least two classes")
    small = [(str(lab), int(c)) for lab, c in zip(labels, counts) if c < 2]
    if small:
        lab, c = small[0]
        raise ImageSourceError(
            f"class {lab!r} has {c} image; every class needs at least 2 for out-of-fold probabilities "
            "(add images to it or remove the class)")


def out_of_fold_proba(X: np.ndarray, y: Sequence[Any], *, classifier: str = "probe",
                      params: Mapping[str, Any] | None = None, cv: int = 5, random_state: int = 0
                      ) -> tuple[np.ndarray, list[Any]]:
    """Out-of-fold predicted probabilities: ``(proba, classes)``.

    proba : ndarray of shape (n_samples, n_classes), float64; row i comes from a classifier
        that never saw image i. classes : sorted labels, the columns of ``proba``.

    Folds are stratified and shuffled with ``random_state``; a class with fewer than ``cv``
    images lowers the number of folds to its size (at least 2). ``classifier`` is a name for
    :func:`featurebank.classifiers.make_classifier` (it needs ``predict_proba``); the default
    probe chooses C once, on one 20% validation split of all the images (``cv=0.2``), and
    refits at that C in each fold (pass ``params={"Cs": ...}`` to fix C yourself).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from featurebank.classifiers import make_classifier

    y = np.asarray(y, dtype=object)
    _check_classes(y)
    if not isinstance(cv, int) or isinstance(cv, bool) or cv < 2:
        raise ValueError(f"cv must be an int >= 2 (folds); got cv={cv!r}")
    params = dict(params or {})
    classes, codes, counts = np.unique(y.astype(str), return_inverse=True, return_counts=True)
    X = np.asarray(X, dtype=np.float32)
    if classifier == "probe":
        params.setdefault("cv", 0.2)
        params.setdefault("random_state", random_state)
        if "Cs" not in params:
            # C is chosen once, on one validation split of all the images, and each fold refits
            # at that C: 5x fewer fits than a C search per fold (a 10,000-image audit in seconds)
            params["Cs"] = [make_classifier("probe", **params).fit(X, codes).C_]
    est = make_classifier(classifier, **params)
    if not hasattr(est, "predict_proba"):
        raise ValueError(f"classifier {classifier!r} has no predict_proba; an audit needs probabilities "
                         "(SVC needs --param probability=true)")
    folds = int(min(cv, counts.min()))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
    proba = cross_val_predict(est, X, codes, cv=splitter, method="predict_proba")
    return np.asarray(proba, dtype=np.float64), [str(c) for c in classes]


def _codes(y: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    pos = {str(c): i for i, c in enumerate(classes)}
    return np.array([pos[str(v)] for v in y], dtype=np.int64)


def find_label_issues(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Indices of likely label errors by confident learning (prune by noise rate), ranked
    by self-confidence, lowest first.

    labels : ndarray of shape (n_samples,), int, the given class of each image (column of proba)
    proba : ndarray of shape (n_samples, n_classes), out-of-fold probabilities

    >>> p = np.array([[.9, .1], [.8, .2], [.7, .3], [.2, .8], [.1, .9], [.85, .15]])
    >>> find_label_issues(np.array([0, 0, 0, 1, 1, 1]), p).tolist()
    [5]
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, k = proba.shape
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    self_conf = proba[np.arange(n), labels]
    # per-class thresholds: the mean probability of class j among images labelled j
    thresholds = np.array([proba[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    above = proba >= thresholds[None, :] - 1e-12
    masked = np.where(above, proba, -np.inf)
    confident = np.argmax(masked, axis=1)
    has = above.any(axis=1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[has], confident[has]), 1.0)
    # calibrate: each row sums to the number of images with that given label
    rows = joint.sum(axis=1, keepdims=True)
    joint = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * counts[:, None]
    flagged = np.zeros(n, dtype=bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        if len(members) <= 1:
            continue
        for j in range(k):
            if j == i:
                continue
            m = int(round(joint[i, j]))
            if m <= 0:
                continue
            m = min(m, len(members) - 1)  # never the whole class
            margin = proba[members, j] - proba[members, i]
            flagged[members[np.argsort(-margin, kind="stable")[:m]]] = True
    flagged &= np.argmax(proba, axis=1) != labels
    idx = np.flatnonzero(flagged)
    return idx[np.argsort(self_conf[idx], kind="stable")]


def baseline_label_issues(labels: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The simple baseline: images whose out-of-fold probability of the given label is below
    one global ``threshold``, lowest first."""
    labels = np.asarray(labels, dtype=np.int64)
    self_conf = proba[np.arange(len(labels)), labels]
    idx = np.flatnonzero(self_conf < threshold)
    return idx[np.argsort(self_conf[idx], kind="stable")]


def _normalised(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def _robust_z(d: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    ref = d if reference is None else reference
    med = float(np.median(ref))
    mad = float(np.median(np.abs(ref - med))) * _MAD
    return (d - med) / max(mad, 1e-12)


def outlier_scores(X: np.ndarray, y: Sequence[Any] | None = None, *, k: int = 10
                   ) -> dict[str, np.ndarray]:
    """Per image: ``knn_distance`` (mean cosine distance to its ``k`` nearest other images),
    ``knn_score`` (its robust z-score against the dataset's own distances) and, with labels,
    ``class_distance`` (cosine distance to the nearest class mean), ``nearest_class`` (index
    into the sorted labels) and ``class_score`` (robust z-score against the distances of the
    images to their own class mean). All ndarrays of shape (n_samples,)."""
    from featurebank.search import build_index

    Xn = _normalised(X)
    n = len(Xn)
    if n < 3:
        raise ValueError(f"outlier scores need at least 3 images; got {n}")
    k = int(min(k, n - 1))
    index = build_index(Xn, [str(i) for i in range(n)], factory="Flat", metric="cosine")
    sims, _ = index.search(Xn, k + 1)
    sims = np.nan_to_num(np.asarray(sims, dtype=np.float64), nan=-1.0)
    # the best hit is the image itself (or an exact copy, which is as close): drop one
    dist = 1.0 - np.sort(sims, axis=1)[:, ::-1][:, 1:]
    knn = dist.mean(axis=1)
    out = {"knn_distance": knn, "knn_score": _robust_z(knn)}
    if y is not None:
        y = np.asarray(y, dtype=object).astype(str)
        classes = np.unique(y)
        codes = _codes(y, classes)
        means = _normalised(np.stack([Xn[codes == c].mean(axis=0) for c in range(len(classes))]))
        d = 1.0 - Xn @ means.T
        own = d[np.arange(n), codes]
        nearest = d.min(axis=1)
        out.update(class_distance=nearest, nearest_class=d.argmin(axis=1), class_score=_robust_z(nearest, own))
    return out


def find_conflicts(X: np.ndarray, keys: Sequence[str], y: Sequence[Any], *, threshold: float = 0.98
                   ) -> list[list[int]]:
    """Groups of identical (same content key) or near-identical (cosine >= ``threshold``)
    images that carry more than one label: lists of row indices, each sorted."""
    groups = _duplicate_groups(X, keys, threshold)
    y = [str(v) for v in y]
    return [g for g in groups if len({y[i] for i in g}) > 1]


def _duplicate_groups(X: np.ndarray, keys: Sequence[str], threshold: float) -> list[list[int]]:
    """Row groups linked by an equal content key or by cosine >= threshold (union-find over both)."""
    from featurebank.search import find_duplicates

    n = len(keys)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            union(first[key], i)
        else:
            first[key] = i
    if n >= 2:
        for group in find_duplicates(X, [str(i) for i in range(n)], threshold=threshold, metric="cosine"):
            rows = [int(g) for g in group]
            for r in rows[1:]:
                union(rows[0], r)
    out: dict[int, list[int]] = {}
    for i in range(n):
        out.setdefault(find(i), []).append(i)
    return sorted((g for g in out.values() if len(g) > 1), key=lambda g: g[0])


def find_leaks(X_train: np.ndarray, keys_train: Sequence[str], X_test: np.ndarray, keys_test: Sequence[str], *,
               threshold: float = 0.98) -> list[tuple[int, int, float]]:
    """Test images that are also in the training set: ``(test row, train row, cosine)`` for
    each test image whose content key is a training image's (cosine 1.0) or whose nearest
    training image has cosine >= ``threshold``; by test row."""
    from featurebank.search import build_index

    by_key = {}
    for i, key in enumerate(keys_train):
        by_key.setdefault(key, i)
    out = []
    if len(X_test) == 0 or len(X_train) == 0:
        return out
    index = build_index(_normalised(X_train), [str(i) for i in range(len(X_train))], factory="Flat", metric="cosine")
    sims, ids = index.search(_normalised(X_test), 1)
    for t, key in enumerate(keys_test):
        if key in by_key:
            out.append((t, by_key[key], 1.0))
        elif ids[t][0] is not None and sims[t][0] >= threshold:
            out.append((t, int(ids[t][0]), float(sims[t][0])))
    return out


def audit_vectors(
    X: np.ndarray, y: Sequence[Any], paths: Sequence[str], keys: Sequence[str], *,
    X_test: np.ndarray | None = None, test_paths: Sequence[str] = (), test_keys: Sequence[str] = (),
    test_labels: Sequence[Any] | None = None,
    classifier: str = "probe", params: Mapping[str, Any] | None = None, cv: int = 5, random_state: int = 0,
    k: int = 10, outlier_z: float = 3.5, duplicate_threshold: float = 0.98,
) -> dict[str, Any]:
    """The audit of labelled vectors: ``{"summary": {...}, "suspects": [row, ...]}``.

    Each suspect row: ``rank``, ``issue`` (one of :data:`ISSUE_KINDS`), ``path``, ``key``,
    ``given`` (its label), ``suggested`` (the out-of-fold prediction), ``self_confidence`` (the
    out-of-fold probability of the given label), ``margin`` (suggested minus given
    probability), ``score`` (the robust z-score for outliers, the cosine for duplicates) and
    ``related`` (the paths of the duplicates involved). Rows are in rank order: leakage, conflicts,
    label issues (lowest self-confidence first), outliers (highest score first), images far
    from every class.
    """
    y = np.asarray(y, dtype=object).astype(str)
    paths, keys = list(paths), list(keys)
    proba, classes = out_of_fold_proba(X, y, classifier=classifier, params=params, cv=cv, random_state=random_state)
    labels = _codes(y, classes)
    n = len(y)
    pred = np.argmax(proba, axis=1)
    self_conf = proba[np.arange(n), labels]

    def row(i: int, issue: str, score: float | None = None, related: Sequence[str] = ()) -> dict[str, Any]:
        return {"issue": issue, "path": paths[i], "key": keys[i], "given": str(y[i]), "suggested": classes[pred[i]],
                "self_confidence": round(float(self_conf[i]), 6),
                "margin": round(float(proba[i, pred[i]] - self_conf[i]), 6),
                "score": None if score is None else round(float(score), 6), "related": list(related)}

    suspects: list[dict[str, Any]] = []
    leaks: list[tuple[int, int, float]] = []
    if X_test is not None and len(X_test):
        leaks = find_leaks(X, keys, X_test, list(test_keys), threshold=duplicate_threshold)
        test_y = None if test_labels is None else [None if v is None else str(v) for v in test_labels]
        for t, i, cos in leaks:
            r = row(i, "leakage", cos, [test_paths[t]])
            r["test_label"] = None if test_y is None else test_y[t]
            suspects.append(r)
    conflicts = find_conflicts(X, keys, y, threshold=duplicate_threshold)
    for group in conflicts:
        for i in group:
            suspects.append(row(i, "conflict", None, [paths[j] for j in group if j != i]))
    issues = find_label_issues(labels, proba)
    suspects += [row(int(i), "label") for i in issues]
    scores = outlier_scores(X, y, k=k)
    far = np.flatnonzero(scores["knn_score"] > outlier_z)
    suspects += [row(int(i), "outlier", scores["knn_score"][i])
                 for i in far[np.argsort(-scores["knn_score"][far], kind="stable")]]
    away = np.flatnonzero(scores["class_score"] > outlier_z)
    suspects += [row(int(i), "far_from_classes", scores["class_score"][i])
                 for i in away[np.argsort(-scores["class_score"][away], kind="stable")]]
    for rank, r in enumerate(suspects, 1):
        r["rank"] = rank
    summary = {
        "n_images": int(n), "n_test_images": int(len(test_paths)), "classes": classes,
        "classifier": classifier, "cv": int(cv), "random_state": int(random_state),
        "out_of_fold_accuracy": round(float(np.mean(pred == labels)), 6),
        "counts": {kind: sum(1 for r in suspects if r["issue"] == kind) for kind in ISSUE_KINDS},
        "settings": {"k": int(k), "outlier_z": float(outlier_z), "duplicate_threshold": float(duplicate_threshold)},
    }
    return {"summary": summary, "suspects": [{"rank": r.pop("rank"), **r} for r in suspects]}
