"""The head fine-tuning starts from: a linear probe on the frozen features, folded into one
``nn.Linear`` (LP-FT, Kumar et al., ICLR 2022).

The probe standardises its input, ``z = (x - mean) / scale``, then computes ``z @ W.T + b``.
Folding the scaler into the layer, ``W' = W / scale`` and ``b' = b - W' @ mean``, gives a
linear layer on the raw features whose output is the probe's logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from featurebank.classifiers.probe import LinearProbe
from featurebank.errors import FineTuneError

__all__ = ["fit_probe_head", "probe_to_linear"]


def probe_to_linear(probe: LinearProbe) -> nn.Linear:
    """A float32 ``nn.Linear(n_features, n_classes)`` whose output on raw features equals the
    fitted ``probe``'s logits (``probe.decision_function`` for three or more classes; for two,
    the second output minus the first). Output ``i`` is class ``probe.classes_[i]``."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(probe)
    W = np.asarray(probe.coef_, np.float64)
    b = np.asarray(probe.intercept_, np.float64)
    mean = np.asarray(probe.scaler_.mean_, np.float64)
    scale = np.asarray(probe.scaler_.scale_, np.float64)
    W_folded = W / scale
    b_folded = b - W_folded @ mean
    head = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W_folded.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(b_folded.astype(np.float32)))
    return head


def fit_probe_head(features: np.ndarray, y: np.ndarray, *, probe: LinearProbe | None = None) -> tuple[nn.Linear, LinearProbe]:
    """Fit a :class:`LinearProbe` on the frozen pooled ``features`` (n_samples, n_features) and
    fold it into a linear head.

    y : (n_samples,) integer class indices 0..n_classes-1 (the order of the head's outputs);
        every class must have at least two samples.
    probe : an unfitted LinearProbe to use (its settings); default ``LinearProbe()``.

    Returns (head, fitted probe); the probe's cross-validated accuracy is ``probe.cv_scores_``.
    """
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise FineTuneError(f"y must be a 1-d array of integer class indices; got dtype {y.dtype}, shape {y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise FineTuneError(f"fine-tuning needs at least two classes; the labels hold only {classes.tolist()}")
    if classes[0] != 0 or classes[-1] != len(classes) - 1:
        raise FineTuneError(f"y must hold the class indices 0..n_classes-1 without gaps; got {classes.tolist()}")
    if counts.min() < 2:
        lonely = classes[counts < 2].tolist()
        raise FineTuneError(f"classes {lonely} have a single image; each class needs at least two to fit and validate")
    fitted = (probe if probe is not None else LinearProbe()).fit(np.asarray(features, np.float32), y)
    return probe_to_linear(fitted), fitted
