"""fewshot_study on the real lfw_subset faces / non-faces with the tiny random test_efficientnet."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from featurebank.studies import fewshot_study
from featurebank.studies.data import read_pixels

SHOTS = [1, 2, 5, "all"]


@pytest.fixture(scope="module")
def lfw_study(lfw_dir, tiny_model, studies_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot-out")
    result = fewshot_study(lfw_dir, store=studies_store, model=tiny_model, shots="1,2,5,all", repeats=3,
                           test_size=0.3, seed=0, out_dir=out, progress=False)
    return result, out


def test_test_images_are_never_in_training(lfw_study):
    result, _ = lfw_study
    assert result.n_test == 60 and result.n_pool == 140
    assert not set(result.test_keys) & set(result.pool_keys)
    assert not set(result.test_paths) & set(result.pool_paths)
    for k in ("1", "2", "5"):
        assert len(result.draws[k]) == 3
        for draw in result.draws[k]:
            drawn = {result.pool_keys[i] for i in draw}
            assert len(drawn) == 2 * int(k) and not drawn & set(result.test_keys)


def test_every_shot_count_is_trained_on_k_per_class_and_scored_on_the_fixed_split(lfw_study, lfw_dir):
    result, _ = lfw_study
    labels = {p: p.split("/")[-2] for p in result.pool_paths}
    for k in ("1", "2", "5"):
        for draw in result.draws[k]:
            counts = np.unique([labels[result.pool_paths[i]] for i in draw], return_counts=True)[1]
            assert counts.tolist() == [int(k), int(k)]
    # a different repeat is a different draw
    assert result.draws["5"][0] != result.draws["5"][1]
    assert result.shots == SHOTS
    for r in result.rows:
        done = [a for a in r["accuracy_runs"] if a is not None]
        assert r["repeats"] == (1 if r["shots"] == "all" else 3)
        if r["classifier"] == "linear_probe" and r["shots"] == 1:
            assert r["accuracy_mean"] is None and "needs 2 images per class" in r["skipped"]
            continue
        assert all(0.0 <= a <= 1.0 for a in done)
        assert r["accuracy_mean"] == pytest.approx(np.mean(done))
        # every accuracy is a count of correct test images out of the same 60
        assert all(abs(a * 60 - round(a * 60)) < 1e-9 for a in done)


def test_fewshot_writes_json_and_png_and_a_table(lfw_study):
    result, out = lfw_study
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["shots"] == SHOTS and saved["n_test"] == 60
    assert saved["transfer_beats_pixels_from"] == result.transfer_beats_pixels_from
    assert {r["features"] for r in saved["rows"]} == {"transfer", "pixels"}
    with Image.open(out / "fewshot.png") as im:
        assert im.format == "PNG" and im.width > 400
    text = result.summary()
    assert "transfer linear_probe" in text and "n/a" in text


def _numbers(d):
    d = {k: v for k, v in d.items() if k not in ("timings_s", "environment")}
    d["model"] = {k: v for k, v in d["model"].items() if k != "path"}
    return d


def test_same_seed_gives_identical_numbers_other_seed_other_draws(lfw_study, lfw_dir, tiny_model, studies_store):
    result, _ = lfw_study
    again = fewshot_study(lfw_dir, store=studies_store, model=tiny_model, shots=[1, 2, 5, "all"], repeats=3,
                          test_size=0.3, seed=0, progress=False)
    assert json.dumps(_numbers(again.to_dict())) == json.dumps(_numbers(result.to_dict()))
    other = fewshot_study(lfw_dir, store=studies_store, model=tiny_model, shots=[2], repeats=3, test_size=0.3,
                          seed=1, progress=False)
    assert other.test_keys != result.test_keys
    assert other.draws["2"] != result.draws["2"]


def test_pool_copies_of_test_images_are_dropped(tmp_path, lfw_dir, tiny_model, studies_store):
    """With a separate test source, training images whose bytes equal a test image's are
    removed from the pool, so a duplicated file cannot carry a test image into training."""
    train, test = tmp_path / "train", tmp_path / "test"
    for label in ("face", "nonface"):
        files = sorted((lfw_dir / label).glob("*.png"))
        (train / label).mkdir(parents=True)
        (test / label).mkdir(parents=True)
        for f in files[:30]:
            shutil.copy(f, train / label / f.name)
        for f in files[30:40]:
            shutil.copy(f, test / label / f.name)
        for f in files[30:33]:  # three test images also sit in training, renamed
            shutil.copy(f, train / label / f"copy_{f.name}")
    result = fewshot_study(train, store=studies_store, model=tiny_model, test_source=test, shots=[2, "all"], repeats=2,
                           seed=0, progress=False)
    assert result.test_protocol["kind"] == "test_source"
    assert result.test_protocol["pool_dropped_as_test_duplicates"] == 6
    assert result.n_pool == 60 and result.n_test == 20
    assert not any("copy_" in p for p in result.pool_paths)


def test_raw_pixels_are_standardised_per_image(lfw_dir, texture_dir):
    paths = sorted(str(p) for p in (lfw_dir / "face").glob("*.png"))[:4]
    P = read_pixels(paths, mode="gray", size=32)
    assert P.shape == (4, 1024) and P.dtype == np.float32
    np.testing.assert_allclose(P.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(P.std(axis=1), 1, atol=1e-4)
    rgb = read_pixels(sorted(str(p) for p in (texture_dir / "brick").glob("*.jpg"))[:2], mode="rgb", size=16)
    assert rgb.shape == (2, 16 * 16 * 3)
    with pytest.raises(ValueError, match="pixels must be one of gray, rgb; got pixels='hsv'"):
        read_pixels(paths, mode="hsv")


def test_fewshot_validates_its_arguments(lfw_dir, tiny_model, studies_store, tmp_path):
    kw = {"store": studies_store, "model": tiny_model, "progress": False}
    with pytest.raises(ValueError, match="shots must be positive ints or 'all'.*got '0'"):
        fewshot_study(lfw_dir, shots="0,2", **kw)
    with pytest.raises(ValueError, match="shots must be positive ints or 'all'.*got 'ten'"):
        fewshot_study(lfw_dir, shots="ten", **kw)
    with pytest.raises(ValueError, match=r"shots=80 needs 80 training images per class; classes \['face', 'nonface'\] have only 70"):
        fewshot_study(lfw_dir, shots=[5, 80], test_size=0.3, **kw)
    with pytest.raises(ValueError, match="repeats must be a positive int; got repeats=0"):
        fewshot_study(lfw_dir, repeats=0, **kw)
    with pytest.raises(ValueError, match="give model= or backbone="):
        fewshot_study(lfw_dir, backbone="test_efficientnet", **kw)
    from featurebank.export.onnx_export import export_backbone

    multi = tmp_path / "multi.onnx"
    export_backbone("test_efficientnet", multi, layers=["blocks.1", "features"], weights="random", input_format="uint8")
    with pytest.raises(ValueError, match=r"has 2 outputs \(blocks.1, features\); a few-shot study needs a one-layer model"):
        fewshot_study(lfw_dir, store=studies_store, model=multi, progress=False)
