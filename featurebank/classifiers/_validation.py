"""Boundary checks shared by the estimators: finite vectors, enough classes and members.

Each check raises a ``ValueError`` that says what is wrong with which rows or classes and
how to fix it. sklearn's own ``validate_data`` runs first; these add what it cannot know.
"""

from __future__ import annotations

import numpy as np

from featurebank._validation import check_finite_rows as _check_finite_rows


def check_finite_rows(X: np.ndarray, what: str = "X") -> None:
    """Refuse NaN or inf vectors, naming the rows that hold them (see featurebank._validation)."""
    _check_finite_rows(X, what, fix="these embeddings are broken: re-embed those images or drop those rows before fitting")


def check_classes(name: str, classes: np.ndarray, counts: np.ndarray, min_members: int = 1, why: str = "") -> None:
    """At least two classes, each with ``min_members`` samples."""
    if len(classes) < 2:
        only = repr(classes[0].item() if hasattr(classes[0], "item") else classes[0]) if len(classes) else "none"
        raise ValueError(
            f"{name} needs samples of at least 2 classes to learn a decision; y has only one class: {only}. "
            "Add images of the other classes"
        )
    small = counts < min_members
    if small.any():
        listed = ", ".join(f"{c!r} ({n})" for c, n in zip(classes[small].tolist(), counts[small].tolist()))
        raise ValueError(
            f"{name} needs at least {min_members} samples per class{why}; these classes have fewer: "
            f"{listed}. Add images to them, drop them, or lower cv"
        )
