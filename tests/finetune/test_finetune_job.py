"""The fine-tuning job end to end (featurebank.finetune.job.finetune and `featurebank finetune`):
real texture photos (tests/conftest.py's texture_dir: grass, gravel, brick, 10 JPEGs each), the
tiny random-weight test_efficientnet, real onnxruntime through `featurebank predict`."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from featurebank.artifact import read_model_card
from featurebank.cli import main
from featurebank.finetune.job import finetune

TINY = dict(backbone="test_efficientnet", weights="random", epochs=3, progress=False)
TINY_ARGS = ["--backbone", "test_efficientnet", "--weights", "random", "--epochs", "3", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(texture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "model.onnx"
    return finetune(texture_dir, out=out, **TINY)


def test_predict_with_the_model_alone_gives_the_jobs_own_validation_labels(run, tmp_path):
    assert len(run.val_paths) == 6  # 20% of 30, stratified: two per class
    assert sorted(p.split("/")[-2] for p in run.val_paths) == ["brick", "brick", "grass", "grass", "gravel", "gravel"]
    rows_path = tmp_path / "pred.json"
    assert main(["predict", *run.val_paths, "--model", str(run.model_path), "--format", "json",
                 "-o", str(rows_path), "--no-progress"]) == 0
    rows = json.loads(rows_path.read_text())
    got = {r["path"]: r["label"] for r in rows}
    assert [got[p] for p in run.val_paths] == run.val_predictions
    assert run.val_accuracy == sum(p.split("/")[-2] == lab for p, lab in zip(run.val_paths, run.val_predictions)) / 6


def test_the_model_card_records_provenance_and_the_curves_are_a_png(run):
    card = read_model_card(onnx.load(str(run.model_path)))
    assert card.classes == ("brick", "grass", "gravel")
    ft = card.finetune
    assert ft["parent_backbone"] == "test_efficientnet"
    assert ft["recipe"]["unfreeze"] == "blocks.4"  # the last stage of test_efficientnet
    assert ft["recipe"]["lr_head"] == 1e-3 and ft["recipe"]["lr_backbone"] == 1e-4
    assert ft["data_fingerprint"]["n_train"] == 24 and ft["data_fingerprint"]["n_val"] == 6
    assert len(ft["data_fingerprint"]["train"]) == 64
    assert ft["validation"]["accuracy"] == run.val_accuracy
    assert ft["validation"]["probe_cv_accuracy"] == run.probe_cv_accuracy
    assert run.curves_path == run.model_path.with_name("model.curves.png")
    assert run.curves_path.read_bytes()[:8] == PNG_MAGIC
    assert [h["epoch"] for h in run.history] == list(range(len(run.history)))
    assert run.beat_probe == (run.val_accuracy > run.probe_val_accuracy)


def test_a_second_call_with_the_same_checkpoints_trains_nothing_and_gives_the_same_model(run, texture_dir, tmp_path):
    out = tmp_path / "again.onnx"
    shutil.copytree(run.checkpoint_dir, tmp_path / "ckpt")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
    again = finetune(texture_dir, out=out, checkpoint_dir=tmp_path / "ckpt", **TINY)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()} == before
    assert again.history == run.history and again.best_epoch == run.best_epoch
    first, second = onnx.load(str(run.model_path)), onnx.load(str(out))
    assert first.graph.SerializeToString() == second.graph.SerializeToString()
    assert read_model_card(first).finetune == read_model_card(second).finetune


def test_the_command_prints_the_probe_before_and_the_fine_tuned_accuracy_after(texture_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["finetune", str(texture_dir), *TINY_ARGS, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("linear probe: cross-validated accuracy ")
    assert lines[1].startswith("fine-tuned: validation accuracy ")
    beat = read_model_card(onnx.load(str(out))).finetune
    did_not = beat["validation"]["accuracy"] <= beat["validation"]["probe_accuracy"]
    assert did_not  # seeded: the probe already classifies these 6 validation crops as well as fine-tuning does
    assert "fine-tuning did not beat the linear probe on the validation split; the model is written" in text
    assert f"use the probe: featurebank train {texture_dir} --store DIR --classifier probe -o probe.fbclf" in text
    assert out.exists() and out.with_name("m.curves.png").exists()


def _folder(root, counts):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _one_class(tmp_path, texture_dir):
    return _folder(tmp_path / "src", {"only": 5}), []


def _single_image_class(tmp_path, texture_dir):
    return _folder(tmp_path / "src", {"a": 5, "b": 1}), []


def _no_labels(tmp_path, texture_dir):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((texture_dir / "grass").iterdir())))
    return listing, []


def _bad_unfreeze(tmp_path, texture_dir):
    return texture_dir, ["--unfreeze", "blocks.9"]


def _diverging_lr(tmp_path, texture_dir):
    return texture_dir, ["--lr", "1e30"]


def _val_with_another_class(tmp_path, texture_dir):
    val = tmp_path / "val"
    shutil.copytree(texture_dir / "grass", val / "grass")
    shutil.copytree(texture_dir / "brick", val / "sand")
    return texture_dir, ["--val", str(val)]


BAD = [
    (_one_class, r"the training source holds a single class \('only'\); fine-tuning needs at least two"),
    (_single_image_class, r"the training source: classes 'b' \(1\) have fewer than 2 images"),
    (_no_labels, r"the training source has 10 image\(s\) without a label .*put each class in its own subfolder"),
    (_bad_unfreeze, r"cannot unfreeze from 'blocks.9': it is not a cut point of this network.* Valid: conv_stem, "
                    r"blocks.0, .*conv_head"),
    (_val_with_another_class, r"the validation images have classes the training images lack: \['sand'\]$"),
    (_diverging_lr, r"training diverged: the loss became nan at epoch 2.*the last good checkpoint \(epoch 1\) is kept"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m.__name__.strip("_") for m, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_no_model(make, message, texture_dir, tmp_path, capsys):
    source, extra = make(tmp_path, texture_dir)
    out = tmp_path / "model.onnx"
    assert main(["finetune", str(source), *TINY_ARGS, *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("featurebank: error: ")
    import re

    assert re.search(message, err), err
    assert not out.exists() and not out.with_name("model.curves.png").exists()
    if make is _diverging_lr:
        assert sorted(p.name for p in out.with_name("model.onnx.ckpt").iterdir()) == [
            "epoch-0001.json", "epoch-0001.safetensors"]


def test_a_validation_source_replaces_the_split(texture_dir, tmp_path):
    val = tmp_path / "val"
    for name in ("grass", "brick"):
        shutil.copytree(texture_dir / name, val / name)
    r = finetune(texture_dir, out=tmp_path / "m.onnx", val=val, **TINY)
    assert r.val_paths == sorted(str(p) for p in val.rglob("*.jpg"))
    ft = read_model_card(onnx.load(str(r.model_path))).finetune
    assert (ft["data_fingerprint"]["n_train"], ft["data_fingerprint"]["n_val"]) == (30, 20)
    assert ft["recipe"]["val_split"] is None
    assert r.classes == ["brick", "grass", "gravel"]  # the model still knows every training class


def test_an_output_folder_that_does_not_exist_is_refused_before_any_work(texture_dir, tmp_path, capsys):
    out = tmp_path / "missing" / "model.onnx"
    assert main(["finetune", str(texture_dir), *TINY_ARGS, "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"featurebank: error: output folder does not exist; create it first: {out.parent}\n"
    assert not (tmp_path / "missing").exists()


@pytest.mark.slow
def test_real_weights_efficientnet_lite0_from_blocks_6(texture_dir, tmp_path):
    """efficientnet_lite0 with its registry weights on the texture photos: the fine-tuned model
    writes, classifies its validation images as the job said, and keeps the probe's level."""
    r = finetune(texture_dir, out=tmp_path / "lite0.onnx", epochs=3, progress=False)
    card = read_model_card(onnx.load(str(r.model_path)))
    assert card.finetune["recipe"]["unfreeze"] == "blocks.6"
    assert r.val_accuracy >= r.probe_val_accuracy  # epoch 0 (the probe's head) is a candidate for the best
    rows_path = tmp_path / "pred.json"
    assert main(["predict", *r.val_paths, "--model", str(r.model_path), "--format", "json", "-o", str(rows_path),
                 "--no-progress"]) == 0
    got = {row["path"]: row["label"] for row in json.loads(rows_path.read_text())}
    assert [got[p] for p in r.val_paths] == r.val_predictions
