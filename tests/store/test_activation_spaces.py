"""Activation spaces: a bottom cut exported with ``--pool none`` embeds into a store space of
its own (the cache fine-tuning trains on), stored flattened C*H*W, and every path that needs
embeddings (index build, search, store export, train) refuses it with one line, exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from featurebank.artifact import OutputSpec, Preprocessing, read_model_card
from featurebank.cli import main
from featurebank.decoding.decode import decode_image
from featurebank.embed_into_store import space_of
from featurebank.embedder.session import open_model
from featurebank.errors import ActivationSpaceError
from featurebank.search import build_index
from featurebank.store import open_store

LAYER, SHAPE = "blocks.2", (32, 20, 20)  # test_efficientnet's layer at stride 8


@pytest.fixture(scope="module")
def act_model(tmp_path_factory) -> Path:
    """test_efficientnet (random weights, uint8 input) cut at blocks.2 with no pooling."""
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("act") / "bottom.onnx"
    export_backbone("test_efficientnet", path, layers=[LAYER], pool="none", weights="random", input_format="uint8")
    return path


@pytest.fixture(scope="module")
def act_store(tmp_path_factory, act_model, texture_dir) -> tuple[Path, str]:
    """A store holding the activation space of the 30 real texture crops (embedded by the CLI)."""
    root = tmp_path_factory.mktemp("actstore") / "store"
    assert main(["embed", str(texture_dir), "--store", str(root), "--model", str(act_model)]) == 0
    return root, space_of(open_model(act_model), read_model_card(act_model).output().name, "fast")


def _message(space: str) -> str:
    return (f"space {space} holds activation maps of layer {LAYER} \\(32 x 20 x 20\\) cached for "
            "fine-tuning, not embeddings: export the model with a pooling \\(--pool avg\\) to index, search, "
            "export or train on it")


def _assert_refused(err: str, space: str) -> None:
    """stderr holds the refusal as its one error line (after the model banner), no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and re.fullmatch("featurebank: error: " + _message(space), errors[0]), err


def test_card_marks_an_unpooled_output_as_an_activation_map(act_model, tiny_model):
    out = read_model_card(act_model).output()
    assert (out.layer, out.pooling, out.shape, out.dim) == (LAYER, "none", SHAPE, 32 * 20 * 20)
    assert out.is_activation_map
    with pytest.raises(ActivationSpaceError, match=r"^space s1 holds activation maps of layer blocks\.2 \(32 x 20 x 20\)"):
        out.check_embedding("s1")
    pooled = read_model_card(tiny_model).output()
    assert pooled.pooling == "avg" and not pooled.is_activation_map
    assert pooled.check_embedding("s2") is None


def test_old_cards_keep_their_fingerprint():
    # values computed with the card code before activation spaces existed (commit ff3b24c)
    pre = Preprocessing(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    common = dict(name="embedding", layer="blocks.5", normalize=False, backbone="efficientnet_lite0",
                  weights_sha256="ab" * 32, weights_source="pypi:x", preprocessing=pre, precision="fp32")
    avg = OutputSpec.make(pooling="avg", dim=320, **common)
    none = OutputSpec.make(pooling="none", shape=(112, 14, 14), **common)
    assert avg.fingerprint == "cfe5a59f5dc9a04d45a8201410dcb3e92e078f6115dd8f97f5dec20af5cadf93"
    assert none.fingerprint == "5056546d60f5c4b81ee243f7fd252039886f6f4c4671b3182810dc87593fbe50"
    assert set(none.to_dict()) == {"name", "layer", "pooling", "normalize", "shape", "fingerprint"}
    assert OutputSpec.from_dict(none.to_dict()) == none


def test_embedded_activations_reshape_to_the_onnx_activation_map(act_model, act_store, texture_dir):
    root, fp = act_store
    card = read_model_card(act_model)
    files = sorted(texture_dir.rglob("*.jpg"))
    pixels = np.stack([decode_image(p, card, mode="fast") for p in files])
    sess = ort.InferenceSession(str(act_model), providers=["CPUExecutionProvider"])
    (ref,) = sess.run([card.output().name], {card.input_name: pixels})
    assert ref.shape == (30, *SHAPE)  # NCHW activation map, not a vector
    with open_store(root, create=False) as store:
        space = store.space(fp)
        meta = json.loads((space.path / "space.json").read_text())
        assert space.holds_activations and space.output == card.output()
        assert meta["dim"] == 32 * 20 * 20 and meta["info"]["output"]["shape"] == list(SHAPE)
        assert meta["info"]["output"]["pooling"] == "none" and meta["info"]["output"]["layer"] == LAYER
        keys = [it.key for it in sorted(store.items(), key=lambda it: it.path)]
        paths = [it.path for it in sorted(store.items(), key=lambda it: it.path)]
        X, ok = space.get(keys)
    assert paths == [str(p) for p in files] and ok.all()
    np.testing.assert_array_equal(X.reshape(-1, *SHAPE), ref)
    with pytest.raises(ActivationSpaceError, match="^" + _message(fp) + "$"):
        space.check_embeddings()


def test_index_build_refuses_an_activation_space(act_model, act_store, tmp_path, capsys):
    root, fp = act_store
    capsys.readouterr()
    assert main(["index", "build", "--store", str(root), "--model", str(act_model), "--index", str(tmp_path / "ix")]) == 2
    _assert_refused(capsys.readouterr().err, fp)
    assert not (tmp_path / "ix").exists()
    assert main(["dedup", "--store", str(root), "--space", fp]) == 2
    _assert_refused(capsys.readouterr().err, fp)


def test_store_export_refuses_an_activation_space(act_model, act_store, tmp_path, capsys):
    root, fp = act_store
    capsys.readouterr()
    for fmt in ("parquet", "npy"):
        out = tmp_path / f"v.{fmt}"
        assert main(["store", "export", str(root), "--space", fp, "-o", str(out), "--format", fmt]) == 2
        _assert_refused(capsys.readouterr().err, fp)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_and_evaluate_refuse_an_activation_model(act_model, act_store, texture_dir, tmp_path, capsys):
    root, fp = act_store
    capsys.readouterr()
    clf = tmp_path / "clf.joblib"
    assert main(["train", str(texture_dir), "--store", str(root), "--model", str(act_model), "-o", str(clf)]) == 2
    _assert_refused(capsys.readouterr().err, fp)
    report = tmp_path / "report"
    assert main(["evaluate", str(texture_dir), "--store", str(root), "--model", str(act_model), "--out", str(report)]) == 2
    _assert_refused(capsys.readouterr().err, fp)
    assert list(tmp_path.iterdir()) == []
    # the same model by --model for store export (the space it writes is resolved from the card)
    out = tmp_path / "v.parquet"
    assert main(["store", "export", str(root), "--model", str(act_model), "-o", str(out)]) == 2
    _assert_refused(capsys.readouterr().err, fp)
    assert not out.exists()


def test_search_refuses_an_activation_space(act_model, act_store, texture_dir, tmp_path, capsys):
    """An index over an activation space cannot be built by featurebank any more; one written
    directly with build_index (or by an older version) is still refused at query time."""
    root, fp = act_store
    with open_store(root, create=False) as store:
        space = store.space(fp)
        keys = [str(k) for k in space.keys()]
        X, _ = space.get(keys)
    build_index(X, keys, factory="Flat", space=fp).save(tmp_path / "ix")
    capsys.readouterr()
    query = sorted(texture_dir.rglob("*.jpg"))[0]
    assert main(["search", str(query), "--index", str(tmp_path / "ix"), "--model", str(act_model)]) == 2
    _assert_refused(capsys.readouterr().err, fp)


def test_a_pooled_space_is_unaffected(tiny_model, texture_dir, tmp_path, capsys):
    root = tmp_path / "store"
    assert main(["embed", str(texture_dir), "--store", str(root), "--model", str(tiny_model)]) == 0
    fp = space_of(open_model(tiny_model), read_model_card(tiny_model).output().name, "fast")
    with open_store(root, create=False) as store:
        space = store.space(fp)
        assert not space.holds_activations and space.check_embeddings() is None
    assert main(["index", "build", "--store", str(root), "--model", str(tiny_model), "--index", str(tmp_path / "ix")]) == 0
    assert main(["store", "export", str(root), "--space", fp, "-o", str(tmp_path / "v.parquet")]) == 0
    assert main(["train", str(texture_dir), "--store", str(root), "--model", str(tiny_model),
                 "-o", str(tmp_path / "clf.joblib")]) == 0
    query = sorted(texture_dir.rglob("*.jpg"))[0]
    assert main(["search", str(query), "--index", str(tmp_path / "ix"), "--model", str(tiny_model)]) == 0
    assert (tmp_path / "v.parquet").is_file() and (tmp_path / "clf.joblib").is_file()
