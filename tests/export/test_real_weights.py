"""The embedded default with its real ImageNet weights, on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurebank.decoding import decode_image, to_model_input
from featurebank.embedder.session import open_model
from featurebank.export.onnx_export import export_backbone
from featurebank.export.registry import get_backbone
from featurebank.export.weights import build_backbone

pytestmark = pytest.mark.slow

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def lite0_logits(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "lite0-logits.onnx"
    export_backbone("efficientnet_lite0", path, layers=["logits"])
    return path


def test_exported_classifier_recognises_real_photos(lite0_logits, photos):
    runner = open_model(lite0_logits, device="cpu")
    for name, expected in (("chelsea", CATS), ("coffee", COFFEE)):
        px = decode_image(photos[name], runner.card.preprocessing, mode="exact")[None]
        logits = runner.run(to_model_input(px, runner.card))["embedding"][0]
        top5 = set(np.argsort(logits)[::-1][:5].tolist())
        assert top5 & expected, (name, sorted(top5))


def test_exported_embedder_agrees_with_torch_on_real_photos(lite0_model, photos):
    """The whole chain (our decoder + onnxruntime) against timm's own transform + torch."""
    import timm

    lb = build_backbone(get_backbone("efficientnet_lite0"))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=lb.model))
    runner = open_model(lite0_model, device="cpu")
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    with torch.no_grad():
        x = torch.stack([transform(Image.fromarray(photos[n])) for n in names])
        ref = lb.model.forward_features(x).mean((2, 3)).numpy()
    px = np.stack([decode_image(photos[n], runner.card.preprocessing, mode="exact") for n in names])
    got = runner.run(to_model_input(px, runner.card))["embedding"]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.abs(ref - got).max() <= 1e-3 * np.abs(ref).max()
    assert runner.card.verification["outputs"]["embedding"]["min_cosine"] >= 0.9999


def test_fp16_default_export_within_fp16_tolerance_on_photos(tmp_path, lite0_model, photos):
    export_backbone("efficientnet_lite0", tmp_path / "h.onnx", precision="fp16", input_format="uint8")
    a, b = open_model(lite0_model, device="cpu"), open_model(tmp_path / "h.onnx", device="cpu")
    px = np.stack([decode_image(photos[n], a.card.preprocessing) for n in ("chelsea", "coffee")])
    va, vb = a.run(px)["embedding"], b.run(px)["embedding"]
    cos = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
    assert cos.min() >= 0.999
