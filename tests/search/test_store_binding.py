"""Indexes over a real featurebank store filled from real photo files; the CLI commands on it."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from search_data import pixel_vector, reencode_jpeg, resize

from featurebank.cli import main
from featurebank.errors import FingerprintMismatchError, StoreError
from featurebank.search import (
    find_store_duplicates,
    index_store,
    open_index,
    query_index,
    store_paths,
)
from featurebank.store import open_store

SPACE = hashlib.sha256(b"pixels-24x24-rgb-centred").hexdigest()
OTHER = hashlib.sha256(b"another-model").hexdigest()


@pytest.fixture()
def photo_files(tmp_path, photos):
    """Real photo JPEGs plus, for three of them, a q40 re-encode and a half-size copy,
    as files. Returns (paths of the first batch, paths of the second batch, expected groups)."""
    root = tmp_path / "imgs"
    root.mkdir()
    first, second, groups = [], [], []
    for i, name in enumerate(sorted(photos)):
        img = photos[name]
        Image.fromarray(img).save(root / f"{name}.jpg", quality=92)
        first.append(root / f"{name}.jpg")
        if name in ("astronaut", "chelsea", "coffee"):
            Image.fromarray(reencode_jpeg(img, 40)).save(root / f"{name}_q40.jpg", quality=95)
            Image.fromarray(resize(img, 0.5)).save(root / f"{name}_half.jpg", quality=92)
            second += [root / f"{name}_q40.jpg", root / f"{name}_half.jpg"]
            groups.append(sorted(str(root / f"{name}{s}.jpg") for s in ("", "_q40", "_half")))
    return first, second, sorted(groups)


def embed_into(store_dir, paths, space=SPACE):
    """What the embedder does, with a crude real-image embedding: hash, decode, vectorise, add."""
    with open_store(store_dir) as store:
        hashed = store.hash_files(paths)
        X = np.stack([pixel_vector(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
        store.space(space, dim=X.shape[1]).add(hashed.keys, X, paths=paths)
        return dict(zip(map(str, paths), hashed.keys))


def test_index_store_builds_then_adds_only_new_vectors(tmp_path, photo_files):
    first, second, _ = photo_files
    store_dir, index_dir = tmp_path / "store", tmp_path / "idx"
    keys = embed_into(store_dir, first)
    index, n_added = index_store(store_dir, SPACE, index_dir)
    assert n_added == len(first) == index.count and index.space == SPACE and index.factory == "Flat"
    assert sorted(index.ids) == sorted(keys.values())
    assert open_index(index_dir).source["store"] == str(store_dir.absolute())  # plus "shards" (format 2)

    keys.update(embed_into(store_dir, second))
    index, n_added = index_store(store_dir, SPACE, index_dir)
    assert n_added == len(second) and index.count == len(first) + len(second)
    _, n_added = index_store(store_dir, SPACE, index_dir)
    assert n_added == 0

    # the grown index answers exactly like a fresh build
    fresh, _ = index_store(store_dir, SPACE, tmp_path / "fresh")
    with open_store(store_dir, create=False) as store:
        Q, _ = store.space(SPACE).get(list(keys.values()))
    assert open_index(index_dir).search(Q, k=5)[1] == fresh.search(Q, k=5)[1]


def test_query_index_prints_paths_of_the_store(tmp_path, photo_files):
    first, second, _ = photo_files
    store_dir = tmp_path / "store"
    keys = embed_into(store_dir, first + second)
    index_store(store_dir, SPACE, tmp_path / "idx")
    q40 = keys[str(second[0])]  # astronaut_q40
    hits = query_index(tmp_path / "idx", ids=[q40], k=3)[0]
    names = [os.path.basename(h.path) for h in hits]
    # itself first; the other two copies are ~1e-5 apart in cosine, so their order is not pinned
    assert names[0] == "astronaut_q40.jpg" and sorted(names[1:]) == ["astronaut.jpg", "astronaut_half.jpg"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[1].score > 0.99
    assert store_paths(store_dir, [q40]) == {q40: str(second[0])}
    with pytest.raises(ValueError, match="exactly one of Q .* or ids"):
        query_index(tmp_path / "idx", k=3)


def test_index_store_refuses_another_space_metric_or_factory(tmp_path, photo_files):
    first, _, _ = photo_files
    store_dir, index_dir = tmp_path / "store", tmp_path / "idx"
    embed_into(store_dir, first)
    embed_into(store_dir, first[:3], space=OTHER)
    index_store(store_dir, SPACE, index_dir)
    with pytest.raises(FingerprintMismatchError, match=f"holds vectors of space '{SPACE}', not '{OTHER}'"):
        index_store(store_dir, OTHER, index_dir)
    with pytest.raises(ValueError, match="uses metric='cosine', not 'l2'"):
        index_store(store_dir, SPACE, index_dir, metric="l2")
    with pytest.raises(ValueError, match="built with factory 'Flat', not 'HNSW16'"):
        index_store(store_dir, SPACE, index_dir, factory="HNSW16")
    index, _ = index_store(store_dir, OTHER, index_dir, rebuild=True)
    assert index.space == OTHER and index.count == 3
    with pytest.raises(StoreError, match="does not exist"):
        index_store(tmp_path / "nostore", SPACE, tmp_path / "idx2")


def test_store_duplicates_are_the_copies(tmp_path, photo_files):
    first, second, expected = photo_files
    store_dir = tmp_path / "store"
    keys = embed_into(store_dir, first + second)
    groups = find_store_duplicates(store_dir, SPACE, threshold=0.95)
    path_of = store_paths(store_dir)
    assert sorted(sorted(path_of[k] for k in g) for g in groups) == expected
    assert len(path_of) == len(keys)


# ------------------------------------------------------------------------------ CLI


def test_cli_index_search_dedup(tmp_path, photo_files, capsys):
    first, second, expected = photo_files
    store_dir, index_dir = str(tmp_path / "store"), str(tmp_path / "idx")
    keys = embed_into(store_dir, first + second)

    assert main(["index", "build", "--store", store_dir, "--space", SPACE, "--index", index_dir]) == 0
    out = capsys.readouterr().out
    assert f"Flat (cosine), {len(keys)} vectors of dim 1728, {len(keys)} added" in out

    assert main(["index", "info", index_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["space"] == SPACE

    key = keys[str(second[1])]  # astronaut_half
    assert main(["search", "--index", index_dir, "--id", key, "-k", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["query"] == key
    assert [os.path.basename(n["path"]) for n in result["neighbours"]] == ["astronaut_half.jpg", "astronaut.jpg"]

    q = tmp_path / "q.npy"
    np.save(q, pixel_vector(np.asarray(Image.open(first[0]).convert("RGB"))))  # shape (dim,)
    assert main(["search", "--index", index_dir, "--vector-file", str(q), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"query {q}[0]\n") and os.path.basename(str(first[0])) in out

    assert main(["search", "--index", index_dir, "--id", key, "-k", "99"]) == 2
    assert f"k=99 is larger than the number of indexed vectors (count={len(keys)})" in capsys.readouterr().err
    assert main(["search", "--index", index_dir, "--id", "f" * 64, "-k", "1"]) == 2
    assert "is not in the index" in capsys.readouterr().err

    out_csv = tmp_path / "dups.csv"
    assert main(["dedup", "--index", index_dir, "--threshold", "0.95", "--format", "csv", "-o", str(out_csv)]) == 0
    rows = out_csv.read_text().splitlines()
    assert rows[0] == "group,id,path,score" and len(rows) == 1 + sum(map(len, expected))
    assert main(["dedup", "--store", store_dir, "--space", SPACE]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(sorted(m["path"] for m in g["members"]) for g in report["groups"]) == expected

    assert main(["dedup", "--store", store_dir]) == 2
    assert "--store needs --space" in capsys.readouterr().err
    assert main(["index", "build", "--store", store_dir, "--space", OTHER, "--index", index_dir]) == 2
    assert "does not exist" in capsys.readouterr().err
