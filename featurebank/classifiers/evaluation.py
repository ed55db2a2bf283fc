"""Held-out evaluation of a classifier on embeddings: metrics, a JSON report and a
confusion-matrix figure."""

from __future__ import annotations

import io
import json
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

from featurebank._atomic import write_bytes_atomic

__all__ = ["evaluate_classifier", "plot_confusion_matrix", "save_evaluation"]


def evaluate_classifier(
    clf: Any,
    X: Any,
    y: Any,
    *,
    cv: int | None = None,
    test_size: float = 0.25,
    random_state: int = 0,
    out_dir: "str | os.PathLike[str] | None" = None,
) -> dict[str, Any]:
    """Measure how well ``clf`` generalises on ``(X, y)``; ``clf`` itself is not fitted.

    A clone of ``clf`` is fitted on a stratified training split and scored on the held-out
    rest (``cv=None``), or on every fold of a stratified k-fold (``cv=k``, the metrics are
    then computed on the pooled out-of-fold predictions).

    Parameters
    ----------
    clf : unfitted scikit-learn compatible classifier
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    cv : None or int >= 2
    test_size : float in (0, 1), the held-out fraction when ``cv`` is None
    random_state : seeds the split / fold shuffling
    out_dir : when given, ``report.json`` and ``confusion_matrix.png`` are written there

    Returns
    -------
    dict with ``accuracy``, ``balanced_accuracy``, ``classes`` (list), ``per_class``
    ({class: {precision, recall, f1, support}}), ``confusion_matrix`` (counts, rows = true
    class, columns = predicted, in ``classes`` order), ``n_samples``, ``n_evaluated`` and
    ``protocol``.
    """
    from sklearn.base import clone, is_classifier
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
    from sklearn.utils.validation import check_X_y

    if not is_classifier(clf):
        raise ValueError(f"evaluate_classifier needs a scikit-learn classifier; got {type(clf).__name__}")
    X, y = check_X_y(X, y, dtype=None, ensure_all_finite=False)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"y has only one class ({classes.tolist()!r}); evaluation needs at least 2")
    if cv is None:
        if not isinstance(test_size, numbers.Real) or not 0.0 < float(test_size) < 1.0:
            raise ValueError(f"test_size must be a float in (0, 1); got test_size={test_size!r}")
        if counts.min() < 2:
            small = classes[counts < 2].tolist()
            raise ValueError(
                f"classes {small!r} have a single sample, so they cannot appear in both the training and "
                "the test split; add samples or drop those classes"
            )
        n_test = max(int(np.ceil(float(test_size) * len(y))), len(classes))
        X_tr, X_te, y_tr, y_te = train_test_split(
            X, y, test_size=n_test, stratify=y, random_state=random_state
        )
        y_true, y_pred = y_te, clone(clf).fit(X_tr, y_tr).predict(X_te)
        protocol = {"kind": "holdout", "test_size": float(test_size), "n_train": int(len(y_tr)),
                    "random_state": random_state}
    else:
        if not isinstance(cv, numbers.Integral) or isinstance(cv, bool) or cv < 2:
            raise ValueError(f"cv must be None (one held-out split) or an int >= 2; got cv={cv!r}")
        if counts.min() < cv:
            small = classes[counts < cv].tolist()
            raise ValueError(f"classes {small!r} have fewer than cv={cv} samples; lower cv or add samples")
        splitter = StratifiedKFold(n_splits=int(cv), shuffle=True, random_state=random_state)
        y_true, y_pred = y, cross_val_predict(clone(clf), X, y, cv=splitter)
        protocol = {"kind": "stratified_kfold", "cv": int(cv), "random_state": random_state}

    labels = classes
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    names = [c.item() if hasattr(c, "item") else c for c in labels]
    report = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "classes": names,
        "per_class": {
            str(name): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        "confusion_matrix": cm.tolist(),
        "n_samples": int(len(y)),
        "n_evaluated": int(len(y_true)),
        "protocol": protocol,
        "estimator": repr(clf),
    }
    if out_dir is not None:
        save_evaluation(report, out_dir)
    return report


def save_evaluation(report: dict[str, Any], out_dir: "str | os.PathLike[str]") -> Path:
    """Write an :func:`evaluate_classifier` report (with anything a caller added to it) to
    ``out_dir/report.json`` and its ``confusion_matrix.png``, each atomically; returns
    ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "report.json", json.dumps(report, indent=2, default=str).encode("utf-8"))
    plot_confusion_matrix(report["confusion_matrix"], [str(n) for n in report["classes"]], out / "confusion_matrix.png")
    return out


def plot_confusion_matrix(cm: Any, class_names: list[str], path: "str | os.PathLike[str]") -> Path:
    """Write a row-normalised confusion matrix (recall per true class) as a PNG.

    Each cell shows the fraction of the true class (row) predicted as the column's class;
    with up to 30 classes the numbers are printed in the cells.
    """
    # A bare Figure renders with Agg and never touches pyplot's global state or the
    # user's GUI backend.
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = float(np.clip(1.0 + 0.45 * n, 4.0, 24.0))
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix (row-normalised, n={int(cm.sum())})")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8 if n > 12 else 10,
                        color="white" if norm[i, j] > 0.5 else "black")
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return path
