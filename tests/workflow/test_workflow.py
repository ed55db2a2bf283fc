"""train / evaluate / predict / fuse from image folders, through the library and the CLI."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from featurebank.cli import main
from featurebank.decoding import decode_image
from featurebank.errors import ClassifierFileError, FingerprintMismatchError, ImageSourceError
from featurebank.workflow import evaluate_on_images, predict_images, train_classifier


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow  # exports efficientnet_lite0 with its real weights (session fixture)
def test_train_predict_evaluate_on_real_textures(tmp_path, texture_dir, lite0_model):
    r = train_classifier(texture_dir, lite0_model, tmp_path / "clf.fbclf", store=tmp_path / "store",
                         classifier="knn", params={"n_neighbors": 3})
    assert r["n_samples"] == 30 and r["classes"] == ["brick", "grass", "gravel"]
    rows = predict_images(texture_dir / "grass", tmp_path / "clf.fbclf", lite0_model, store=tmp_path / "store")
    # real ImageNet features: every grass photo's three nearest neighbours are grass photos
    assert [row["label"] for row in rows] == ["grass"] * 10
    assert [row["top"][0] for row in rows] == [("grass", 1.0)] * 10
    assert all(abs(sum(p for _, p in row["top"]) - 1) < 1e-5 for row in rows)
    rep = evaluate_on_images(texture_dir, lite0_model, store=tmp_path / "store", classifier="prototype", cv=5,
                             out_dir=tmp_path / "eval")
    # measured 1.0 (30 of 30); the floor allows three mistakes (chance is 1/3)
    assert rep["n_evaluated"] == 30 and rep["accuracy"] >= 0.9
    # the whole report, the model included, in report.json's one atomic write
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == rep and rep["model"]["decode_mode"] == "fast"
    assert Image.open(tmp_path / "eval" / "confusion_matrix.png").size[0] > 200


def test_cli_train_evaluate_predict_fuse(capsys, tmp_path, texture_dir, tiny_model):
    store, clf = tmp_path / "store", tmp_path / "clf.fbclf"
    code, out, err = cli(capsys, "train", texture_dir, "--store", store, "--model", tiny_model, "--classifier", "probe",
                         "-o", clf)
    assert code == 0 and "3 classes (brick, grass, gravel)" in out and "training accuracy 1.000" in out, err
    code, out, _ = cli(capsys, "evaluate", texture_dir, "--store", store, "--model", tiny_model, "--classifier",
                       "SVC", "--param", "C=10", "--out", tmp_path / "ev")
    assert code == 0 and "balanced accuracy" in out and (tmp_path / "ev" / "confusion_matrix.png").exists()
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'ev'}/report.json and {tmp_path / 'ev'}/confusion_matrix.png"
    code, out, _ = cli(capsys, "predict", texture_dir / "brick", "--classifier", clf, "--model", tiny_model,
                       "--store", store)
    rows = list(csv.DictReader(io.StringIO(out)))
    # the probe fits its training images exactly (training accuracy 1.000 above): brick photos are brick
    assert code == 0 and [r["label"] for r in rows] == ["brick"] * 10
    # fuse: pixels in, the same probabilities out as the two-step path
    code, out, err = cli(capsys, "fuse", "--model", tiny_model, "--classifier", clf, "-o", tmp_path / "e2e.onnx")
    assert code == 0, err
    sess = ort.InferenceSession(str(tmp_path / "e2e.onnx"), providers=["CPUExecutionProvider"])
    from featurebank.artifact import read_model_card

    pre = read_model_card(tiny_model).preprocessing
    paths = sorted((texture_dir / "brick").glob("*.jpg"))[:3]
    px = np.stack([decode_image(p, pre, mode="fast") for p in paths])
    fused = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixels": px})))
    two_step = predict_images(paths, clf, tiny_model, top_k=3)
    for row, probs in zip(two_step, fused["probabilities"]):
        assert max(probs) == pytest.approx(row["probability"], abs=1e-4)


def test_cli_evaluate_prints_the_report_and_writes_files_only_with_out(capsys, tmp_path, monkeypatch, texture_dir,
                                                                     tiny_model):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = cli(capsys, "evaluate", texture_dir, "--store", tmp_path / "store", "--model", tiny_model,
                         "--classifier", "SVC", "--param", "C=10", "--no-progress")
    assert code == 0, err
    lines = out.splitlines()
    # held-out 0.25 of 30 images, stratified and seeded: 8 images, measured 8 of 8 right
    assert lines[0] == "SVC, held-out 0.25: accuracy 1.0000, balanced accuracy 1.0000 on 8 images"
    assert [line.split()[0] for line in lines[1:]] == ["brick", "grass", "gravel"] and "wrote" not in out
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["store", "work"]


def test_bad_training_sets_are_clear_errors(tmp_path, texture_dir, tiny_model):
    one = tmp_path / "one"
    shutil.copytree(texture_dir / "grass", one / "grass")
    with pytest.raises(ImageSourceError, match="only one class .*at least two classes"):
        train_classifier(one, tiny_model, tmp_path / "c.fbclf", store=tmp_path / "s")
    unlabelled = tmp_path / "mixed"
    shutil.copytree(texture_dir, unlabelled)
    shutil.copy(texture_dir / "grass" / "00.jpg", unlabelled / "loose.jpg")
    with pytest.raises(ImageSourceError, match="1 of 31 images have no label .*loose.jpg.*class subfolders"):
        train_classifier(unlabelled, tiny_model, tmp_path / "c.fbclf", store=tmp_path / "s")
    single = tmp_path / "single"
    shutil.copytree(texture_dir, single)
    for p in list((single / "brick").glob("*.jpg"))[1:]:
        p.unlink()
    with pytest.raises(ValueError, match="brick"):  # a class with one image cannot be cross-validated
        train_classifier(single, tiny_model, tmp_path / "c.fbclf", store=tmp_path / "s")
    assert not (tmp_path / "c.fbclf").exists()


def test_classifier_refuses_another_model_and_corrupt_files(capsys, tmp_path, texture_dir, tiny_model):
    from featurebank.export.onnx_export import export_backbone

    other = tmp_path / "other.onnx"
    export_backbone("test_resnet", other, weights="random", input_format="uint8")
    train_classifier(texture_dir, tiny_model, tmp_path / "clf.fbclf", store=tmp_path / "s", classifier="prototype")
    with pytest.raises(FingerprintMismatchError, match=r"the classifier '.*clf\.fbclf' \(trained on backbone "
                       r"test_efficientnet, layer .+, decode mode fast\) was built on vectors of space [0-9a-f]{64}, "
                       r"which model 'test_resnet' \(output embedding\) does not produce under any decode mode"):
        predict_images(texture_dir / "grass", tmp_path / "clf.fbclf", other)
    code, _, err = cli(capsys, "predict", texture_dir / "grass", "--classifier", tmp_path / "clf.fbclf", "--model", other)
    errors = [line for line in err.splitlines() if line.startswith("featurebank: error:")]
    assert code == 2 and len(errors) == 1 and "trained" in errors[0] and "Traceback" not in err
    # fuse refuses it too (it used to check only the name and width of the output)
    code, _, err = cli(capsys, "fuse", "--model", other, "--classifier", tmp_path / "clf.fbclf", "-o", tmp_path / "f.onnx")
    assert code == 2 and not (tmp_path / "f.onnx").exists()
    assert re.search(r"^featurebank: error: the classifier '.*clf\.fbclf' was built on vectors of space [0-9a-f]{64}, "
                     r"which model 'test_resnet' \(output embedding\) does not produce under any decode mode", err, re.M)
    broken = tmp_path / "broken.fbclf"
    broken.write_bytes((tmp_path / "clf.fbclf").read_bytes()[:200])
    with pytest.raises(ClassifierFileError):
        predict_images(texture_dir / "grass", broken, tiny_model)


def test_search_by_image_and_index_build_from_source(capsys, tmp_path, photo_dir, tiny_model):
    from featurebank.search import open_index
    from featurebank.workflow import search_images

    code, out, err = cli(capsys, "index", "build", photo_dir, "--store", tmp_path / "s", "--model", tiny_model,
                         "--index", tmp_path / "idx")
    assert code == 0 and "vectors" in out, err
    idx = open_index(tmp_path / "idx")
    assert idx.count == len(list(photo_dir.glob("*.jpg")))
    queries, hits, failures = search_images([photo_dir / "coffee.jpg"], tmp_path / "idx", tiny_model, k=3)
    assert failures == [] and len(queries) == 1
    assert hits[0][0].path.endswith("coffee.jpg") and hits[0][0].score > 0.999
    code, out, _ = cli(capsys, "search", photo_dir / "chelsea.jpg", "--index", tmp_path / "idx", "--model", tiny_model,
                       "-k", "2", "--json")
    res = json.loads(out)
    assert code == 0 and res[0]["neighbours"][0]["path"].endswith("chelsea.jpg")
    # a model that does not produce the index's space is refused
    from featurebank.export.onnx_export import export_backbone

    export_backbone("test_resnet", tmp_path / "other.onnx", weights="random", input_format="uint8")
    with pytest.raises(FingerprintMismatchError, match=r"the index was built on vectors of space [0-9a-f]{64}, which "
                       r"model 'test_resnet' \(output embedding\) does not produce under any decode mode; use the "
                       "model its vectors came from"):
        search_images([photo_dir / "coffee.jpg"], tmp_path / "idx", tmp_path / "other.onnx")


def _run_cli(*argv, timeout=60):
    """The real command line in a child process; a hang fails the test instead of blocking it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "featurebank", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout)


def _folder_with_special_files(root, good):
    """Links to real photos, a FIFO and a link to /dev/zero named like images."""
    import os

    root.mkdir()
    for p in good:
        os.symlink(p, root / p.name)
    os.mkfifo(root / "fifo.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    return root


def test_predict_and_search_without_a_store_refuse_special_files_and_finish(capsys, tmp_path, texture_dir, photo_dir,
                                                                            tiny_model):
    clf = tmp_path / "clf.fbclf"
    train_classifier(texture_dir, tiny_model, clf, store=tmp_path / "s", classifier="prototype")
    good = sorted((texture_dir / "grass").glob("*.jpg"))[:2]
    q = _folder_with_special_files(tmp_path / "q", good)
    r = _run_cli("predict", q, "--classifier", clf, "--model", tiny_model, "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = {row["path"]: row for row in csv.DictReader(io.StringIO(r.stdout))}
    assert sorted(rows) == sorted(str(q / n) for n in ("fifo.jpg", "zero.jpg", *(p.name for p in good)))
    for p in good:
        assert rows[str(q / p.name)]["label"] in {"brick", "grass", "gravel"} and rows[str(q / p.name)]["error"] == ""
    for name in ("fifo.jpg", "zero.jpg"):
        assert rows[str(q / name)]["label"] == ""
        assert rows[str(q / name)]["error"] == f"{q / name}: not a regular file (a pipe, socket or device)"

    code, out, err = cli(capsys, "index", "build", photo_dir, "--store", tmp_path / "s2", "--model", tiny_model,
                         "--index", tmp_path / "idx")
    assert code == 0, err
    r = _run_cli("search", q / "fifo.jpg", photo_dir / "coffee.jpg", q / "zero.jpg", "--index", tmp_path / "idx",
                 "--model", tiny_model, "-k", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"query {photo_dir / 'coffee.jpg'}\n    1 ") and "coffee.jpg" in r.stdout.splitlines()[1]
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert failed == [f"failed: {q / n}: not a regular file (a pipe, socket or device)" for n in ("fifo.jpg", "zero.jpg")]
    r = _run_cli("search", q / "fifo.jpg", "--index", tmp_path / "idx", "--model", tiny_model)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"featurebank: error: query image could not be embedded: {q / 'fifo.jpg'}: not a regular file "
        "(a pipe, socket or device)"
    )


def test_store_space_is_resolved_by_the_one_rule(capsys, tmp_path, photo_dir, tiny_model):
    """workflow.resolve_space and `index build` pick the store space with artifact.resolve_space:
    the store's only space, the model's space under the decode mode the store holds, and a
    clear refusal when both decode modes (or no vector of the model) are there."""
    from featurebank import embed_images
    from featurebank.artifact import read_model_card, space_fingerprint
    from featurebank.errors import StoreError
    from featurebank.search import open_index
    from featurebank.store import open_store
    from featurebank.workflow import resolve_space

    store = tmp_path / "s"
    out_fp = read_model_card(tiny_model).output().fingerprint
    exact, fast = space_fingerprint(out_fp, "exact"), space_fingerprint(out_fp, "fast")
    open_store(store).close()  # an empty store
    with pytest.raises(StoreError, match=rf"holds no vectors of model '{tiny_model}' \(output embedding, decode modes "
                                         r"exact, fast\); it holds no vectors yet\. Embed with that model first"):
        resolve_space(store, model=tiny_model)
    embed_images(photo_dir, tiny_model, store=store, decode_mode="exact", progress=False)
    assert resolve_space(store) == exact  # the only space
    assert resolve_space(store, model=tiny_model) == exact  # the model's, in the mode the store holds
    # `index build --model` without --decode-mode indexes those exact vectors (it used to ask for fast ones)
    code, out, err = cli(capsys, "index", "build", "--store", store, "--model", tiny_model, "--index", tmp_path / "idx")
    assert code == 0, err
    assert open_index(tmp_path / "idx").space == exact
    embed_images(photo_dir, tiny_model, store=store, decode_mode="fast", progress=False)
    assert resolve_space(store, model=tiny_model, decode_mode="fast") == fast
    with pytest.raises(StoreError, match=rf"holds vectors of model '{tiny_model}' \(output embedding\) under decode "
                                         r"modes exact, fast; pick one with decode_mode= \(--decode-mode\)$"):
        resolve_space(store, model=tiny_model)
    with pytest.raises(StoreError, match=r"holds 2 spaces; choose one with space= \(--space\) or model= \(--model\): "):
        resolve_space(store)
    code, _, err = cli(capsys, "index", "build", "--store", store, "--model", tiny_model, "--index", tmp_path / "i2")
    assert code == 2 and "pick one with decode_mode= (--decode-mode)" in err


def test_predict_with_a_fused_model_alone_gives_the_two_step_labels(capsys, tmp_path, texture_dir, photo_dir, tiny_model):
    """`predict --model fused.onnx` with no --classifier classifies with the model's own
    probabilities / label outputs: the same labels and probabilities as backbone + classifier,
    and the same labels as the whole fused graph's `label` output."""
    from featurebank.artifact import read_model_card

    store, clf, fused = tmp_path / "store", tmp_path / "clf.fbclf", tmp_path / "fused.onnx"
    assert cli(capsys, "train", texture_dir, "--store", store, "--model", tiny_model, "-o", clf)[0] == 0
    code, _, err = cli(capsys, "fuse", "--model", tiny_model, "--classifier", clf, "-o", fused)
    assert code == 0, err
    images = [texture_dir, photo_dir]  # training photos and unseen ones
    code, out_two, err = cli(capsys, "predict", *images, "--classifier", clf, "--model", tiny_model, "--format", "json")
    assert code == 0, err
    code, out_one, err = cli(capsys, "predict", *images, "--model", fused, "--format", "json")
    assert code == 0, err
    two, one = json.loads(out_two), json.loads(out_one)
    assert len(one) == len(two) == 30 + len(list(photo_dir.iterdir())) and not any("error" in r for r in one)
    assert [(r["path"], r["label"]) for r in one] == [(r["path"], r["label"]) for r in two]
    for a, b in zip(one, two):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    # the whole graph's own label output agrees with the rows
    card = read_model_card(fused)
    sess = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    px = np.stack([decode_image(r["path"], card.preprocessing, mode="fast") for r in one])
    (label,) = sess.run(["label"], {"pixels": px})
    assert [card.classes[i] for i in label] == [r["label"] for r in one]
    # the same through the library, with the store filled by the two-step run: cached vectors
    rows = predict_images(texture_dir / "grass", None, fused, store=store)
    assert [r["label"] for r in rows] == [r["label"] for r in two if "/grass/" in r["path"]]


def test_predict_without_classifier_on_a_model_that_only_embeds_is_a_clear_error(capsys, tmp_path, texture_dir,
                                                                                  tiny_model):
    from featurebank.errors import ModelCardError

    with pytest.raises(ModelCardError, match=r"has no probabilities / label outputs \(its card lists no classes\), so "
                       r"it cannot classify by itself; give a classifier \(--classifier FILE"):
        predict_images(texture_dir / "grass", None, tiny_model)
    code, out, err = cli(capsys, "predict", texture_dir / "grass", "--model", tiny_model)
    last = err.strip().splitlines()[-1]
    assert code == 2 and out == "" and last.startswith(f"featurebank: error: model {str(tiny_model)!r} has no ")
    assert last.endswith("or fuse one into the model (`featurebank fuse`)")


def test_predict_decode_mode_that_contradicts_the_classifier_is_refused(capsys, tmp_path, texture_dir, tiny_model):
    """--decode-mode was ignored by predict before; now it is checked against the classifier's."""
    clf = tmp_path / "clf.fbclf"
    train_classifier(texture_dir, tiny_model, clf, store=tmp_path / "store")  # decode mode fast
    code, out, err = cli(capsys, "predict", texture_dir / "grass", "--classifier", clf, "--model", tiny_model,
                         "--decode-mode", "exact")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        "featurebank: error: decode_mode='exact' was asked for, but the classifier "
        f"{str(clf)!r} (trained on backbone test_efficientnet, layer features, decode mode fast) expect vectors "
        "decoded with 'fast'; leave decode_mode out")
    code, out, _ = cli(capsys, "predict", texture_dir / "grass", "--classifier", clf, "--model", tiny_model,
                       "--decode-mode", "fast")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 10
