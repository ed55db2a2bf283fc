"""export_finetuned: one ONNX graph with features, probabilities and label, equal to the torch
model on real photo crops, its provenance in the model card, nothing written on a mismatch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from featurebank.artifact import read_model_card
from featurebank.decoding import decode_image
from featurebank.errors import ExportParityError
from featurebank.export.finetuned import export_finetuned
from featurebank.export.registry import get_backbone
from featurebank.export.weights import build_backbone, state_dict_sha256

CLASSES = ("brick", "grass", "gravel")


class TinyFineTuned(torch.nn.Module):
    """A (features, logits) network: timm's random-weight test EfficientNet, pooled, plus a head."""

    def __init__(self, backbone: torch.nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.num_features, n_classes)

    def forward(self, x):
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return features, self.head(features)


class ExportsSomethingElse(TinyFineTuned):
    """Differs only while torch exports it: what a graph that does not match its source looks like."""

    def forward(self, x):
        features, logits = super().forward(x)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            features = features * 1.01
        return features, logits


SPEC = get_backbone("test_efficientnet")


def _net(cls=TinyFineTuned):
    torch.manual_seed(0)
    parent = build_backbone(SPEC, "random", seed=0)
    net = cls(parent.model, len(CLASSES))
    with torch.no_grad():  # stands in for training: the fine-tuned top moves away from the parent
        net.backbone.conv_head.weight.mul_(1.1)
        net.head.weight.normal_(0, 0.5)
    provenance = {
        "parent_backbone": SPEC.name, "parent_weights_sha256": parent.weights_sha256,
        "finetuned_weights_sha256": state_dict_sha256(net.state_dict()),
        "recipe": {"unfreeze": "blocks.5", "epochs": 3, "lr": {"top": 1e-3, "head": 1e-2}, "seed": 0},
        "data_fingerprint": "ab" * 32, "validation": {"accuracy": 0.9, "loss": 0.31},
    }
    return net, provenance


@pytest.fixture(scope="module")
def crops(photo_dir):
    """(N, 160, 160, 3) uint8: the real photos, resized and centre-cropped as the embedder does."""
    return np.stack([decode_image(p, SPEC.preprocessing, mode="exact") for p in sorted(photo_dir.iterdir())])


def test_exported_graph_equals_the_torch_model_and_the_card_reads_back(tmp_path, crops):
    net, provenance = _net()
    path = tmp_path / "ft.onnx"
    card = export_finetuned(net, path, classes=CLASSES, card=provenance, preprocessing=SPEC.preprocessing,
                            input_format="uint8", verify_pixels=crops[:2])
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["features", "probabilities", "label"]
    assert [p.name for p in tmp_path.iterdir()] == ["ft.onnx"]  # no temporary left behind

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features, proba, label = sess.run(None, {"pixels": crops})
    from featurebank.export.parity import normalise_pixels

    net.eval()
    with torch.no_grad():
        ref_f, ref_logits = net(torch.from_numpy(normalise_pixels(crops, SPEC.mean, SPEC.std)))
    ref_f, ref_p = ref_f.numpy(), torch.softmax(ref_logits, 1).numpy()
    cos = (features * ref_f).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(ref_f, axis=1)
    assert len(crops) == 9 and cos.min() >= 0.9999
    np.testing.assert_allclose(proba, ref_p, atol=1e-5)
    assert label.dtype == np.int64 and label.tolist() == ref_p.argmax(1).tolist()
    assert len(set(label.tolist())) > 1  # the head's random weights spread the photos over classes

    back = read_model_card(path)
    assert back == card and back.classes == CLASSES and back.classifies
    assert back.finetune == provenance and back.weights_sha256 == provenance["finetuned_weights_sha256"]
    assert back.output().name == "features" and back.output().dim == net.backbone.num_features
    assert back.verification["outputs"]["features"]["min_cosine"] >= 0.9999
    assert back.verification["inputs"] == 6  # 4 seeded + 2 real crops


def test_fine_tuned_features_are_a_vector_space_of_their_own(tmp_path):
    from featurebank.export.onnx_export import export_backbone

    net, provenance = _net()
    ft = export_finetuned(net, tmp_path / "ft.onnx", classes=CLASSES, card=provenance,
                          preprocessing=SPEC.preprocessing)
    parent = export_backbone(SPEC.name, tmp_path / "parent.onnx", weights="random", input_format="uint8")
    assert parent.weights_sha256 == provenance["parent_weights_sha256"]
    assert ft.output().fingerprint != parent.output().fingerprint
    with pytest.raises(ValueError, match=r"equals the parent's weights hash: the fine-tuned features would share"):
        export_finetuned(net, tmp_path / "same.onnx", classes=CLASSES, preprocessing=SPEC.preprocessing,
                         card=dict(provenance, finetuned_weights_sha256=provenance["parent_weights_sha256"]))
    assert not (tmp_path / "same.onnx").exists()


def test_parity_failure_writes_nothing(tmp_path, crops):
    net, provenance = _net(ExportsSomethingElse)
    path = tmp_path / "ft.onnx"
    with pytest.raises(ExportParityError, match=r"^features: exported fp32 model disagrees with the source model: "
                       r"max abs diff .* \(allowed .*\), min cosine .*; the export was not written$"):
        export_finetuned(net, path, classes=CLASSES, card=provenance, preprocessing=SPEC.preprocessing,
                         verify_pixels=crops)
    assert list(tmp_path.iterdir()) == []
    assert net.training  # the caller's mode is restored


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ["a"]}, r"classes needs at least two class names; got \['a'\]"),
    ({"classes": ["a", "a"]}, r"classes must be distinct as text; got \['a', 'a'\]"),
    ({"input_format": "rgb"}, r"input_format must be one of float, uint8; got input_format='rgb'"),
    ({"card": {"parent_backbone": "x"}}, r"card is missing provenance parent_weights_sha256, finetuned_weights_sha256, "
                                         r"recipe, data_fingerprint, validation"),
    ({"card": "provenance"}, r"card must be a dict of provenance \(parent_backbone, .*\); got str"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    net, provenance = _net()
    args = dict(classes=CLASSES, card=provenance, preprocessing=SPEC.preprocessing) | kwargs
    with pytest.raises(ValueError, match=message):
        export_finetuned(net, tmp_path / "ft.onnx", **args)
    assert list(tmp_path.iterdir()) == []


def test_provenance_that_is_not_json_is_refused_before_export(tmp_path):
    net, provenance = _net()
    for bad, message in ((dict(provenance, validation={"accuracy": float("nan")}), "Out of range float values"),
                         (dict(provenance, recipe={"lr": torch.tensor(1e-3)}), "Object of type Tensor")):
        with pytest.raises(ValueError, match=rf"^card must be JSON-serialisable \(it goes into the model card\): "
                                             rf"{message}"):
            export_finetuned(net, tmp_path / "ft.onnx", classes=CLASSES, card=bad, preprocessing=SPEC.preprocessing)
    assert list(tmp_path.iterdir()) == []


def test_a_fine_tuned_model_classifies_by_itself_through_predict(tmp_path, photo_dir, crops):
    """The runtime path fused models take (predict with no classifier): the labels are the
    graph's own `label` output, and the features go into a store as a space of their own."""
    from featurebank.store import open_store
    from featurebank.workflow import predict_images

    net, provenance = _net()
    path = tmp_path / "ft.onnx"
    card = export_finetuned(net, path, classes=CLASSES, card=provenance, preprocessing=SPEC.preprocessing)
    rows = predict_images(photo_dir, None, path, store=tmp_path / "store", top_k=3, decode_mode="exact")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    proba, label = sess.run(["probabilities", "label"], {"pixels": crops})  # crops: the same files, sorted, exact
    assert [r["path"] for r in rows] == [str(p) for p in sorted(photo_dir.iterdir())]
    assert [r["label"] for r in rows] == [CLASSES[i] for i in label]
    np.testing.assert_allclose([r["probability"] for r in rows], proba.max(1), atol=1e-5)
    with open_store(tmp_path / "store", create=False) as st:
        (space,) = st.spaces()
    from featurebank.artifact import space_fingerprint

    assert space.fingerprint == space_fingerprint(card.output().fingerprint, "exact") and len(space) == len(rows)


def test_the_fine_tuning_rooms_network_exports(tmp_path, crops):
    """featurebank.finetune's FineTunedNet (frozen bottom, top from blocks.4, linear head)."""
    from featurebank.finetune.model import FineTunedNet, split_backbone

    net0, provenance = _net()  # its backbone and head, moved away from the parent
    bottom, top = split_backbone(net0.backbone, "blocks.4")
    net = FineTunedNet(bottom, top, net0.head)
    card = export_finetuned(net, tmp_path / "ft.onnx", classes=CLASSES, card=provenance,
                            preprocessing=SPEC.preprocessing, verify_pixels=crops)
    assert card.verification["outputs"]["features"]["min_cosine"] >= 0.9999
    sess = ort.InferenceSession(str(tmp_path / "ft.onnx"), providers=["CPUExecutionProvider"])
    features, label = sess.run(["features", "label"], {"pixels": crops})
    net.eval()
    from featurebank.export.parity import normalise_pixels

    with torch.no_grad():
        ref_f, ref_logits = net(torch.from_numpy(normalise_pixels(crops, SPEC.mean, SPEC.std)))
    np.testing.assert_allclose(features, ref_f.numpy(), rtol=1e-4, atol=1e-4 * float(ref_f.abs().max()))
    assert label.tolist() == ref_logits.argmax(1).tolist()


@pytest.mark.slow  # efficientnet_lite0's real ImageNet weights
def test_real_weight_fine_tuned_export_equals_torch(tmp_path, crops, photo_dir):
    """efficientnet_lite0 (real weights), top from blocks.6, 10-class head: cosine >= 0.9999 fp32."""
    from featurebank.finetune.model import FineTunedNet, split_backbone

    spec = get_backbone("efficientnet_lite0")
    parent = build_backbone(spec, None)
    torch.manual_seed(0)
    bottom, top = split_backbone(parent.model, "blocks.6")
    net = FineTunedNet(bottom, top, torch.nn.Linear(parent.model.num_features, 10))
    provenance = {"parent_backbone": spec.name, "parent_weights_sha256": parent.weights_sha256,
                  "finetuned_weights_sha256": state_dict_sha256(net.state_dict()), "recipe": {"unfreeze": "blocks.6"},
                  "data_fingerprint": "0" * 64, "validation": {}}
    real = np.stack([decode_image(p, spec.preprocessing, mode="exact") for p in sorted(photo_dir.iterdir())])
    card = export_finetuned(net, tmp_path / "ft.onnx", classes=[f"c{i}" for i in range(10)], card=provenance,
                            preprocessing=spec.preprocessing, verify_pixels=real)
    # measured: features min cosine 0.9999999999986, max |diff| 8.5e-6; max |probability diff| 1.9e-7;
    # labels 13 of 13 equal (4 seeded + 9 real inputs)
    assert card.verification["inputs"] == 13
    assert card.verification["outputs"]["features"]["min_cosine"] >= 0.9999
    assert card.verification["outputs"]["probabilities"]["max_abs_diff"] <= 1e-5
    assert card.verification["outputs"]["label"]["mismatches"] == 0
