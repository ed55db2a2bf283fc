"""k-nearest-neighbour classification over a FAISS index.

Any FAISS factory string picks the index ("Flat" is exact; "IVF256,Flat", "HNSW32",
"IVF1024,PQ32" trade recall for speed and memory); cosine similarity is inner product over
L2-normalised vectors, as FAISS recommends.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
import subprocess
import sys

import faiss
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurebank._faiss_errors import faiss_reason
from featurebank.classifiers._validation import check_classes, check_finite_rows

__all__ = ["KNNClassifier"]

METRICS = ("cosine", "l2")
WEIGHTS = ("uniform", "distance")


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """Vote among the ``n_neighbors`` nearest training vectors, found with FAISS.

    Parameters
    ----------
    n_neighbors : int, default=5
    metric : {"cosine", "l2"}, default="cosine"
        "cosine" L2-normalises training and query vectors and searches by inner product;
        distance = 1 - cosine similarity (an all-zero vector has cosine 0 to everything). "l2" uses Euclidean distance.
    weights : {"uniform", "distance"}, default="uniform"
        "distance" weights each vote by 1 / distance; exact matches (distance 0), when a
        query has any, take all of its vote, as in scikit-learn's KNeighborsClassifier.
    index_factory : str, default="Flat"
        A FAISS factory string, verbatim ("Flat", "IVF64,Flat", "HNSW32", "IVF256,PQ16").
        Indexes that need training are trained on the fitted vectors.
    search_params : str or None, default=None
        FAISS ``ParameterSpace`` string applied before searching, e.g. "nprobe=16" for IVF
        or "efSearch=64" for HNSW.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    index_ : faiss.Index
        Holds the fitted vectors (float32, normalised when metric="cosine").
    y_ : ndarray of shape (n_samples_fit_,), int64
        Class index (into ``classes_``) of each indexed vector, in index order.
    n_features_in_ : int
    n_samples_fit_ : int

    Notes
    -----
    FAISS indexes cannot be pickled; ``__getstate__`` stores ``faiss.serialize_index``
    bytes (a uint8 array) in their place and ``__setstate__`` restores the index.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> KNNClassifier(n_neighbors=1).fit(X, [0, 0, 1, 1]).predict([[0.8, 0.3]])
    array([0])
    """

    def __init__(self, n_neighbors=5, metric="cosine", weights="uniform", index_factory="Flat", search_params=None):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.index_factory = index_factory
        self.search_params = search_params

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        X = np.array(X, dtype=np.float32, order="C", copy=True)  # normalize_L2 writes in place
        check_finite_rows(X)
        if self.metric == "cosine":
            faiss.normalize_L2(X)  # an all-zero vector stays zero: cosine 0 to everything
        return X

    def fit(self, X, y):
        """Index ``X`` and remember the labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Converted to float32.
        y : array-like of shape (n_samples,)

        Returns
        -------
        self
        """
        X, y = validate_data(self, X, y, dtype=np.float32, ensure_all_finite=False)
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got metric={self.metric!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got weights={self.weights!r}")
        if not isinstance(self.n_neighbors, numbers.Integral) or isinstance(self.n_neighbors, bool) or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive int; got n_neighbors={self.n_neighbors!r}")
        if not isinstance(self.index_factory, str) or not self.index_factory:
            raise ValueError(f"index_factory must be a FAISS factory string such as 'Flat'; got {self.index_factory!r}")
        check_classification_targets(y)
        n_samples = X.shape[0]
        if self.n_neighbors > n_samples:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} is larger than n_samples={n_samples}, the number of "
                "vectors to search; lower n_neighbors or add more samples"
            )
        classes, y_enc, counts = np.unique(y, return_inverse=True, return_counts=True)
        check_classes(type(self).__name__, classes, counts)
        X = self._prepare(X)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(X.shape[1], self.index_factory, faiss_metric)
        except RuntimeError as exc:
            raise ValueError(
                f"index_factory={self.index_factory!r} is not a FAISS factory string FAISS can build for "
                f"{X.shape[1]} features ({faiss_reason(exc)}); see the FAISS wiki 'The index factory'"
            ) from None
        try:
            if not index.is_trained:
                index.train(X)
            index.add(X)
        except RuntimeError as exc:
            raise ValueError(
                f"FAISS could not train/fill index {self.index_factory!r} with n_samples={n_samples} vectors of "
                f"{X.shape[1]} features: {faiss_reason(exc)}. Use a smaller index (fewer IVF lists, e.g. "
                f"'IVF{max(1, n_samples // 39)},Flat', or 'Flat') or more samples"
            ) from None
        self.classes_ = classes
        self.y_ = y_enc.astype(np.int64)
        self.index_ = index
        self.n_samples_fit_ = int(n_samples)
        return self

    def kneighbors(self, X):
        """Distances and positions of the ``n_neighbors`` nearest fitted vectors.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float32
            1 - cosine similarity, or Euclidean distance.
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Positions in the fitted data; -1 where the index found fewer neighbours
            (possible with IVF and a small nprobe).
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, ensure_all_finite=False)
        X = self._prepare(X)
        if self.search_params:
            try:
                faiss.ParameterSpace().set_index_parameters(self.index_, self.search_params)
            except RuntimeError as exc:
                raise ValueError(
                    f"search_params={self.search_params!r} do not apply to index {self.index_factory!r}: "
                    f"{faiss_reason(exc)}"
                ) from None
        scores, indices = self.index_.search(X, int(self.n_neighbors))
        if self.metric == "cosine":
            distances = 1.0 - scores
        else:
            distances = np.sqrt(np.maximum(scores, 0.0))
        return distances.astype(np.float32), indices

    def predict_proba(self, X):
        """Share of (weighted) neighbour votes per class: ndarray (n_samples, n_classes), float64."""
        check_is_fitted(self)
        distances, indices = self.kneighbors(X)
        found = indices >= 0
        empty = ~found.any(axis=1)
        if empty.any():
            raise ValueError(
                f"the index found no neighbours for {int(empty.sum())} queries; raise nprobe/efSearch in "
                "search_params or use index_factory='Flat'"
            )
        if self.weights == "uniform":
            w = found.astype(np.float64)
        else:
            d = np.maximum(distances.astype(np.float64), 0.0)
            exact = found & (d <= 0.0)
            with np.errstate(divide="ignore"):
                w = np.where(found, 1.0 / d, 0.0)
            has_exact = exact.any(axis=1)
            w[has_exact] = exact[has_exact].astype(np.float64)
        labels = self.y_[np.where(found, indices, 0)]
        proba = np.zeros((X_len := indices.shape[0], len(self.classes_)), dtype=np.float64)
        np.add.at(proba, (np.repeat(np.arange(X_len), indices.shape[1]), labels.ravel()), w.ravel())
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict(self, X):
        """Majority (weighted) vote: ndarray of shape (n_samples,), from ``classes_``."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    # -- pickling: FAISS indexes are SWIG objects ----------------------------------------
    def __getstate__(self):
        state = super().__getstate__().copy()
        if isinstance(state.get("index_"), faiss.Index):
            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state):
        state = dict(state)
        if isinstance(state.get("index_"), np.ndarray):
            if _UNTRUSTED_BLOBS.get():
                check_faiss_blob(state["index_"])
            state["index_"] = faiss.deserialize_index(state["index_"])
        super().__setstate__(state)


# FAISS sizes its buffers from the numbers inside a serialized index before it reads the
# data they announce: a few hundred crafted bytes make ``deserialize_index`` fill gigabytes.
# A blob from a file a user received is therefore read first in a child process whose
# address space is capped to a small multiple of the blob's size.
_UNTRUSTED_BLOBS: contextvars.ContextVar[bool] = contextvars.ContextVar("featurebank_untrusted_faiss", default=False)

#: A legitimate index needs about its serialized size in memory; the check allows this many
#: times the blob's size (plus :data:`FAISS_CHECK_SLACK_BYTES`) on top of the child's baseline.
FAISS_CHECK_FACTOR = 4
FAISS_CHECK_SLACK_BYTES = 256 * 2**20

_CHECK_CHILD = r"""
import resource, sys
import numpy as np, faiss
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
cap = size + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
blob = np.frombuffer(sys.stdin.buffer.read(), np.uint8)
index = faiss.deserialize_index(blob)
print(index.ntotal, index.d)
"""


@contextlib.contextmanager
def untrusted_faiss_blobs():
    """While active, unpickling a :class:`KNNClassifier` checks its FAISS index blob in a child
    process with capped memory (:func:`check_faiss_blob`) before reading it here. Used by
    :func:`~featurebank.classifiers.load_classifier`."""
    token = _UNTRUSTED_BLOBS.set(True)
    try:
        yield
    finally:
        _UNTRUSTED_BLOBS.reset(token)


def check_faiss_blob(blob: np.ndarray) -> None:
    """Read a serialized FAISS index in a child process whose address space is capped at
    ``FAISS_CHECK_FACTOR * blob.size + FAISS_CHECK_SLACK_BYTES`` beyond its baseline.

    Raises
    ------
    ValueError
        The blob cannot be read within that memory (it announces more data than it holds) or
        is not a FAISS index.
    """
    allowance = FAISS_CHECK_FACTOR * int(blob.size) + FAISS_CHECK_SLACK_BYTES
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, "-c", _CHECK_CHILD, str(allowance)], input=np.ascontiguousarray(blob).tobytes(),
                          capture_output=True, env=env, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
        reason = faiss_reason(RuntimeError(last.split(": ", 1)[-1]))[:300]  # "RuntimeError: Error in ..."
        raise ValueError(
            f"the FAISS index of this KNNClassifier ({blob.size} bytes) cannot be read within "
            f"{allowance} bytes of memory: it is corrupt or crafted to exhaust memory ({reason})"
        )
