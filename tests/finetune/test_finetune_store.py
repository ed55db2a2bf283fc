"""``finetune(..., store=DIR)``: the frozen bottom exported as ONNX (no pooling) through the model
cache, its activation maps cached in the store's activation space. Real texture photos
(tests/conftest.py's texture_dir: 3 classes x 10 JPEGs), the tiny random-weight
test_efficientnet, real onnxruntime sessions, a real store."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from featurebank.cli import main
from featurebank.errors import FineTuneError, UnknownLayerError
from featurebank.finetune.job import bottom_layer, finetune
from featurebank.finetune.model import split_backbone

TINY = dict(backbone="test_efficientnet", weights="random", epochs=3, progress=False)


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """A model cache of this module's own, so the exports are made here and not reused."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREBANK_CACHE", str(tmp_path_factory.mktemp("fb-cache")))
        yield os.environ["FEATUREBANK_CACHE"]


def test_bottom_layer_names_the_layer_that_feeds_each_cut_point(tiny_backbone):
    # test_efficientnet: stem (conv_stem, bn1), blocks.0 .. blocks.4 of one block each, conv_head
    assert bottom_layer(tiny_backbone, "blocks.0") == "bn1"  # the stem's output (batch norm + activation)
    assert bottom_layer(tiny_backbone, "blocks.0.0") == "bn1"
    assert bottom_layer(tiny_backbone, "blocks.1") == "blocks.0.0"
    assert bottom_layer(tiny_backbone, "blocks.4") == "blocks.3.0"
    assert bottom_layer(tiny_backbone, "conv_head") == "blocks.4.0"
    with pytest.raises(FineTuneError, match=r"^--unfreeze conv_stem trains the whole network: nothing is frozen"):
        bottom_layer(tiny_backbone, "conv_stem")
    with pytest.raises(UnknownLayerError, match=r"cannot unfreeze from 'blocks\.9'"):
        bottom_layer(tiny_backbone, "blocks.9")


@pytest.mark.parametrize("unfreeze", ["blocks.0", "blocks.4", "conv_head"])
def test_the_onnx_bottom_equals_the_torch_bottom_on_real_photos(unfreeze, texture_dir, tmp_path):
    from featurebank.decoding import decode_image, to_model_input
    from featurebank.embed_into_store import load_activations
    from featurebank.export.cache import cached_export
    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone

    spec = get_backbone("test_efficientnet")
    model = build_backbone(spec, "random", seed=0).model
    bottom, _ = split_backbone(model, unfreeze)
    path = cached_export("test_efficientnet", layers=[bottom_layer(model, unfreeze)], pool="none", weights="random",
                         input_format="uint8", seed=0)
    files = sorted(str(p) for p in texture_dir.rglob("*.jpg"))
    A, _, _, paths, report = load_activations(files, path, tmp_path / "store", decode_mode="fast", progress=False)
    assert paths == files and report.embedded == 30
    pixels = np.stack([decode_image(p, spec.preprocessing, mode="fast") for p in files])
    with torch.no_grad():
        ref = bottom(torch.from_numpy(to_model_input(pixels, spec.preprocessing, "float"))).numpy()
    assert A.shape == ref.shape and A.ndim == 4
    a, r = A.reshape(30, -1).astype(np.float64), ref.reshape(30, -1).astype(np.float64)
    cosine = (a * r).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(r, axis=1)
    assert cosine.min() >= 0.9999
    assert np.abs(A - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_load_activations_refuses_a_pooled_model(tiny_model, texture_dir, tmp_path):
    from featurebank.embed_into_store import load_activations

    with pytest.raises(ValueError, match=r"is pooled \(avg\), not an activation map; read embeddings with load_embeddings"):
        load_activations(texture_dir, tiny_model, tmp_path / "store", progress=False)


@pytest.fixture(scope="module")
def stored(texture_dir, tmp_path_factory):
    """The first store-backed run, its store and output folder."""
    root = tmp_path_factory.mktemp("ft-store")
    r = finetune(texture_dir, out=root / "a.onnx", store=root / "store", **TINY)
    return r, root


def test_a_first_run_embeds_every_image_and_a_second_reads_them_all_from_the_store(stored, texture_dir):
    first, root = stored
    assert (first.embedded, first.cached) == (30, 0)
    again = finetune(texture_dir, out=root / "b.onnx", store=root / "store", checkpoint_dir=root / "other.ckpt", **TINY)
    assert (again.embedded, again.cached) == (0, 30)
    assert again.val_predictions == first.val_predictions and again.val_accuracy == first.val_accuracy
    assert [h["val_accuracy"] for h in again.history] == [h["val_accuracy"] for h in first.history]
    # the two written models classify the same images the same way
    import onnxruntime as ort

    from featurebank.artifact import read_model_card
    from featurebank.decoding import decode_image

    card = read_model_card(first.model_path)
    pixels = np.stack([decode_image(p, card, mode="fast") for p in first.val_paths])
    probs = [ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(["probabilities"], {card.input_name: pixels})[0]
             for m in (first.model_path, again.model_path)]
    np.testing.assert_allclose(probs[0], probs[1], rtol=0, atol=1e-6)


def test_the_activation_space_is_refused_by_index_build(stored, tmp_path, capsys):
    from featurebank.export.cache import cached_export
    from featurebank.store import open_store

    _, root = stored
    with open_store(root / "store", create=False) as st:
        spaces = st.spaces()
    assert len(spaces) == 1 and spaces[0].holds_activations
    assert spaces[0].output.layer == "blocks.3.0" and spaces[0].output.shape == (48, 10, 10)
    # the run's bottom, from the model cache (a hit: the same options as the run's)
    bottom = cached_export("test_efficientnet", layers=["blocks.3.0"], pool="none", weights="random",
                           input_format="uint8", seed=0)
    capsys.readouterr()
    assert main(["index", "build", "--store", str(root / "store"), "--model", str(bottom),
                 "--index", str(tmp_path / "ix")]) == 2
    err = capsys.readouterr().err
    assert "holds activation maps of layer blocks.3.0 (48 x 10 x 10) cached for fine-tuning, not embeddings" in err
    assert not (tmp_path / "ix").exists()


def test_the_in_memory_and_store_paths_agree(stored, texture_dir, tmp_path):
    first, _ = stored
    memory = finetune(texture_dir, out=tmp_path / "m.onnx", **TINY)
    assert (memory.embedded, memory.cached) == (None, None)
    assert memory.val_paths == first.val_paths
    assert memory.val_predictions == first.val_predictions
    assert memory.val_accuracy == first.val_accuracy
    assert memory.probe_val_accuracy == first.probe_val_accuracy


def test_the_command_takes_a_store_and_says_what_it_embedded(stored, texture_dir, tmp_path, capsys):
    _, root = stored
    out = tmp_path / "c.onnx"
    capsys.readouterr()
    assert main(["finetune", str(texture_dir), "--backbone", "test_efficientnet", "--weights", "random", "--epochs",
                 "1", "--no-progress", "--store", str(root / "store"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"frozen layers: 0 images embedded, 30 from the store {root / 'store'}\n" in text
    assert out.is_file()


def test_store_with_conv_stem_is_refused_before_anything_is_written(texture_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["finetune", str(texture_dir), "--backbone", "test_efficientnet", "--weights", "random",
                 "--unfreeze", "conv_stem", "--no-progress", "--store", str(tmp_path / "store"),
                 "-o", str(tmp_path / "m.onnx")]) == 2
    assert "--unfreeze conv_stem trains the whole network: nothing is frozen, so there is nothing to cache" in \
        capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_a_new_image_is_the_only_one_embedded(stored, texture_dir, tmp_path):
    import shutil

    from PIL import Image

    _, root = stored
    grown = tmp_path / "textures"
    shutil.copytree(texture_dir, grown)
    with Image.open(grown / "grass" / "00.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(grown / "grass" / "10.jpg", quality=90)  # new bytes
    r = finetune(grown, out=tmp_path / "g.onnx", store=root / "store", **{**TINY, "epochs": 1})
    assert (r.embedded, r.cached) == (1, 30)
