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
    validation accuracy over ``cv`` stratified splits, ties broken by the lower validation
    log-loss; the probe is then refitted on all
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
        Stop walking the C path once the mean validation score (accuracy, then log-loss)
        has not beaten its best for ``patience`` consecutive Cs; the skipped Cs get NaN in ``cv_scores_``.
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
    cv_log_loss_ : ndarray of shape (n_splits, n_Cs), float64
        Validation log-loss, the tie-break.
    scaler_ : StandardScaler
        Fitted on all data.
    coef_ : ndarray of shape (n_classes, n_features), float32
        Weights on the standardised features (one row per class, also for two classes).
    intercept_ : ndarray of shape (n_classes,), float64
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
        """class_weight with keys turned into class indices (or "balanced" / None)."""
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

        sample_weight = _class_sample_weight(class_weight, y_enc, len(self.classes_))
        folds = []
        for train, val in splitter.split(X, y_enc):
            scaler = StandardScaler().fit(X[train])
            folds.append((scaler.transform(X[train]), y_enc[train], sample_weight[train],
                          scaler.transform(X[val]), y_enc[val]))

        n_classes = len(self.classes_)
        params = [None] * len(folds)  # each split's solution, warm-starting the next C
        scores = np.full((len(folds), len(Cs)), np.nan)
        losses = np.full((len(folds), len(Cs)), np.nan)
        best, since_best, start = (-np.inf, np.inf), 0, None
        for j, C in enumerate(Cs):
            for i, (X_tr, y_tr, sw_tr, X_va, y_va) in enumerate(folds):
                params[i], _ = _fit_softmax(X_tr, y_tr, sw_tr, n_classes, C, params[i], self.max_iter, self.tol)
                logits = _logits(X_va, *params[i])
                scores[i, j] = float(np.mean(np.argmax(logits, axis=1) == y_va))
                losses[i, j] = _log_loss(logits, y_va)
            mean, loss = scores[:, j].mean(), losses[:, j].mean()
            # accuracy decides; among equally accurate Cs the lower validation log-loss wins
            # (on easy data every C is 100% accurate, and the strongest regularisation would
            # give needlessly flat probabilities)
            if mean > best[0] + 1e-12 or (mean >= best[0] - 1e-12 and loss < best[1]):
                # the splits' mean solution at the best C warm-starts the final refit
                best, since_best = (mean, loss), 0
                start = (np.mean([w for w, _ in params], axis=0), np.mean([b for _, b in params], axis=0))
            else:
                since_best += 1
                if self.patience is not None and since_best >= self.patience:
                    break
        del folds
        # splits move in lockstep, so a C is either scored on every split or skipped (NaN)
        mean_acc, mean_loss = scores.mean(axis=0), losses.mean(axis=0)
        tied = np.flatnonzero(mean_acc >= np.nanmax(mean_acc) - 1e-12)
        j_best = int(tied[np.argmin(mean_loss[tied])])
        self.Cs_ = Cs
        self.cv_scores_ = scores
        self.cv_log_loss_ = losses
        self.C_ = float(Cs[j_best])

        self.scaler_ = StandardScaler().fit(X)
        (W, b), n_iter = _fit_softmax(self.scaler_.transform(X), y_enc, sample_weight, n_classes, self.C_,
                                      start, self.max_iter, self.tol)
        if n_iter >= self.max_iter:
            warnings.warn(
                f"LinearProbe's final fit (C={self.C_:g}) stopped at max_iter={self.max_iter} before lbfgs "
                "converged; raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.coef_, self.intercept_ = W, b
        self.n_iter_ = int(n_iter)
        self.n_samples_fit_ = int(X.shape[0])
        return self

    # -- predict ------------------------------------------------------------------------
    def _logits(self, X) -> np.ndarray:
        X = validate_data(self, X, reset=False, dtype=np.float32, ensure_all_finite=False, order="C")
        check_finite_rows(X)
        # float64 here (unlike training): float32 BLAS results depend on the batch layout, and
        # a sample's prediction must not depend on its batch
        return _logits(self.scaler_.transform(X).astype(np.float64), self.coef_, self.intercept_)

    def decision_function(self, X):
        """Logits of the standardised vectors: ndarray of shape (n_samples, n_classes),
        float64; for two classes, shape (n_samples,): the second logit minus the first."""
        check_is_fitted(self)
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_log_proba(self, X):
        """Log of :meth:`predict_proba`."""
        check_is_fitted(self)
        z = self._logits(X)
        return z - _logsumexp(z)

    def predict_proba(self, X):
        """Class probabilities (softmax of the logits): ndarray of shape (n_samples, n_classes), float64."""
        check_is_fitted(self)
        return np.exp(self.predict_log_proba(X))

    def predict(self, X):
        """Labels: ndarray of shape (n_samples,), from ``classes_``."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self._logits(X), axis=1)]

    def to_sklearn(self):
        """The fitted probe as a plain ``Pipeline(StandardScaler, LogisticRegression)`` whose
        classes are ``classes_`` (used for ONNX conversion with skl2onnx)."""
        check_is_fitted(self)
        import copy

        from sklearn.pipeline import Pipeline

        lr = LogisticRegression(C=self.C_)
        W, b = self.coef_.astype(np.float64), self.intercept_.astype(np.float64)
        if len(self.classes_) == 2:
            # binary LogisticRegression is sigmoid(w.x + c): softmax over two logits is the
            # sigmoid of their difference
            W, b = W[1:] - W[:1], b[1:] - b[:1]
        lr.coef_, lr.intercept_ = W, b
        lr.classes_ = self.classes_.copy()
        lr.n_features_in_ = self.n_features_in_
        lr.n_iter_ = np.array([self.n_iter_], dtype=np.int32)
        return Pipeline([("scaler", copy.deepcopy(self.scaler_)), ("logistic", lr)])


# -- the solver -------------------------------------------------------------------------
# LogisticRegression(solver="lbfgs") hands scipy float64 coefficients, so every loss
# evaluation on float32 X upcasts X (n_samples x n_features) to float64 first. For
# embeddings that copy dominates the time; here both matrix products stay in float32 and
# only the small (n_samples, n_classes) logits are taken to float64. The objective is the
# one LogisticRegression minimises with a multinomial loss:
#     sum_i s_i * CE(softmax(W x_i + b), y_i) / sum(s)  +  ||W||^2 / (2 C sum(s))


def _class_sample_weight(class_weight, y_enc: np.ndarray, n_classes: int) -> np.ndarray:
    if class_weight is None:
        return np.ones(len(y_enc), dtype=np.float64)
    if isinstance(class_weight, str):  # "balanced", as sklearn defines it
        counts = np.bincount(y_enc, minlength=n_classes)
        per_class = len(y_enc) / (n_classes * counts)
    else:
        per_class = np.ones(n_classes)
        for k, w in class_weight.items():
            per_class[k] = w
    return per_class[y_enc].astype(np.float64)


def _log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of softmax(logits) against integer labels y."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def _logits(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (X @ W.T.astype(X.dtype, copy=False)).astype(np.float64) + b


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _fit_softmax(X, y, sample_weight, n_classes, C, start, max_iter, tol):
    """L2-regularised multinomial logistic regression by L-BFGS, float32 products.

    X : (n_samples, n_features) float32, standardised; y : (n_samples,) int class indices;
    start : (W, b) warm start or None. Returns ((W float32 (n_classes, n_features),
    b float64 (n_classes,)), n_iter).
    """
    from scipy.optimize import minimize

    n_features = X.shape[1]
    s = sample_weight / sample_weight.sum()
    alpha = 1.0 / (C * sample_weight.sum())
    Y = np.zeros((len(y), n_classes), dtype=np.float64)
    Y[np.arange(len(y)), y] = 1.0
    rows = np.arange(len(y))

    def loss_grad(theta):
        W = theta[: n_classes * n_features].reshape(n_classes, n_features)
        b = theta[n_classes * n_features:]
        W32 = W.astype(np.float32)
        z = _logits(X, W32, b)
        lse = _logsumexp(z)
        loss = float(np.dot(s, lse[:, 0] - z[rows, y])) + 0.5 * alpha * float(np.dot(theta[:W.size], theta[:W.size]))
        G = (np.exp(z - lse) - Y) * s[:, None]  # d loss / d logits
        # X.T @ G, not G.T @ X: OpenBLAS is several times slower on the (short, long) @ (long,
        # wide) product than on its transpose
        grad_W = (X.T @ G.astype(np.float32)).T.astype(np.float64) + alpha * W
        return loss, np.concatenate([grad_W.ravel(), G.sum(axis=0)])

    if start is None:
        theta0 = np.zeros(n_classes * (n_features + 1))
    else:
        theta0 = np.concatenate([np.asarray(start[0], dtype=np.float64).ravel(), np.asarray(start[1], dtype=np.float64)])
    # sklearn's own lbfgs settings for LogisticRegression
    res = minimize(loss_grad, theta0, method="L-BFGS-B", jac=True,
                   options={"maxiter": int(max_iter), "maxls": 50, "gtol": float(tol), "ftol": 64 * np.finfo(float).eps})
    W = res.x[: n_classes * n_features].reshape(n_classes, n_features).astype(np.float32)
    b = res.x[n_classes * n_features:].copy()
    return (W, b), int(res.nit)
