"""Which unlabelled images to label next: active learning on cached vectors.

Strategies (``STRATEGIES``):

* ``uncertainty``: the smallest margin between the two most probable classes of a classifier
  trained on the labelled images (Scheffer et al. 2001);
* ``diversity``: k-center greedy in cosine distance (the coreset of Sener & Savarese, ICLR 2018):
  each pick is the image farthest from everything labelled or picked so far; with nothing
  labelled (a cold start) the first pick is the image nearest the pool's mean;
* ``combined``: the ``oversample`` x budget most uncertain images, then k-center greedy among them;
* ``random``: seeded, the baseline.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["STRATEGIES", "select_vectors", "k_center_greedy", "margins"]

STRATEGIES = ("uncertainty", "diversity", "combined", "random")


def _normalised(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def k_center_greedy(X: np.ndarray, budget: int, centers: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``budget`` rows of ``X`` chosen by k-center greedy in cosine distance.

    centers : rows already covered (the labelled vectors), or None: then the first pick is the
    row nearest the mean of ``X``.
    """
    Xn = _normalised(X)
    picked: list[int] = []
    if centers is not None and len(centers):
        C = _normalised(centers)
        mind = np.full(len(Xn), np.inf, dtype=np.float32)
        for s in range(0, len(C), 1024):
            mind = np.minimum(mind, (1.0 - Xn @ C[s : s + 1024].T).min(axis=1))
    else:
        first = int(np.argmax(Xn @ _normalised(Xn.mean(axis=0, keepdims=True))[0]))
        picked.append(first)
        mind = 1.0 - Xn @ Xn[first]
    while len(picked) < budget:
        mind[picked] = -np.inf
        nxt = int(np.argmax(mind))
        picked.append(nxt)
        mind = np.minimum(mind, 1.0 - Xn @ Xn[nxt])
    return np.asarray(picked[:budget], dtype=np.int64)


def margins(X_labelled: np.ndarray, y_labelled: Sequence[Any], X_pool: np.ndarray, *, classifier: str = "probe",
            params: Mapping[str, Any] | None = None, random_state: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(margin, predicted class index, classes)`` of each pool image under a classifier
    trained on the labelled images; margin = top-1 minus top-2 probability (0: most uncertain)."""
    from featurebank.classifiers import make_classifier

    y = np.asarray(y_labelled, dtype=object).astype(str)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"the labelled images hold one class ({classes[0]!r}); uncertainty needs at least two "
                         "(label more, or use --strategy diversity)")
    params = dict(params or {})
    if classifier == "probe":
        # a fold needs one image of each class: with 2 labels per class, a 50% validation split
        params.setdefault("cv", 0.5 if counts.min() < 5 else 0.2)
        params.setdefault("random_state", random_state)
    clf = make_classifier(classifier, **params).fit(np.asarray(X_labelled, np.float32), y)
    proba = clf.predict_proba(np.asarray(X_pool, np.float32))
    top2 = np.sort(proba, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0], np.argmax(proba, axis=1), [str(c) for c in clf.classes_]


def select_vectors(X_pool: np.ndarray, budget: int, *, strategy: str = "combined",
                   X_labelled: np.ndarray | None = None, y_labelled: Sequence[Any] | None = None,
                   classifier: str = "probe", params: Mapping[str, Any] | None = None, oversample: int = 10,
                   random_state: int = 0) -> dict[str, Any]:
    """Rows of ``X_pool`` to label next: ``{"indices": ndarray (budget,), "margin": ndarray or
    None, "predicted": list of str or None}`` (margin and predicted are those of the chosen rows).

    X_pool : ndarray of shape (n_pool, n_features); every row is a distinct candidate
    X_labelled, y_labelled : what is labelled already (None: a cold start, diversity or random only)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer; got {budget!r}")
    n = len(X_pool)
    if budget > n:
        raise ValueError(
            f"budget {budget} is larger than the pool of {n} unlabelled images; lower --budget to at most {n}")
    cold = X_labelled is None or len(X_labelled) == 0
    if cold and strategy in ("uncertainty", "combined"):
        raise ValueError(f"strategy {strategy!r} needs labelled images (--labelled SOURCE); for a cold start use "
                         "--strategy diversity")
    rng = np.random.default_rng(random_state)
    margin = predicted = None
    classes: list[str] = []
    if strategy == "random":
        idx = np.sort(rng.choice(n, size=budget, replace=False))
    elif strategy == "diversity":
        idx = k_center_greedy(X_pool, budget, None if cold else X_labelled)
    else:
        margin, predicted, classes = margins(X_labelled, y_labelled, X_pool, classifier=classifier, params=params,
                                             random_state=random_state)
        order = np.argsort(margin, kind="stable")
        if strategy == "uncertainty":
            idx = order[:budget]
        else:
            cand = order[: min(n, max(budget, oversample * budget))]
            idx = cand[k_center_greedy(X_pool[cand], budget, X_labelled)]
    out: dict[str, Any] = {"indices": np.asarray(idx, dtype=np.int64), "margin": None, "predicted": None}
    if margin is not None:
        out["margin"] = margin[idx]
        out["predicted"] = [classes[j] for j in predicted[idx]]
    return out
