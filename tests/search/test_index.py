"""SimilarityIndex on real FAISS indexes: exactness, persistence, incremental add, recall, bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from search_data import clustered, hex_ids

import featurebank
from featurebank.errors import FingerprintMismatchError, IndexFileError, UnknownIdError
from featurebank.search import SimilarityIndex, build_index, open_index, resolve_factory
from featurebank.search.index import default_nprobe


def exact_knn(X: np.ndarray, Q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    X64, Q64 = X.astype(np.float64), Q.astype(np.float64)
    if metric == "cosine":
        X64 = X64 / np.linalg.norm(X64, axis=1, keepdims=True)
        Q64 = Q64 / np.linalg.norm(Q64, axis=1, keepdims=True)
        S = Q64 @ X64.T
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    else:
        S = ((Q64[:, None, :] - X64[None]) ** 2).sum(-1)
        order = np.argsort(S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, order, axis=1), order


@pytest.fixture(scope="module")
def data():
    X = clustered(3000, 32, 30, seed=1)
    Q = clustered(50, 32, 30, seed=2)
    return X, Q, hex_ids(3000)


# ------------------------------------------------------------------ exact search


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_search_matches_numpy(data, metric):
    X, Q, ids = data
    index = build_index(X, ids, metric=metric)
    scores, found = index.search(Q, k=5)
    ref_scores, ref_rows = exact_knn(X, Q, 5, metric)
    assert scores.dtype == np.float32 and scores.shape == (50, 5)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)
    assert found == [[ids[r] for r in row] for row in ref_rows]
    assert index.count == len(index) == 3000 and index.dim == 32 and index.factory == "Flat"


def test_real_photo_copy_finds_its_original(photo_vectors):
    X, ids, groups = photo_vectors
    originals = [i for i, key in enumerate(ids) if "_q40" not in key and "_half" not in key]
    index = build_index(X[originals], [ids[i] for i in originals])
    copies = [i for i, key in enumerate(ids) if "_q40" in key or "_half" in key]
    scores, found = index.search(X[copies], k=2)
    for row, i in enumerate(copies):
        original = ids[i].replace("_q40", "").replace("_half", "")
        assert found[row][0] == original
        assert scores[row, 0] > 0.98 > scores[row, 1]


def test_search_by_id_finds_itself_first(data):
    X, _, ids = data
    index = build_index(X, ids)
    scores, found = index.search_by_id(ids[10:13], k=3)
    assert [row[0] for row in found] == ids[10:13]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(UnknownIdError, match="'nope' is not in the index"):
        index.search_by_id(["nope"], k=1)


# ------------------------------------------------------------------ persistence


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ8x4"])
def test_save_open_round_trip(tmp_path, data, factory):
    X, Q, ids = data
    index = build_index(X, ids, factory=factory, space="fp-abc")
    before = index.search(Q, k=10)
    path = index.save(tmp_path / "idx")
    meta = json.loads((path / "index.json").read_text())
    assert meta["factory"] == factory and meta["metric"] == "cosine" and meta["dim"] == 32
    assert meta["count"] == 3000 and meta["space"] == "fp-abc"
    assert meta["featurebank_version"] == featurebank.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp leftovers
    again = open_index(path)
    assert (again.factory, again.metric, again.space, again.count, again.nprobe) == (
        factory, "cosine", "fp-abc", 3000, index.nprobe,
    )
    after = again.search(Q, k=10)
    np.testing.assert_array_equal(before[0], after[0])
    assert before[1] == after[1]


def test_save_replaces_an_existing_index_and_refuses_foreign_dirs(tmp_path, data):
    X, Q, ids = data
    path = tmp_path / "idx"
    build_index(X[:100], ids[:100]).save(path)
    build_index(X, ids).save(path)
    assert open_index(path).count == 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="refusing to overwrite .*photos.*without index.json"):
        build_index(X, ids).save(foreign)
    assert (foreign / "cat.jpg").read_bytes() == b"x"


def test_open_refuses_missing_corrupt_and_inconsistent(tmp_path, data):
    X, _, ids = data
    with pytest.raises(FileNotFoundError, match="no similarity index directory"):
        open_index(tmp_path / "missing")
    path = build_index(X[:50], ids[:50]).save(tmp_path / "idx")
    meta = json.loads((path / "index.json").read_text())

    (path / "index.json").write_text(json.dumps({**meta, "count": 49}))
    with pytest.raises(IndexFileError, match="inconsistent: FAISS holds 50 vectors .* count=49"):
        open_index(path)
    (path / "index.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexFileError, match="format_version 99"):
        open_index(path)
    (path / "index.json").write_text(json.dumps(meta))
    (path / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(IndexFileError, match="cannot be read by FAISS"):
        open_index(path)
    (path / "index.json").unlink()
    with pytest.raises(IndexFileError, match="index.json is missing"):
        open_index(path)


# ------------------------------------------------------------------ incremental add / remove


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_incremental_add_equals_full_rebuild(tmp_path, data, metric):
    X, Q, ids = data
    full = build_index(X, ids, metric=metric)
    grown = build_index(X[:1000], ids[:1000], metric=metric)
    grown.save(tmp_path / "idx")
    grown = open_index(tmp_path / "idx")
    # overlapping batch: the 500 ids already present are skipped, not duplicated
    assert grown.add(X[500:2000], ids[500:2000]) == 1000
    assert grown.add(X[2000:], ids[2000:]) == 1000
    assert grown.add(X[:10], ids[:10]) == 0
    assert grown.count == 3000
    s_full, i_full = full.search(Q, k=10)
    s_grown, i_grown = grown.search(Q, k=10)
    assert i_grown == i_full
    np.testing.assert_allclose(s_grown, s_full, rtol=1e-5, atol=1e-5)


def test_ivf_add_keeps_trained_lists_and_finds_new_vectors(data):
    X, _, ids = data
    index = build_index(X[:2000], ids[:2000], factory="IVF16,Flat", nprobe=16)
    assert index.add(X[2000:], ids[2000:]) == 1000
    _, found = index.search(X[2500:2510], k=1)
    assert [row[0] for row in found] == ids[2500:2510]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_remove(tmp_path, data, factory):
    X, _, ids = data
    index = build_index(X, ids, factory=factory, nprobe=None)
    if index.nprobe is not None:
        index.nprobe = 16  # exhaustive, so only removal can change the answer
    assert index.remove(ids[:10]) == 10
    assert index.count == 2990 and ids[0] not in index and ids[10] in index
    _, found = index.search(X[:10], k=5)
    assert not {key for row in found for key in row} & set(ids[:10])
    _, found = index.search(X[10:20], k=1)
    assert [row[0] for row in found] == ids[10:20]  # labels of the others still right
    again = open_index(index.save(tmp_path / "idx"))
    assert again.count == 2990 and again.ids == ids[10:]
    assert again.add(X[:10], ids[:10]) == 10  # removed ids can come back
    with pytest.raises(UnknownIdError, match="is not in the index"):
        again.remove(["not-there"])


def test_remove_unsupported_is_a_clear_error(data):
    X, _, ids = data
    index = build_index(X[:200], ids[:200], factory="HNSW16")
    with pytest.raises(ValueError, match="'HNSW16' does not support removal.*rebuild"):
        index.remove(ids[:1])


# ------------------------------------------------------------------ IVF / auto


def test_ivf_recall_against_exact_on_clustered_data():
    X = clustered(20000, 32, 200, seed=3)
    Q = clustered(200, 32, 200, seed=3)[:200] + 0.05
    ids = [str(i) for i in range(len(X))]
    _, exact = exact_knn(X, Q, 10, "cosine")
    index = build_index(X, ids, factory="IVF128,Flat", nprobe=1)

    def recall() -> float:
        _, found = index.search(Q, k=10)
        return np.mean([len(set(f) & {ids[r] for r in e}) / 10 for f, e in zip(found, exact)])

    low = recall()
    index.nprobe = default_nprobe(128)
    assert index.nprobe == 8
    high = recall()
    assert high >= 0.9, high
    assert high > low


def test_auto_factory_choice():
    assert resolve_factory("auto", 1_000) == "Flat"
    assert resolve_factory("auto", 49_999) == "Flat"
    assert resolve_factory("auto", 50_000) == "IVF1024,Flat"  # 4*sqrt(50k) = 894 -> 1024
    assert resolve_factory("auto", 1_000_000) == "IVF4096,Flat"
    assert resolve_factory("IVF256,PQ32", 10) == "IVF256,PQ32"
    assert default_nprobe(4096) == 64 and default_nprobe(1024) == 16 and default_nprobe(4) == 4


def test_ivf_pads_missing_neighbours_with_none(data):
    X, Q, ids = data
    index = build_index(X, ids, factory="IVF64,Flat", nprobe=1)
    scores, found = index.search(Q, k=3000)
    short = [row for row in found if None in row]
    assert short, "nprobe=1 of 64 lists cannot reach all 3000 vectors"
    row = next(i for i, r in enumerate(found) if None in r)
    first_none = found[row].index(None)
    assert all(v is None for v in found[row][first_none:])
    assert np.isnan(scores[row, first_none:]).all() and np.isfinite(scores[row, :first_none]).all()


# ------------------------------------------------------------------ bad input


def test_k_larger_than_count_is_refused_or_clipped(data):
    X, Q, ids = data
    index = build_index(X[:7], ids[:7])
    with pytest.raises(ValueError, match=r"k=20 is larger than the number of indexed vectors \(count=7\); pass k<=7 or clip=True"):
        index.search(Q, k=20)
    scores, found = index.search(Q[:2], k=20, clip=True)
    assert scores.shape == (2, 7) and sorted(found[0]) == sorted(ids[:7])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(Q, k=bad)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_are_refused(data, bad_value):
    X, Q, ids = data
    Xb = X[:20].copy()
    Xb[3, 5] = bad_value
    with pytest.raises(ValueError, match=r"^X has NaN or inf in 1 of 20 rows \(rows 3\); drop or re-embed them "
                                         "before indexing or searching$"):
        build_index(Xb, ids[:20])
    index = build_index(X[:20], ids[:20])
    with pytest.raises(ValueError, match=r"^X has NaN or inf in 1 of 20 rows \(rows 3\)"):
        index.add(Xb, hex_ids(20, "new"))
    with pytest.raises(ValueError, match=r"^Q has NaN or inf in 1 of 20 rows \(rows 3\)"):
        index.search(Xb, k=1)


def test_wrong_dim_and_shape_are_refused(data):
    X, Q, ids = data
    index = build_index(X[:20], ids[:20])
    with pytest.raises(ValueError, match="Q has 16 features but the index holds 32-dimensional vectors"):
        index.search(Q[:, :16], k=1)
    with pytest.raises(ValueError, match="X has 31 features but the index holds 32-dimensional vectors"):
        index.add(X[:5, :31], hex_ids(5, "x"))
    with pytest.raises(ValueError, match=r"Q must be 2-D .* got shape \(32,\)\. Use Q.reshape\(1, -1\)"):
        index.search(Q[0], k=1)
    with pytest.raises(ValueError, match="X is empty: n_samples=0"):
        build_index(np.zeros((0, 4), np.float32), [])
    with pytest.raises(ValueError, match="must hold real numbers; got dtype <U1"):
        build_index(np.array([["a", "b"]]), ["x"])


def test_bad_ids_are_refused(data):
    X, _, ids = data
    with pytest.raises(ValueError, match="ids has 3 entries but X has n_samples=4"):
        build_index(X[:4], ids[:3])
    with pytest.raises(ValueError, match="duplicates"):
        build_index(X[:2], ["a", "a"])
    with pytest.raises(ValueError, match=r"ids\[1\] must be a non-empty string; got ''"):
        build_index(X[:2], ["a", ""])
    with pytest.raises(ValueError, match="not a single str"):
        build_index(X[:2], "ab")


def test_zero_vector_with_cosine_is_refused(data):
    X, _, ids = data
    Xz = X[:5].copy()
    Xz[2] = 0
    with pytest.raises(ValueError, match=r"1 all-zero row\(s\) \(first at row 2\).*metric='l2'"):
        build_index(Xz, ids[:5])
    assert build_index(Xz, ids[:5], metric="l2").count == 5


def test_too_few_vectors_to_train(data):
    X, _, ids = data
    with pytest.raises(ValueError, match=r"'IVF1024,Flat' needs at least 1024 training vectors .* n_samples=100; use factory='Flat'"):
        build_index(X[:100], ids[:100], factory="IVF1024,Flat")
    with pytest.raises(ValueError, match=r"'PQ8' needs at least 256 training vectors but got n_samples=100"):
        build_index(X[:100], ids[:100], factory="PQ8")


def test_bad_factory_metric_and_nprobe(data):
    X, _, ids = data
    with pytest.raises(ValueError, match=rf"^factory 'IVFx,Flat' is not a FAISS factory string FAISS accepts for "
                                         rf"dim={X.shape[1]} \(could not parse index string IVFx,Flat\); examples: "):
        build_index(X[:10], ids[:10], factory="IVFx,Flat")
    with pytest.raises(ValueError, match="must not contain IDMap.*pass 'Flat'"):
        build_index(X[:10], ids[:10], factory="IDMap2,Flat")
    with pytest.raises(ValueError, match=r"metric must be one of \('cosine', 'l2'\); got 'dot'"):
        build_index(X[:10], ids[:10], metric="dot")
    flat = build_index(X[:10], ids[:10])
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes only"):
        flat.nprobe = 4
    with pytest.raises(ValueError, match=r"nprobe must be an integer in \[1, nlist=16\]; got 17"):
        build_index(X, ids, factory="IVF16,Flat", nprobe=17)


def test_other_space_is_refused(data):
    X, Q, ids = data
    index = build_index(X[:100], ids[:100], space="resnet50/layer4/abc")
    assert index.add(X[100:110], ids[100:110], space="resnet50/layer4/abc") == 10
    with pytest.raises(FingerprintMismatchError, match="space 'vit/def'.*built for vector space 'resnet50/layer4/abc'"):
        index.add(X[200:210], ids[200:210], space="vit/def")
    with pytest.raises(FingerprintMismatchError, match="cannot search with vectors of space 'vit/def'"):
        index.search(Q, k=1, space="vit/def")
    assert index.count == 110
    bare = build_index(X[:10], ids[:10])
    with pytest.raises(FingerprintMismatchError, match="built for no vector-space fingerprint"):
        bare.search(Q, k=1, space="vit/def")


def test_repr_and_public_names():
    index = build_index(np.eye(3, dtype=np.float32), ["a", "b", "c"], space="s")
    assert repr(index) == "SimilarityIndex(factory='Flat', metric='cosine', dim=3, count=3, space='s')"
    assert isinstance(index, SimilarityIndex) and "a" in index and "z" not in index


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_pickle_round_trip(data, factory):
    X, Q, ids = data
    index = build_index(X, ids, factory=factory, space="s")
    index.remove(ids[:3])
    again = pickle.loads(pickle.dumps(index))
    assert (again.count, again.nprobe, again.space, again.factory) == (2997, index.nprobe, "s", factory)
    assert again.search(Q, k=5)[1] == index.search(Q, k=5)[1]
    assert again.add(X[:3], ids[:3]) == 3 and index.count == 2997  # independent copies


def test_search_room_never_imports_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, featurebank.search, featurebank.cli.search_cmds; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
