"""fuse_classifier on a real exported backbone: pixels in, label and probabilities out."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.linear_model import LogisticRegression

from featurebank.artifact import read_model_card
from featurebank.classifiers import KNNClassifier, LinearProbe, PrototypeClassifier, fuse_classifier
from featurebank.errors import ModelCardError

pytestmark = pytest.mark.slow  # exports a (tiny, random-weight) backbone with torch


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("backbone") / "test_resnet.onnx"
    card = export_backbone("test_resnet", path)
    return path, card


@pytest.fixture(scope="module")
def embedded(backbone):
    """(pixels, vectors, labels): seeded pixels through the real backbone session, labelled
    by terciles of a random projection so the classes are learnable."""
    path, card = backbone
    rng = np.random.default_rng(0)
    c, h, w = card.preprocessing.input_size
    pixels = rng.standard_normal((45, c, h, w)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    X = sess.run(None, {card.input_name: pixels})[0]
    s = (X - X.mean(axis=0)) @ rng.standard_normal(X.shape[1])
    y = np.array(["brick", "grass", "gravel"])[np.digitize(s, np.quantile(s, [1 / 3, 2 / 3]))]
    return pixels, X, y


@pytest.mark.parametrize("clf", [LinearProbe(cv=3), PrototypeClassifier(), LogisticRegression(max_iter=500)],
                         ids=lambda c: type(c).__name__)
def test_fused_model_equals_two_step_path(clf, backbone, embedded, tmp_path):
    path, card = backbone
    pixels, X, y = embedded
    clf.fit(X, y)
    out = fuse_classifier(path, clf, tmp_path / "fused.onnx")
    model = onnx.load(out)
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["embedding", "label", "probabilities"]
    # the backbone's card survives with the class names added (the convention fine-tuned
    # models share), the vector space is unchanged, and the classifier is described next to it
    fused_card = read_model_card(out)
    assert fused_card.classes == ("brick", "grass", "gravel") and fused_card.classifies and not card.classifies
    assert fused_card.outputs == card.outputs and fused_card.fingerprint != card.fingerprint
    info = json.loads({p.key: p.value for p in model.metadata_props}["featurebank.classifier"])
    assert "classes" not in info and info["space"] == card.output().fingerprint
    assert info["verification"]["max_abs_diff"] <= 1e-4

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"pixels": pixels[:7]})
    np.testing.assert_allclose(proba, clf.predict_proba(X[:7]), atol=1e-4)
    assert label.dtype == np.int64
    np.testing.assert_array_equal(np.array(fused_card.classes)[label], clf.predict(X[:7]))
    assert [p.name for p in tmp_path.iterdir()] == ["fused.onnx"]


def test_knn_is_refused_with_reason(backbone, embedded, tmp_path):
    path, _ = backbone
    _, X, y = embedded
    with pytest.raises(ValueError, match=r"KNNClassifier cannot be fused into ONNX: .*FAISS index.*two steps"):
        fuse_classifier(path, KNNClassifier(n_neighbors=3).fit(X, y), tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


def test_width_mismatch_and_foreign_model(backbone, embedded, tmp_path):
    path, _ = backbone
    _, X, y = embedded
    with pytest.raises(ValueError, match=r"fitted on 10-dim vectors but output 'embedding' of this model is 96-dim"):
        fuse_classifier(path, PrototypeClassifier().fit(X[:, :10], y), tmp_path / "f.onnx")
    bare = onnx.load(path)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ModelCardError, match=r"no featurebank model card"):
        fuse_classifier(tmp_path / "bare.onnx", PrototypeClassifier().fit(X, y), tmp_path / "f.onnx")
