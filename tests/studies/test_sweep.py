"""sweep_layers on real texture photos with the tiny random test_efficientnet."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
from PIL import Image

from featurebank.artifact import read_model_card
from featurebank.embed_into_store import embed_images
from featurebank.studies import make_folds, score_folds, stage_layers, sweep_layers

STAGES = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "features"]


def test_stage_layers_of_efficientnet_and_resnet():
    assert stage_layers("test_efficientnet") == STAGES
    # a ResNet's stages are top-level modules; its features are layer4, not listed twice
    assert stage_layers("test_resnet") == ["layer1", "layer2", "layer3", "layer4"]


def test_sweep_scores_every_stage_from_one_multi_output_export(texture_sweep):
    result, out = texture_sweep
    assert [r["layer"] for r in result.rows] == STAGES
    assert len(result.models) == 1
    card = read_model_card(result.models["avg"])
    assert [o.layer for o in card.outputs] == STAGES  # one graph, one output per layer
    assert [r["dim"] for r in result.rows] == [o.dim for o in card.outputs]
    # one embedding pass for all layers: each image embedded once
    assert result.embedding == {"avg": {"embedded": 30, "cached": 0}}
    for r in result.rows:
        assert len(r["accuracy_folds"]) == 3 and len(r["C_folds"]) == 3
        assert r["accuracy_mean"] == pytest.approx(np.mean(r["accuracy_folds"]))
        assert r["accuracy_std"] == pytest.approx(np.std(r["accuracy_folds"]))
        assert r["fit_seconds_mean"] > 0
    best = max(r["accuracy_mean"] for r in result.rows)
    assert result.recommended["accuracy_mean"] == best
    assert result.recommended["layer"] in {r["layer"] for r in result.rows if r["accuracy_mean"] == best}


def test_sweep_rows_match_a_direct_probe_on_the_stored_vectors(texture_sweep, texture_dir, studies_store):
    """The number in the table is what a LinearProbe scores on the same folds of the vectors
    the store holds for that layer."""
    from featurebank.classifiers import LinearProbe

    result, _ = texture_sweep
    emb = embed_images(texture_dir, result.models["avg"], store=studies_store, progress=False)
    assert emb.report.embedded == 0  # all cached by the sweep
    y = np.asarray(emb.labels)
    folds = make_folds(y, 3, seed=0)
    assert [int(f) for f in result.fold_of] == [int(np.flatnonzero([i in te for _, te in folds])[0]) for i in range(30)]
    row = result.rows[3]
    direct = score_folds(LinearProbe(cv=5, random_state=0), emb.vectors[row["output"]], y, folds)
    assert direct.accuracy.tolist() == row["accuracy_folds"]


def test_sweep_writes_json_png_and_a_working_export_command(texture_sweep, tmp_path):
    from featurebank.cli import main

    result, out = texture_sweep
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["recommended"]["layer"] == result.recommended["layer"]
    assert [r["accuracy_folds"] for r in saved["rows"]] == [r["accuracy_folds"] for r in result.rows]
    assert saved["protocol"]["folds"] == 3 and len(saved["protocol"]["fold_of"]) == 30
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.width > 400
    assert "accuracy" in result.table() and "*" in result.table()
    # the printed command exports exactly the recommended layer
    argv = shlex.split(result.export_command)
    assert argv[:2] == ["featurebank", "export"]
    argv[argv.index("-o") + 1] = str(tmp_path / "best.onnx")
    assert main(argv[1:]) == 0
    card = read_model_card(tmp_path / "best.onnx")
    assert [(o.layer, o.pooling, o.dim) for o in card.outputs] == [
        (result.recommended["layer"], "avg", result.recommended["dim"])]
    assert card.input_format == "uint8"


def test_sweep_is_reproducible_with_a_seed_and_reuses_the_store(texture_sweep, texture_dir, studies_store):
    result, _ = texture_sweep
    again = sweep_layers(texture_dir, backbone="test_efficientnet", weights="random", all_stages=True,
                         store=studies_store, folds=3, seed=0, progress=False)
    assert again.embedding == {"avg": {"embedded": 0, "cached": 30}}
    keys = ("layer", "dim", "accuracy_folds", "C_folds")
    assert [{k: r[k] for k in keys} for r in again.rows] == [{k: r[k] for k in keys} for r in result.rows]
    assert again.fold_of == result.fold_of
    other = sweep_layers(texture_dir, backbone="test_efficientnet", weights="random", all_stages=True,
                         store=studies_store, folds=3, seed=1, progress=False)
    assert other.fold_of != result.fold_of


@pytest.mark.slow  # two more exports
def test_sweep_compares_poolings_with_one_export_each(texture_dir, studies_store):
    result = sweep_layers(texture_dir, backbone="test_efficientnet", weights="random", layers=["blocks.2", "features"],
                          pool=["avg", "max"], store=studies_store, folds=3, seed=0, progress=False)
    assert [(r["layer"], r["pool"]) for r in result.rows] == [
        ("blocks.2", "avg"), ("features", "avg"), ("blocks.2", "max"), ("features", "max")]
    assert set(result.models) == {"avg", "max"} and result.models["avg"] != result.models["max"]
    assert "pool" in result.table().splitlines()[0]


def test_sweep_validates_its_arguments(texture_dir, photo_dir, studies_store):
    kw = {"backbone": "test_efficientnet", "weights": "random", "store": studies_store, "progress": False}
    with pytest.raises(ValueError, match="give layers=.* or all_stages=True, not both"):
        sweep_layers(texture_dir, layers=["features"], all_stages=True, **kw)
    with pytest.raises(ValueError, match="pool must be one of avg, max, gem, token"):
        sweep_layers(texture_dir, layers=["features"], pool="mean", **kw)
    with pytest.raises(ValueError, match=r"folds=11 needs at least 11 images per class.*'brick' \(10\)"):
        sweep_layers(texture_dir, layers=["features"], folds=11, **kw)
    with pytest.raises(ValueError, match="images of the source have no label"):
        sweep_layers(photo_dir, layers=["features"], **kw)
    from featurebank.errors import UnknownLayerError

    with pytest.raises(UnknownLayerError, match="unknown layer 'blocks.9'"):
        sweep_layers(texture_dir, layers=["blocks.9"], **kw)


def test_sweep_leaves_out_files_that_repeat_another(texture_sweep, texture_dir, studies_store, tmp_path):
    """A copy of an image would be tested on itself when the two land in different folds."""
    src = tmp_path / "textures"
    shutil.copytree(texture_dir, src)
    for name in ("00.jpg", "01.jpg"):
        shutil.copy(src / "grass" / name, src / "grass" / f"copy_{name}")
    result = sweep_layers(src, backbone="test_efficientnet", weights="random", all_stages=True,
                          store=studies_store, folds=3, seed=0, progress=False)
    assert result.duplicates_dropped == 2 and result.n_images == 30
    assert "2 duplicate files left out" in result.summary()
    # the same 30 images as the sweep of the original folder, so the same numbers
    assert [r["accuracy_folds"] for r in result.rows] == [r["accuracy_folds"] for r in texture_sweep[0].rows]
