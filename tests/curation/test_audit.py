"""featurebank audit on real images with known faults: flipped labels, an intruder photo, a
train/test copy; through the library and the CLI; and the confident-learning rule itself."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurebank.cli import main
from featurebank.curation import audit_images, baseline_label_issues, find_label_issues, outlier_scores
from featurebank.errors import ImageSourceError


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_confident_learning_uses_per_class_thresholds():
    # class 1 is predicted with low confidence everywhere (its threshold is 0.4), so a global
    # 0.5 cut flags all of class 1, while per-class thresholds flag only the one image of class 1
    # that is confidently class 0
    p = np.array([[.9, .1], [.85, .15], [.8, .2], [.88, .12],
                  [.55, .45], [.6, .4], [.62, .38], [.9, .1]])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert find_label_issues(labels, p).tolist() == [7]
    assert baseline_label_issues(labels, p, 0.5).tolist() == [7, 6, 5, 4]
    # an image predicted as its own label is never flagged
    assert find_label_issues(np.array([0, 0, 1, 1]), np.array([[.9, .1], [.8, .2], [.3, .7], [.2, .8]])).tolist() == []


def test_outlier_scores_against_the_sets_own_distribution():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 0.05, (40, 8)) + np.eye(8)[0], rng.normal(0, 0.05, (40, 8)) + np.eye(8)[1],
                        np.eye(8)[5:6]]).astype(np.float32)
    s = outlier_scores(X, ["a"] * 40 + ["b"] * 40 + ["a"], k=5)
    assert int(np.argmax(s["knn_score"])) == 80 and s["knn_score"][80] > 10
    assert int(np.argmax(s["class_score"])) == 80
    assert s["knn_score"][80] > 20 * np.max(s["knn_score"][:80])


@pytest.mark.slow  # efficientnet_lite0 with real weights (session fixture, ~10 s to export)
def test_audit_finds_flipped_labels_the_intruder_and_the_leak(faulty, lite0_model, tmp_path):
    r = audit_images(faulty.train, lite0_model, store=tmp_path / "store", test=faulty.test, progress=False)
    s = r["summary"]
    assert s["n_images"] == 49 and s["n_test_images"] == 1 and s["classes"] == ["brick", "grass", "gravel"]
    rows = r["suspects"]
    assert [row["rank"] for row in rows] == list(range(1, len(rows) + 1))
    # leakage first: exactly the copied image, with the test file it leaks to
    leaks = [row for row in rows if row["issue"] == "leakage"]
    assert [(row["path"], row["related"], row["score"]) for row in leaks] == [
        (str(faulty.original), [str(faulty.copy)], 1.0)]
    assert rows[0]["issue"] == "leakage"
    # both flipped labels are flagged, with the true class suggested
    label = {row["path"]: row for row in rows if row["issue"] == "label"}
    assert faulty.flipped <= set(label)
    assert label[str(faulty.train / "brick/grass00.jpg")]["suggested"] == "grass"
    assert label[str(faulty.train / "grass/gravel00.jpg")]["suggested"] == "gravel"
    # label suspects are ranked by self-confidence, lowest first
    conf = [row["self_confidence"] for row in rows if row["issue"] == "label"]
    assert conf == sorted(conf)
    # the astronaut among gravel is the worst outlier by far, and far from every class
    outliers = [row for row in rows if row["issue"] == "outlier"]
    assert outliers[0]["path"] == str(faulty.intruder)
    assert all(outliers[0]["score"] > 2 * row["score"] for row in outliers[1:])
    far = [row for row in rows if row["issue"] == "far_from_classes"]
    assert far[0]["path"] == str(faulty.intruder)
    kinds = [row["issue"] for row in rows]
    assert kinds == sorted(kinds, key=["leakage", "conflict", "label", "outlier", "far_from_classes"].index)


@pytest.mark.slow
def test_audit_cli_table_csv_json_and_sheets(faulty, lite0_model, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, err = cli(capsys, "audit", faulty.train, "--test", faulty.test, "--store", store, "--model", lite0_model,
                         "--no-progress", "--sheet", tmp_path / "sheet.png")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("audit of 49 images, 3 classes (probe, 5-fold out-of-fold accuracy ")
    assert "1 leakage" in lines[0]
    assert lines[1].split() == ["rank", "issue", "given", "suggested", "self_confidence", "score", "path"]
    assert lines[2].split()[:2] == ["1", "leakage"]
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as im:
        assert im.format == "PNG" and im.size[0] == 8 * (128 + 12)
    code, out, err = cli(capsys, "audit", faulty.train, "--test", faulty.test, "--store", store, "--model",
                         lite0_model, "--no-progress", "--format", "csv", "-o", tmp_path / "s.csv",
                         "--sheet", tmp_path / "sheet.html")
    assert code == 0 and out == ""
    rows = list(csv.DictReader(open(tmp_path / "s.csv", newline="")))
    assert list(rows[0]) == ["rank", "issue", "path", "given", "suggested", "self_confidence", "margin", "score",
                             "related"]
    assert (rows[0]["issue"], rows[0]["path"], rows[0]["related"]) == ("leakage", str(faulty.original), str(faulty.copy))
    page = (tmp_path / "sheet.html").read_text()
    assert page.count("data:image/jpeg;base64,") == len(rows) and "given: gravel" in page
    code, out, _ = cli(capsys, "audit", faulty.train, "--store", store, "--model", lite0_model, "--no-progress",
                       "--format", "json")
    doc = json.loads(out)
    assert doc["summary"]["counts"]["leakage"] == 0  # no --test, no leakage
    assert {r["path"] for r in doc["suspects"] if r["issue"] == "label"} >= faulty.flipped


def test_audit_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model, faulty, photo_dir):
    unlabelled = subprocess.run([sys.executable, "-m", "featurebank", "audit", str(photo_dir), "--store",
                                 str(tmp_path / "s"), "--model", str(tiny_model), "--no-progress"],
                                capture_output=True, text=True)
    assert unlabelled.returncode == 2
    assert unlabelled.stderr.count("\n") == 2  # the model line and the error
    assert unlabelled.stderr.splitlines()[-1].startswith(
        "featurebank: error: 9 of 9 images have no label (first: ")
    assert "an audit needs labelled images" in unlabelled.stderr
    lonely = tmp_path / "lonely"
    for cls, n in (("a", 3), ("b", 1)):
        (lonely / cls).mkdir(parents=True)
        for i in range(n):
            (lonely / cls / f"{i}.jpg").write_bytes((faulty.train / "grass" / f"grass{i + 1:02d}.jpg").read_bytes()
                                                    if cls == "a" else (faulty.train / "brick/brick01.jpg").read_bytes())
    with pytest.raises(ImageSourceError, match=r"^class 'b' has 1 image; every class needs at least 2 for out-of-fold"):
        audit_images(lonely, tiny_model, store=tmp_path / "s", progress=False)
    with pytest.raises(ImageSourceError, match=r"only one class \('a'\) in 3 images"):
        audit_images(_one_class(lonely, tmp_path), tiny_model, store=tmp_path / "s", progress=False)


def _one_class(lonely: Path, tmp_path: Path) -> Path:
    import shutil

    one = tmp_path / "one"
    shutil.copytree(lonely / "a", one / "a")
    return one


def test_the_same_image_under_two_labels_is_a_conflict(faulty, tiny_model, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(faulty.train, train)
    shutil.copy(train / "grass/grass03.jpg", train / "brick/also_grass03.jpg")  # identical bytes, label brick
    r = audit_images(train, tiny_model, store=tmp_path / "store", progress=False)
    conflicts = [row for row in r["suspects"] if row["issue"] == "conflict"]
    assert [(row["path"], row["given"], row["related"]) for row in conflicts] == [
        (str(train / "brick/also_grass03.jpg"), "brick", [str(train / "grass/grass03.jpg")]),
        (str(train / "grass/grass03.jpg"), "grass", [str(train / "brick/also_grass03.jpg")]),
    ]
    assert r["summary"]["counts"]["conflict"] == 2 and r["summary"]["counts"]["leakage"] == 0
    assert r["suspects"][0]["issue"] == "conflict"
