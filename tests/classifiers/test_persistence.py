"""save_classifier / load_classifier: one zip file, skops payload, vector-space check."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import skops.io
from sklearn.ensemble import RandomForestClassifier
from sklearn.svm import SVC

from featurebank.classifiers import KNNClassifier, LinearProbe, PrototypeClassifier, load_classifier, save_classifier
from featurebank.errors import ClassifierFileError, FingerprintMismatchError

SPACE = "a" * 64
OTHER = "b" * 64


@pytest.mark.parametrize(
    "clf",
    [LinearProbe(cv=3), KNNClassifier(n_neighbors=3, index_factory="IVF2,Flat", search_params="nprobe=2"),
     PrototypeClassifier(), SVC(), RandomForestClassifier(n_estimators=5, random_state=0)],
    ids=lambda c: type(c).__name__,
)
def test_round_trip_gives_identical_predictions(clf, vectors, tmp_path):
    X, y = vectors
    clf.fit(X, y)
    path = save_classifier(clf, tmp_path / "clf.fbclf", fingerprint=SPACE, meta={"backbone": "test_resnet"})
    saved = load_classifier(path, fingerprint=SPACE)
    np.testing.assert_array_equal(saved.estimator.predict(X), clf.predict(X))
    if hasattr(clf, "predict_proba") and not isinstance(clf, SVC):
        np.testing.assert_array_equal(saved.estimator.predict_proba(X), clf.predict_proba(X))
    assert saved.fingerprint == SPACE
    assert saved.classes == ("brick", "grass", "gravel")
    assert saved.format_version == 1 and saved.featurebank_version and saved.created
    assert saved.meta == {"backbone": "test_resnet"}
    assert saved.n_samples == (60 if hasattr(clf, "n_samples_fit_") else None)
    assert [p.name for p in tmp_path.iterdir()] == ["clf.fbclf"]  # no temp file left behind


def test_other_model_space_is_refused_with_the_fix(vectors, tmp_path):
    X, y = vectors
    path = save_classifier(PrototypeClassifier().fit(X, y), tmp_path / "p.fbclf", fingerprint=SPACE,
                           meta={"backbone": "efficientnet_lite0", "layer": "blocks.5"})
    with pytest.raises(FingerprintMismatchError, match=(
        r"trained on vectors of model space a{64} \(backbone=efficientnet_lite0, layer=blocks.5\), but your "
        r"vectors come from b{64}.*embed your images with the model it was trained on, or retrain")):
        load_classifier(path, fingerprint=OTHER)
    assert load_classifier(path).fingerprint == SPACE  # no fingerprint: inspection only


def test_display_class_names_must_match(vectors, tmp_path):
    X, y = vectors
    clf = PrototypeClassifier().fit(X, y)
    with pytest.raises(ValueError, match=r"classes has 2 names but the classifier has 3 classes"):
        save_classifier(clf, tmp_path / "p.fbclf", fingerprint=SPACE, classes=["a", "b"])
    with pytest.raises(ValueError, match=r"fingerprint must be the non-empty vector-space fingerprint"):
        save_classifier(clf, tmp_path / "p.fbclf", fingerprint="")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign_zip", "bad_header", "future_version"])
def test_corrupt_or_foreign_files_raise_classifier_file_error(damage, vectors, tmp_path):
    X, y = vectors
    path = save_classifier(LinearProbe(cv=3).fit(X, y), tmp_path / "p.fbclf", fingerprint=SPACE)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
        match = r"truncated/corrupt"
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04pickle-ish bytes")
        match = r"not a featurebank classifier file"
    elif damage == "foreign_zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("hello.txt", "hi")
        match = r"zip file but not a featurebank classifier"
    else:
        with zipfile.ZipFile(path) as zf:
            header = json.loads(zf.read("featurebank-classifier.json"))
            model = zf.read("model.skops")
        if damage == "bad_header":
            header.pop("magic")
            match = r"not a featurebank classifier file \(bad header\)"
        else:
            header["format_version"] = 99
            match = r"format version 99; this featurebank reads version 1"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("featurebank-classifier.json", json.dumps(header))
            zf.writestr("model.skops", model)
    with pytest.raises(ClassifierFileError, match=match):
        load_classifier(path, fingerprint=SPACE)


def test_types_outside_sklearn_numpy_featurebank_are_refused(vectors, tmp_path):
    X, y = vectors
    path = save_classifier(PrototypeClassifier().fit(X, y), tmp_path / "p.fbclf", fingerprint=SPACE)
    with zipfile.ZipFile(path) as zf:
        header = zf.read("featurebank-classifier.json")
    # a payload that asks skops to rebuild a type from another module
    from collections import Counter

    clf = PrototypeClassifier().fit(X, y)
    clf.extra_ = Counter("abc")
    evil = skops.io.dumps(clf)
    assert "collections.Counter" in skops.io.get_untrusted_types(data=evil)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("featurebank-classifier.json", header)
        zf.writestr("model.skops", evil)
    with pytest.raises(ClassifierFileError, match=r"asks to rebuild types featurebank does not load from a classifier file: collections\.Counter\. "):
        load_classifier(path, fingerprint=SPACE)


def test_missing_file(tmp_path):
    with pytest.raises(ClassifierFileError, match=r"no classifier file at"):
        load_classifier(tmp_path / "nope.fbclf")
