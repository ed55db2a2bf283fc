"""Nearest class mean in cosine space: the few-labels classifier.

With a handful of images per class a linear probe overfits and kNN has too few votes;
averaging each class's normalised vectors into one prototype (as in prototypical networks
and CLIP's zero-shot heads) is the robust baseline.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurebank.classifiers._validation import check_classes, check_finite_rows

__all__ = ["PrototypeClassifier"]


def _normalize(X: np.ndarray) -> np.ndarray:
    # An all-zero vector has no direction; it stays zero (cosine 0 to every prototype),
    # the convention of sklearn.preprocessing.normalize and FAISS.
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms == 0, 1.0, norms)


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Assign each vector to the class whose mean direction is most cosine-similar.

    Parameters
    ----------
    temperature : float, default=0.1
        ``predict_proba`` is ``softmax(cosine / temperature)`` over the prototypes: smaller
        is sharper. It does not change ``predict``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    prototypes_ : ndarray of shape (n_classes, n_features), float32
        Unit-norm mean of each class's unit-norm vectors.
    n_features_in_ : int
    n_samples_fit_ : int

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 0], [2, 0.2], [0, 1], [0.1, 3]], dtype=np.float32)
    >>> PrototypeClassifier().fit(X, ["a", "a", "b", "b"]).predict([[5, 1]])
    array(['a'], dtype='<U1')
    """

    def __init__(self, temperature=0.1):
        self.temperature = temperature

    def fit(self, X, y):
        """Average each class's L2-normalised vectors into a prototype.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Converted to float32. All-zero rows add nothing to their class's prototype.
        y : array-like of shape (n_samples,)

        Returns
        -------
        self
        """
        X, y = validate_data(self, X, y, dtype=np.float32, ensure_all_finite=False)
        if not isinstance(self.temperature, numbers.Real) or not self.temperature > 0:
            raise ValueError(f"temperature must be a positive float; got temperature={self.temperature!r}")
        check_classification_targets(y)
        check_finite_rows(X)
        classes, y_enc, counts = np.unique(y, return_inverse=True, return_counts=True)
        check_classes(type(self).__name__, classes, counts)
        Xn = _normalize(X.astype(np.float64))
        sums = np.zeros((len(classes), X.shape[1]), dtype=np.float64)
        np.add.at(sums, y_enc, Xn)
        norms = np.linalg.norm(sums, axis=1)
        if np.any(norms == 0):
            bad = classes[norms == 0].tolist()
            raise ValueError(
                f"the vectors of classes {bad!r} cancel out (their mean direction is zero), so they have "
                "no prototype; use LinearProbe or KNNClassifier"
            )
        self.classes_ = classes
        self.prototypes_ = (sums / norms[:, None]).astype(np.float32)
        self.n_samples_fit_ = int(X.shape[0])
        return self

    def _cosine(self, X) -> np.ndarray:
        X = validate_data(self, X, reset=False, dtype=np.float32, ensure_all_finite=False)
        check_finite_rows(X)
        return _normalize(X.astype(np.float64)) @ self.prototypes_.T.astype(np.float64)

    def cosine_similarity(self, X):
        """Cosine similarity to each prototype: ndarray of shape (n_samples, n_classes), float64."""
        check_is_fitted(self)
        return self._cosine(X)

    def predict_proba(self, X):
        """``softmax(cosine / temperature)``: ndarray of shape (n_samples, n_classes), float64."""
        check_is_fitted(self)
        logits = self._cosine(X) / float(self.temperature)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X):
        """Class of the most similar prototype: ndarray of shape (n_samples,)."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self._cosine(X), axis=1)]

    def to_sklearn(self):
        """The fitted classifier as a plain ``Pipeline(Normalizer, LogisticRegression)`` with
        the same probabilities (used for ONNX conversion with skl2onnx): the logits
        ``cosine / temperature`` are a linear model of the normalised vector."""
        check_is_fitted(self)
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import Normalizer

        W = self.prototypes_.astype(np.float64) / float(self.temperature)
        lr = LogisticRegression()
        if len(self.classes_) == 2:
            # binary LogisticRegression is sigmoid(w.x): softmax over two logits is
            # sigmoid of their difference
            lr.coef_ = (W[1] - W[0])[None, :]
            lr.intercept_ = np.zeros(1)
        else:
            lr.coef_ = W
            lr.intercept_ = np.zeros(len(self.classes_))
        lr.classes_ = self.classes_.copy()
        lr.n_features_in_ = self.n_features_in_
        lr.n_iter_ = np.zeros(1, dtype=np.int32)
        normalizer = Normalizer(norm="l2").fit(np.zeros((1, self.n_features_in_)))
        return Pipeline([("normalizer", normalizer), ("logistic", lr)])
