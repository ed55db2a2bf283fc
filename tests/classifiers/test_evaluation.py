"""evaluate_classifier: metrics equal sklearn's, report.json and a real PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split

from featurebank.classifiers import LinearProbe, PrototypeClassifier, evaluate_classifier


def test_holdout_report_matches_sklearn_and_writes_files(vectors, tmp_path):
    X, y = vectors
    X = X + 0.8 * np.random.default_rng(1).standard_normal(X.shape).astype(np.float32)  # make mistakes happen
    clf = PrototypeClassifier()
    report = evaluate_classifier(clf, X, y, test_size=0.5, random_state=0, out_dir=tmp_path / "eval")
    assert not hasattr(clf, "classes_")  # a clone was fitted, not clf
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=30, stratify=y, random_state=0)
    y_pred = PrototypeClassifier().fit(X_tr, y_tr).predict(X_te)
    assert report["accuracy"] == pytest.approx(accuracy_score(y_te, y_pred))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_te, y_pred))
    assert report["confusion_matrix"] == confusion_matrix(y_te, y_pred, labels=["brick", "grass", "gravel"]).tolist()
    f1 = f1_score(y_te, y_pred, average=None, labels=["brick", "grass", "gravel"])
    assert [report["per_class"][c]["f1"] for c in ("brick", "grass", "gravel")] == pytest.approx(f1)
    assert sum(v["support"] for v in report["per_class"].values()) == 30 == report["n_evaluated"]

    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["accuracy"] == report["accuracy"] and on_disk["confusion_matrix"] == report["confusion_matrix"]
    png = tmp_path / "eval" / "confusion_matrix.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert 300 <= im.width <= 3000 and 300 <= im.height <= 3000
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # not a blank canvas


def test_kfold_pools_out_of_fold_predictions(vectors):
    X, y = vectors
    report = evaluate_classifier(LinearProbe(cv=2, Cs=3), X, y, cv=3)
    assert report["n_evaluated"] == 60 and report["protocol"]["kind"] == "stratified_kfold"
    assert np.sum(report["confusion_matrix"]) == 60


def test_bad_protocols_are_refused(vectors):
    X, y = vectors
    with pytest.raises(ValueError, match=r"cv must be None .* or an int >= 2; got cv=1"):
        evaluate_classifier(PrototypeClassifier(), X, y, cv=1)
    with pytest.raises(ValueError, match=r"test_size must be a float in \(0, 1\)"):
        evaluate_classifier(PrototypeClassifier(), X, y, test_size=3)
    y1 = y.copy()
    y1[0] = "lonely"
    with pytest.raises(ValueError, match=r"\['lonely'\] have a single sample"):
        evaluate_classifier(PrototypeClassifier(), X, y1)
