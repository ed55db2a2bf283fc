"""LP-FT's starting head: the linear probe with its scaler folded into one nn.Linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurebank.classifiers.probe import LinearProbe
from featurebank.errors import FineTuneError
from featurebank.finetune.head import fit_probe_head, probe_to_linear
from featurebank.finetune.model import split_backbone


@pytest.fixture()
def pooled(tiny_backbone, texture_crops) -> tuple[np.ndarray, np.ndarray]:
    bottom, top = split_backbone(tiny_backbone, "blocks.4")
    with torch.no_grad():
        feats = top.eval()(bottom(torch.from_numpy(texture_crops[0]))).numpy()
    return feats, texture_crops[1]


def test_the_folded_head_gives_the_probes_decision_function(pooled):
    X, y = pooled
    head, probe = fit_probe_head(X, y, probe=LinearProbe(cv=2))
    assert (head.in_features, head.out_features) == (256, 3)
    with torch.no_grad():
        got = head(torch.from_numpy(X)).numpy()
    want = probe.decision_function(X)
    assert want.shape == (24, 3)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert (got.argmax(1) == probe.predict(X)).all()


def test_two_classes_fold_to_two_outputs(pooled):
    X, y = pooled
    keep = y < 2
    probe = LinearProbe(cv=2).fit(X[keep], y[keep])
    with torch.no_grad():
        z = probe_to_linear(probe)(torch.from_numpy(X[keep])).numpy()
    np.testing.assert_allclose(z[:, 1] - z[:, 0], probe.decision_function(X[keep]), atol=1e-4, rtol=0)


def test_bad_labels_are_refused(pooled):
    X, y = pooled
    with pytest.raises(FineTuneError, match=r"needs at least two classes; the labels hold only \[0\]"):
        fit_probe_head(X, np.zeros(24, np.int64))
    with pytest.raises(FineTuneError, match=r"classes \[2\] have a single image"):
        fit_probe_head(X[:17], y[:17])
    with pytest.raises(FineTuneError, match=r"class indices 0..n_classes-1 without gaps; got \[0, 2\]"):
        fit_probe_head(X, np.where(y == 1, 0, y))
    with pytest.raises(FineTuneError, match=r"integer class indices; got dtype <U"):
        fit_probe_head(X, y.astype(str))
