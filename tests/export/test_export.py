"""export_backbone on tiny random-weight backbones: real torch models, real ONNX files,
real onnxruntime sessions, checked against torch computed independently here."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from featurebank.artifact import read_model_card
from featurebank.errors import ExportParityError, UnknownLayerError, WeightsMismatchError
from featurebank.export import onnx_export
from featurebank.export.layers import list_layers, resolve_layers, truncate
from featurebank.export.onnx_export import export_backbone
from featurebank.export.registry import get_backbone
from featurebank.export.weights import build_backbone


def run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {"pixels": x}))}


def torch_features(name, layer, x):
    spec = get_backbone(name)
    lb = build_backbone(spec, "random")
    (info,) = resolve_layers([layer], list_layers(spec, lb.model))
    with torch.no_grad():
        return truncate(lb.model, spec, [info])(torch.from_numpy(x))[0]


def pixels(name, n=3, seed=1):
    rng = np.random.default_rng(seed)
    _, h, w = get_backbone(name).input_size
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def normalise(name, px):
    s = get_backbone(name)
    x = (px.astype(np.float32) / 255 - np.float32(s.mean)) / np.float32(s.std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def cos_rows(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    "layer,pool,normalize",
    [("blocks.1", "avg", False), ("blocks.3", "max", False), ("features", "gem", True), ("features", "avg", True)],
)
def test_export_matches_torch_at_layers_and_poolings(tmp_path, layer, pool, normalize):
    out = tmp_path / "m.onnx"
    card = export_backbone("test_efficientnet", out, layers=[layer], pool=pool, normalize=normalize, weights="random")
    x = normalise("test_efficientnet", pixels("test_efficientnet"))
    got = run(out, x)["embedding"]
    fmap = torch_features("test_efficientnet", layer, x)
    ref = {"avg": fmap.mean((2, 3)), "max": fmap.amax((2, 3)),
           "gem": fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)}[pool]
    if normalize:
        ref = torch.nn.functional.normalize(ref, dim=1)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert got.shape == (3, card.dim) == tuple(ref.shape)
    assert cos_rows(got, ref.numpy()).min() >= 0.9999
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4 * float(ref.abs().max()) + 1e-6)
    assert card.output().layer == layer and card.output().pooling == pool


def test_card_reads_back_and_fingerprint_tracks_the_recipe(tmp_path):
    a = export_backbone("test_resnet", tmp_path / "a.onnx", layers=["layer2"], weights="random")
    again = export_backbone("test_resnet", tmp_path / "a2.onnx", layers=["layer2"], weights="random")
    b = export_backbone("test_resnet", tmp_path / "b.onnx", layers=["layer2"], pool="max", weights="random")
    card = read_model_card(tmp_path / "a.onnx")
    assert card == a and card.backbone == "test_resnet" and card.layer == "layer2"
    assert card.dim == {i.name: i for i in list_layers("test_resnet")}["layer2"].shape[0]
    assert card.preprocessing == get_backbone("test_resnet").preprocessing
    assert card.weights_source == "random:seed=0" and len(card.weights_sha256) == 64
    assert card.verification["outputs"]["embedding"]["min_cosine"] >= 0.9999
    keys = {p.key for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}
    assert {"featurebank.backbone", "featurebank.weights_sha256", "featurebank.outputs", "featurebank.preprocessing",
            "featurebank.precision", "featurebank.featurebank_version", "featurebank.fingerprint"} <= keys
    assert again.fingerprint == a.fingerprint  # deterministic
    assert b.fingerprint != a.fingerprint and b.output().fingerprint != a.output().fingerprint


def test_early_cut_gives_a_smaller_graph(tmp_path):
    export_backbone("test_efficientnet", tmp_path / "early.onnx", layers=["blocks.1"], weights="random")
    export_backbone("test_efficientnet", tmp_path / "late.onnx", layers=["features"], weights="random")
    early, late = onnx.load(str(tmp_path / "early.onnx")), onnx.load(str(tmp_path / "late.onnx"))
    assert len(early.graph.node) < len(late.graph.node) / 2
    assert os.path.getsize(tmp_path / "early.onnx") < os.path.getsize(tmp_path / "late.onnx") / 2
    ops = {n.op_type for n in late.graph.node}
    assert "Gemm" not in ops and "MatMul" not in ops  # the classifier is gone


def test_dynamic_batch_and_opset(tmp_path):
    export_backbone("test_resnet", tmp_path / "m.onnx", weights="random")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for n in (1, 5):
        assert run(tmp_path / "m.onnx", normalise("test_resnet", pixels("test_resnet", n)))["embedding"].shape[0] == n


def test_uint8_input_equals_float_input(tmp_path):
    export_backbone("test_resnet", tmp_path / "f.onnx", layers=["layer3"], weights="random")
    card = export_backbone("test_resnet", tmp_path / "u.onnx", layers=["layer3"], input_format="uint8", weights="random")
    inp = ort.InferenceSession(str(tmp_path / "u.onnx")).get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [160, 160, 3]
    px = pixels("test_resnet", 4)
    a = run(tmp_path / "f.onnx", normalise("test_resnet", px))["embedding"]
    b = run(tmp_path / "u.onnx", px)["embedding"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert card.input_format == "uint8"
    # the vector space is the same: the store shares cached vectors between the two
    assert card.output().fingerprint == read_model_card(tmp_path / "f.onnx").output().fingerprint


def test_several_layers_give_one_named_output_each(tmp_path):
    card = export_backbone("test_vit", tmp_path / "m.onnx", layers=["blocks.0", "features", "logits"], weights="random")
    assert [o.name for o in card.outputs] == ["embedding:blocks.0", "embedding:features", "embedding:logits"]
    assert [o.pooling for o in card.outputs] == ["token", "token", "none"]
    x = normalise("test_vit", pixels("test_vit", 2))
    got = run(tmp_path / "m.onnx", x)
    assert [got[o.name].shape for o in card.outputs] == [(2, 64), (2, 64), (2, 1000)]
    ref = torch_features("test_vit", "features", x)[:, 0]
    assert cos_rows(got["embedding:features"], ref.numpy()).min() >= 0.9999
    # each output has the fingerprint a single-layer export of that layer has
    single = export_backbone("test_vit", tmp_path / "s.onnx", layers=["features"], weights="random")
    assert single.output().fingerprint == card.output("features").fingerprint


def test_fp16_export_is_half_the_size_and_within_fp16_tolerance(tmp_path):
    export_backbone("test_efficientnet", tmp_path / "32.onnx", weights="random")
    card = export_backbone("test_efficientnet", tmp_path / "16.onnx", precision="fp16", weights="random")
    assert card.precision == "fp16"
    assert os.path.getsize(tmp_path / "16.onnx") < 0.62 * os.path.getsize(tmp_path / "32.onnx")
    x = normalise("test_efficientnet", pixels("test_efficientnet"))
    a, b = run(tmp_path / "32.onnx", x)["embedding"], run(tmp_path / "16.onnx", x)["embedding"]
    assert b.dtype == np.float32 and cos_rows(a, b).min() >= 0.999


def test_parity_failure_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    real_add_heads = onnx_export.add_heads

    def broken_converter(model, heads, **kw):  # stands for an exporter bug changing a weight
        m = real_add_heads(model, heads, **kw)
        # (random timm ResNets zero-init the last BN of each block, so one weight alone may not show)
        for init in m.graph.initializer:
            arr = onnx.numpy_helper.to_array(init)
            if arr.dtype == np.float32 and arr.ndim == 4:
                noisy = arr + np.random.default_rng(0).normal(0, 3 * float(arr.std()) + 1e-3, arr.shape)
                init.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), init.name))
        return m

    monkeypatch.setattr(onnx_export, "add_heads", broken_converter)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportParityError, match=r"max abs diff .* min cosine .*not written"):
        export_backbone("test_resnet", out, weights="random")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_weights_file_round_trip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    lb = build_backbone(get_backbone("test_resnet"), "random", seed=3)
    torch.save({"state_dict": lb.model.state_dict()}, tmp_path / "w.pth")
    save_file(lb.model.state_dict(), str(tmp_path / "w.safetensors"))
    a = export_backbone("test_resnet", tmp_path / "a.onnx", weights=tmp_path / "w.pth")
    b = export_backbone("test_resnet", tmp_path / "b.onnx", weights=tmp_path / "w.safetensors")
    assert a.weights_sha256 == b.weights_sha256 == lb.weights_sha256
    assert a.weights_source == "file:w.pth"
    with pytest.raises(WeightsMismatchError, match=r"do not fit .*missing keys: conv_stem.*unexpected keys: conv1.*shape mismatch: bn1.weight"):
        export_backbone("test_efficientnet", tmp_path / "c.onnx", weights=tmp_path / "w.pth")
    assert not (tmp_path / "c.onnx").exists()


def test_bad_pooling_for_layer_is_refused(tmp_path):
    with pytest.raises(UnknownLayerError, match="--pool token needs a token layer"):
        export_backbone("test_resnet", tmp_path / "m.onnx", pool="token", weights="random")
    with pytest.raises(UnknownLayerError, match="already a vector.*--pool none"):
        export_backbone("test_resnet", tmp_path / "m.onnx", layers=["logits"], pool="avg", weights="random")
    with pytest.raises(ValueError, match="pool must be one of"):
        export_backbone("test_resnet", tmp_path / "m.onnx", pool="mean", weights="random")


def test_unwritable_output_is_refused_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        export_backbone("test_resnet", tmp_path / "no" / "m.onnx", weights="random")
    with pytest.raises(IsADirectoryError):
        export_backbone("test_resnet", tmp_path, weights="random")


def test_vit_avg_pool_leaves_out_the_class_token_like_timm(tmp_path):
    export_backbone("test_vit", tmp_path / "m.onnx", layers=["features"], pool="avg", weights="random")
    spec = get_backbone("test_vit")
    lb = build_backbone(spec, "random")
    x = normalise("test_vit", pixels("test_vit", 2))
    with torch.no_grad():
        tokens = lb.model.forward_features(torch.from_numpy(x))
        ref = tokens[:, lb.model.num_prefix_tokens:].mean(1).numpy()
    got = run(tmp_path / "m.onnx", x)["embedding"]
    assert lb.model.num_prefix_tokens >= 1
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("typo,suggestions", [
    # registered names are timm names too: each is suggested once
    ("efficentnet_lite0", "efficientnet_lite0, efficientnet_lite4, efficientnet_lite3, efficientnet_lite2, "
                          "efficientnet_lite1"),
    ("test_resnt", "test_resnet, test_nfnet, test_vit, test_vit_relpos, test_byobnet"),
])
def test_backbone_suggestions_name_each_backbone_once(typo, suggestions):
    from featurebank.errors import UnknownBackboneError

    with pytest.raises(UnknownBackboneError, match=rf"unknown backbone '{typo}'\. Did you mean: {suggestions}\? Run"):
        get_backbone(typo)
