"""Near-duplicate groups on real photo-derived vectors, and the JSON/CSV writers."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from search_data import clustered

from featurebank.search import build_index, find_duplicates, find_index_duplicates, open_index, write_duplicates


def test_real_photo_copies_group_with_their_original_only(photo_vectors):
    X, ids, expected = photo_vectors
    groups = find_duplicates(X, ids, threshold=0.95)
    assert groups == expected
    # the stereo motorcycle pair is a similar scene, not a duplicate
    assert not any(key.startswith("motorcycle") for group in groups for key in group)


def test_groups_do_not_depend_on_input_order(photo_vectors):
    X, ids, expected = photo_vectors
    order = np.random.default_rng(0).permutation(len(ids))
    assert find_duplicates(X[order], [ids[i] for i in order], threshold=0.95) == expected


def test_threshold_decides_the_groups(photo_vectors):
    X, ids, _ = photo_vectors
    assert find_duplicates(X, ids, threshold=1.0) == []  # no byte-identical copies here
    strict = find_duplicates(X, ids, threshold=0.9998)
    # at 24x24 the half-size copy of chelsea stays at cos 0.99996, its JPEG-q40 copy at 0.99969
    assert ["chelsea.jpg", "chelsea_half.jpg"] in strict
    assert not any("chelsea_q40.jpg" in group for group in strict)
    loose = find_duplicates(X, ids, threshold=0.8)
    # stereo views correlate at ~0.85 on 24x24 pixels: a low threshold links them
    assert ["motorcycle_left.jpg", "motorcycle_right.jpg"] in loose


def test_chains_are_one_component():
    # a ~ b and b ~ c above the threshold, a ~ c below it: one group of three
    angles = np.deg2rad([0.0, 10.0, 20.0, 90.0])
    X = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ids = ["a", "b", "c", "far"]
    cos10, cos20 = np.cos(np.deg2rad(10)), np.cos(np.deg2rad(20))
    threshold = float((cos10 + cos20) / 2)
    groups, scores = find_duplicates(X, ids, threshold=threshold, return_scores=True)
    assert groups == [["a", "b", "c"]]
    np.testing.assert_allclose(scores[0], [cos10, cos10, cos10], rtol=1e-5)


def test_threshold_is_inclusive_and_l2_metric():
    X = np.array([[0, 0], [3, 4], [10, 0]], dtype=np.float32)  # squared distances 25, 100, 65
    assert find_duplicates(X, ["o", "p", "q"], threshold=25.0, metric="l2") == [["o", "p"]]
    assert find_duplicates(X, ["o", "p", "q"], threshold=24.9, metric="l2") == []
    groups, scores = find_duplicates(X, ["o", "p", "q"], threshold=65.0, metric="l2", return_scores=True)
    assert groups == [["o", "p", "q"]] and scores == [[25.0, 25.0, 65.0]]


def test_exact_copies_are_grouped():
    X = clustered(500, 16, 50, seed=4)
    X = np.concatenate([X, X[:3]])
    ids = [f"{i:03d}" for i in range(500)] + ["dup0", "dup1", "dup2"]
    assert find_duplicates(X, ids, threshold=0.9999) == [["000", "dup0"], ["001", "dup1"], ["002", "dup2"]]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_index_duplicates_match_array_duplicates(tmp_path, photo_vectors, factory):
    X, ids, expected = photo_vectors
    X = np.concatenate([X, clustered(300, X.shape[1], 10, seed=5)])
    ids = ids + [f"noise{i}" for i in range(300)]
    index = build_index(X, ids, factory=factory, nprobe=4 if factory != "Flat" else None)
    reopened = open_index(index.save(tmp_path / "idx"))
    groups = find_index_duplicates(reopened, threshold=0.95)
    assert groups == find_duplicates(X, ids, threshold=0.95)
    assert [g for g in groups if not g[0].startswith("noise")] == expected


def test_bad_threshold_is_refused(photo_vectors):
    X, ids, _ = photo_vectors
    with pytest.raises(ValueError, match=r"cosine similarity .* must lie in \[-1, 1\]; got 1.5"):
        find_duplicates(X, ids, threshold=1.5)
    with pytest.raises(ValueError, match="squared L2 distance .* must be >= 0; got -1"):
        find_duplicates(X, ids, threshold=-1, metric="l2")
    with pytest.raises(ValueError, match="threshold must be a finite number; got nan"):
        find_duplicates(X, ids, threshold=float("nan"))


def test_write_json_and_csv(tmp_path, photo_vectors):
    X, ids, expected = photo_vectors
    groups, scores = find_duplicates(X, ids, threshold=0.95, return_scores=True)
    paths = {key: f"/photos/{key}" for key in ids}

    write_duplicates(groups, tmp_path / "dups.json", scores=scores, paths=paths)
    out = json.loads((tmp_path / "dups.json").read_text())
    assert out["n_groups"] == len(expected)
    assert [[m["id"] for m in g["members"]] for g in out["groups"]] == expected
    first = out["groups"][0]["members"][0]
    assert first["path"] == f"/photos/{first['id']}" and 0.95 <= first["score"] <= 1.0

    write_duplicates(groups, tmp_path / "dups.csv", format="csv")
    rows = list(csv.DictReader(open(tmp_path / "dups.csv", newline="")))
    assert len(rows) == sum(map(len, expected)) and rows[0].keys() == {"group", "id", "path", "score"}
    assert rows[0]["group"] == "0" and rows[0]["path"] == "" and rows[0]["score"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dups.csv", "dups.json"]

    stream = io.StringIO()
    write_duplicates(groups, stream, format="csv", scores=scores)
    assert stream.getvalue().startswith("group,id,path,score\n0,")
    with pytest.raises(ValueError, match=r"format must be one of \('json', 'csv'\); got 'xml'"):
        write_duplicates(groups, stream, format="xml")
    with pytest.raises(ValueError, match="scores must be parallel to groups"):
        write_duplicates(groups, stream, scores=[[1.0]])
