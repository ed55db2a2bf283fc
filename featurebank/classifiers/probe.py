"""The linear probe: standardised features + multinomial logistic regression, C by validation.

This is the protocol of Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?")
and CLIP (Radford et al. 2021): freeze the backbone, fit an L2-regularised logistic
regression on its features, pick the regularisation strength on held-out data, then refit
on everything.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurebank.classifiers._validation import check_classes, check_finite_rows

__all__ = ["LinearProbe"]


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardise, then multinomial logistic regression with C chosen on held-out data.

    C (the inverse of the L2 regularisation strength) is chosen among ``Cs`` by the mean
    validation accuracy over ``cv`` stratified splits; the probe is then refitted on all
    the data with that C. The C path is walked from strong to weak regularisation, each
    fit warm-started from the previous one, in float32: weak regularisation is where
    lbfgs needs most iterations, and with ``patience`` it is skipped once it stops paying.

    Parameters
    ----------
    Cs : int or array-like of float, default=9
        Candidate values of C. An int ``n`` means ``np.logspace(-4, 4, n)``.
    cv : int or float, default=5
        int >= 2: stratified k-fold (shuffled with ``random_state``); every class needs
        at least ``cv`` samples. float in (0, 1): one stratified validation split holding
        that fraction of the data (fastest on large sets); every class needs 2 samples.
    patience : int or None, default=2
        Stop walking the C path once the mean validation accuracy has not beaten its best
        for ``patience`` consecutive Cs; the skipped Cs get NaN in ``cv_scores_``.
        None scores the whole grid.
    max_iter : int, default=200
        lbfgs iterations per fit.
    tol : float, default=1e-4
        lbfgs gradient tolerance.
    class_weight : dict, "balanced" or None, default=None
        As in :class:`~sklearn.linear_model.LogisticRegression` (dict keys are class labels).
    random_state : int, default=0
        Seeds the validation splits.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    C_ : float
        The chosen C.
    Cs_ : ndarray of shape (n_Cs,), float64
        The candidate Cs, ascending.
    cv_scores_ : ndarray of shape (n_splits, n_Cs), float64
        Validation accuracy of each split at each C (NaN where ``patience`` skipped it).
    scaler_ : StandardScaler
        Fitted on all data.
    logistic_ : LogisticRegression
        Fitted on the standardised data with ``C_``; its classes are ``0 .. n_classes-1``.
    n_features_in_ : int
    n_samples_fit_ : int
    n_iter_ : int
        lbfgs iterations of the final refit.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> probe = LinearProbe(cv=3).fit(X, y)
    >>> probe.predict_proba(X[:2]).shape
    (2, 3)
    """

    def __init__(self, Cs=9, cv=5, patience=2, max_iter=200, tol=1e-4, class_weight=None, random_state=0):
        self.Cs = Cs
        self.cv = cv
        self.patience = patience
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state

    # -- parameter checks (in fit, not __init__, per sklearn's contract) -------------------
    def _candidate_Cs(self) -> np.ndarray:
        if isinstance(self.Cs, numbers.Integral) and not isinstance(self.Cs, bool):
            if self.Cs < 1:
                raise ValueError(f"Cs must be a positive int or a list of positive floats; got Cs={self.Cs}")
            return np.logspace(-4, 4, int(self.Cs))
        Cs = np.sort(np.asarray(self.Cs, dtype=np.float64).ravel())
        if Cs.size == 0 or not np.all(np.isfinite(Cs)) or np.any(Cs <= 0):
            raise ValueError(f"Cs must be a positive int or a list of positive floats; got Cs={self.Cs!r}")
        return Cs

    def _splitter(self, counts: np.ndarray, n_classes: int, n_samples: int):
        cv = self.cv
        if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
            if cv < 2:
                raise ValueError(f"cv must be an int >= 2 (k folds) or a float in (0, 1) (validation fraction); got cv={cv}")
            check_classes(type(self).__name__, self.classes_, counts, min_members=int(cv),
                          why=f" for {cv}-fold cross-validation (cv={cv})")
            return StratifiedKFold(n_splits=int(cv), shuffle=True, random_state=self.random_state)
        if isinstance(cv, numbers.Real) and 0.0 < float(cv) < 1.0:
            check_classes(type(self).__name__, self.classes_, counts, min_members=2,
                          why=f" for a validation split (cv={cv}: one in training, one in validation)")
            # a stratified split needs at least one sample of each class on each side
            n_val = min(max(int(np.ceil(float(cv) * n_samples)), n_classes), n_samples - n_classes)
            return StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=self.random_state)
        raise ValueError(f"cv must be an int >= 2 (k folds) or a float in (0, 1) (validation fraction); got cv={cv!r}")

    def _encoded_class_weight(self):
        cw = self.class_weight
        if cw is None or (isinstance(cw, str) and cw == "balanced"):
            return cw
        if isinstance(cw, dict):
            index = {c: i for i, c in enumerate(self.classes_.tolist())}
            unknown = [k for k in cw if k not in index]
            if unknown:
                raise ValueError(
                    f"class_weight has labels that are not in y: {unknown!r}; classes are {self.classes_.tolist()!r}"
                )
            return {index[k]: float(w) for k, w in cw.items()}
        raise ValueError(f"class_weight must be None, 'balanced' or a dict label -> weight; got {cw!r}")

    def _logistic(self, C: float, class_weight) -> LogisticRegression:
        return LogisticRegression(
            C=float(C), solver="lbfgs", max_iter=int(self.max_iter), tol=float(self.tol),
            class_weight=class_weight, warm_start=True,
        )

    # -- fit ----------------------------------------------------------------------------
    def fit(self, X, y):
        """Choose C on validation splits, then refit on all of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Embeddings; converted to float32.
        y : array-like of shape (n_samples,)
            Class labels.

        Returns
        -------
        self
        """
        X, y = validate_data(self, X, y, dtype=np.float32, ensure_all_finite=False, order="C")
        check_finite_rows(X)
        check_classification_targets(y)
        if self.patience is not None and (not isinstance(self.patience, numbers.Integral) or self.patience < 1):
            raise ValueError(f"patience must be a positive int or None; got patience={self.patience!r}")
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int; got max_iter={self.max_iter!r}")
        if not isinstance(self.tol, numbers.Real) or not self.tol > 0:
            raise ValueError(f"tol must be a positive float; got tol={self.tol!r}")
        self.classes_, y_enc, counts = np.unique(y, return_inverse=True, return_counts=True)
        check_classes(type(self).__name__, self.classes_, counts)
        Cs = self._candidate_Cs()
        class_weight = self._encoded_class_weight()
        splitter = self._splitter(counts, len(self.classes_), X.shape[0])

        folds = []
        for train, val in splitter.split(X, y_enc):
            scaler = StandardScaler().fit(X[train])
            folds.append((scaler.transform(X[train]), y_enc[train], scaler.transform(X[val]), y_enc[val],
                          self._logistic(Cs[0], class_weight)))

        scores = np.full((len(folds), len(Cs)), np.nan)
        best, since_best = -np.inf, 0
        with warnings.catch_warnings():
            # Exploratory fits at weak regularisation often stop at max_iter; only the final
            # refit's convergence is reported.
            warnings.simplefilter("ignore", ConvergenceWarning)
            for j, C in enumerate(Cs):
                for i, (X_tr, y_tr, X_va, y_va, lr) in enumerate(folds):
                    lr.C = float(C)
                    lr.fit(X_tr, y_tr)  # warm-started from the previous C
                    scores[i, j] = float(np.mean(lr.predict(X_va) == y_va))
                mean = scores[:, j].mean()
                if mean > best:
                    best, since_best = mean, 0
                    # the folds' mean solution at the best C warm-starts the final refit
                    start = (np.mean([f[4].coef_ for f in folds], axis=0),
                             np.mean([f[4].intercept_ for f in folds], axis=0))
                else:
                    since_best += 1
                    if self.patience is not None and since_best >= self.patience:
                        break
        # folds move in lockstep, so a C is either scored on every split or skipped (NaN)
        mean_scores = scores.mean(axis=0)
        j_best = int(np.nanargmax(mean_scores))  # first maximum: the strongest regularisation
        self.Cs_ = Cs
        self.cv_scores_ = scores
        self.C_ = float(Cs[j_best])

        # Refit on everything, warm-started from the folds' mean solution at the chosen C
        # (LogisticRegression's warm_start reads coef_ and intercept_).
        del folds
        self.scaler_ = StandardScaler().fit(X)
        lr = self._logistic(self.C_, class_weight)
        lr.coef_, lr.intercept_ = start
        lr.fit(self.scaler_.transform(X), y_enc)
        self.logistic_ = lr
        self.n_iter_ = int(np.max(lr.n_iter_))
        self.n_samples_fit_ = int(X.shape[0])
        return self

    # -- predict ------------------------------------------------------------------------
    def _transform(self, X) -> np.ndarray:
        X = validate_data(self, X, reset=False, dtype=np.float32, ensure_all_finite=False, order="C")
        check_finite_rows(X)
        return self.scaler_.transform(X)

    def decision_function(self, X):
        """Logits: ndarray of shape (n_samples, n_classes), or (n_samples,) for two classes."""
        check_is_fitted(self)
        return self.logistic_.decision_function(self._transform(X))

    def predict_proba(self, X):
        """Class probabilities: ndarray of shape (n_samples, n_classes), float."""
        check_is_fitted(self)
        return self.logistic_.predict_proba(self._transform(X))

    def predict_log_proba(self, X):
        """Log of :meth:`predict_proba`."""
        check_is_fitted(self)
        return self.logistic_.predict_log_proba(self._transform(X))

    def predict(self, X):
        """Labels: ndarray of shape (n_samples,), from ``classes_``."""
        check_is_fitted(self)
        return self.classes_[self.logistic_.predict(self._transform(X))]

    def to_sklearn(self):
        """The fitted probe as a plain ``Pipeline(StandardScaler, LogisticRegression)`` whose
        classes are ``classes_`` (used for ONNX conversion with skl2onnx)."""
        check_is_fitted(self)
        import copy

        from sklearn.pipeline import Pipeline

        lr = copy.deepcopy(self.logistic_)
        lr.classes_ = self.classes_.copy()
        return Pipeline([("scaler", copy.deepcopy(self.scaler_)), ("logistic", lr)])
