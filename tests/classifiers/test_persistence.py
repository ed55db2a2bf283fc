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
from featurebank.classifiers.persistence import ALLOWED_NODES
from featurebank.classifiers.registry import list_classifiers, make_classifier
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


# Meta-estimators that need an estimator object: `train` cannot build them (--param takes JSON values).
NOT_TRAINABLE_BY_NAME = {
    "ClassifierChain", "FixedThresholdClassifier", "MultiOutputClassifier", "OneVsOneClassifier",
    "OneVsRestClassifier", "OutputCodeClassifier", "SelfTrainingClassifier", "StackingClassifier",
    "TunedThresholdClassifierCV", "VotingClassifier",
}
# Options that change what a fitted estimator is made of (trees, losses, optimisers, indexes).
VARIANTS = {
    "probe": [{"cv": 3}],
    "knn": [{}, {"index_factory": "IVF2,Flat", "search_params": "nprobe=2"}, {"metric": "l2"}],
    "KNeighborsClassifier": [{}, {"algorithm": "kd_tree"}, {"algorithm": "ball_tree"}],
    "RadiusNeighborsClassifier": [{"radius": 5.0}],
    "SVC": [{}, {"probability": True}],
    "MLPClassifier": [{"max_iter": 50}, {"solver": "sgd", "max_iter": 50}],
    "SGDClassifier": [{}, {"loss": "log_loss"}, {"loss": "modified_huber"}],
    "CalibratedClassifierCV": [{}, {"method": "isotonic"}],
    "GradientBoostingClassifier": [{"n_estimators": 5}],
}


@pytest.mark.parametrize("name", list_classifiers())
def test_every_classifier_train_accepts_round_trips(name, tmp_path, make_vectors):
    """The allow-list never refuses a file `featurebank train` writes: every name it accepts,
    with the options that change what it holds, on a multi-class and a binary problem."""
    if name in NOT_TRAINABLE_BY_NAME:
        with pytest.raises((TypeError, ValueError)):
            make_classifier(name).fit(*make_vectors())
        return
    for n_per_class in ((12, 12, 12), (15, 15)):
        X, y = make_vectors(n_per_class=n_per_class, n_features=8)
        X = np.abs(X)  # the naive Bayes classifiers take counts
        for params in VARIANTS.get(name, [{}]):
            clf = make_classifier(name, **params).fit(X, y)
            path = save_classifier(clf, tmp_path / "c.fbclf", fingerprint=SPACE)
            saved = load_classifier(path, fingerprint=SPACE)
            np.testing.assert_array_equal(saved.estimator.predict(X), clf.predict(X), err_msg=f"{name} {params}")
            assert saved.classes == tuple(sorted(set(y)))


def test_allow_list_holds_exact_names_with_their_loader():
    assert all(isinstance(n, str) and "." in n and not n.endswith(".") and isinstance(loader, str)
               and loader.endswith("Node") for n, loader in ALLOWED_NODES)
    loaders = {loader for _, loader in ALLOWED_NODES}
    # the loaders that call functions, methods or arbitrary constructors are not among them
    assert not loaders & {"FunctionNode", "MethodNode", "PartialNode", "OperatorFuncNode",
                          "ConstructorFromReduceNode", "BytesNode", "SparseMatrixNode", "CachedNode"}


def test_header_must_name_as_many_classes_as_the_estimator(vectors, tmp_path):
    X, y = vectors
    path = save_classifier(PrototypeClassifier().fit(X, y), tmp_path / "p.fbclf", fingerprint=SPACE)
    with zipfile.ZipFile(path) as zf:
        header, model = json.loads(zf.read("featurebank-classifier.json")), zf.read("model.skops")
    header["classes"] = ["brick", "grass"]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("featurebank-classifier.json", json.dumps(header))
        zf.writestr("model.skops", model)
    with pytest.raises(ClassifierFileError, match=r"header names 2 classes but its estimator has 3; the file was "
                       r"edited or is corrupt: save the classifier again"):
        load_classifier(path, fingerprint=SPACE)


def test_cli_predict_and_fuse_refuse_a_header_with_too_few_classes(capsys, tmp_path, texture_dir, tiny_model):
    """Was an IndexError traceback in `predict`, and exit 0 in `fuse`."""
    from featurebank.cli import main
    from featurebank.workflow import train_classifier

    clf = tmp_path / "clf.fbclf"
    train_classifier(texture_dir, tiny_model, clf, store=tmp_path / "store", classifier="probe")
    with zipfile.ZipFile(clf) as zf:
        header, model = json.loads(zf.read("featurebank-classifier.json")), zf.read("model.skops")
    header["classes"] = header["classes"][:2]
    bad = tmp_path / "bad.fbclf"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("featurebank-classifier.json", json.dumps(header))
        zf.writestr("model.skops", model)
    expected = (f"featurebank: error: {str(bad)!r} header names 2 classes but its estimator has 3; the file was edited "
                "or is corrupt: save the classifier again with featurebank.save_classifier")
    for argv in (["predict", texture_dir / "brick", "--classifier", bad, "--model", tiny_model, "--store", tmp_path / "store"],
                 ["fuse", "--model", tiny_model, "--classifier", bad, "-o", tmp_path / "e2e.onnx"]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines()[-1] == expected and "Traceback" not in err
    assert not (tmp_path / "e2e.onnx").exists()
    # the size cap reaches the CLI
    code = main(["predict", str(texture_dir / "brick"), "--classifier", str(clf), "--model", str(tiny_model),
                 "--max-classifier-bytes", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "bytes uncompressed, over the limit of 1000 bytes; if you trust this file, raise the limit" in err
