"""Issue #16 on small data: streaming index build, compressed indexes with exact re-rank from the
store, compaction detection, index format 2 (migration of version 1), memory-mapped search.

Vectors are real: pixel vectors of seeded 24x24 crops of the skimage photos (432-d), stored
float16 in several shards of a real store."""

from __future__ import annotations

import hashlib
import json
import os

import faiss
import numpy as np
import pytest
from PIL import Image

import featurebank.search.index as index_mod
import featurebank.search.indexing as indexing
from featurebank.cli import main
from featurebank.errors import IndexFileError
from featurebank.search import build_index, index_store, open_index
from featurebank.store import open_store

SPACE = hashlib.sha256(b"pixel-crops-12x12").hexdigest()


def crop_vectors(photos, n: int, seed: int = 0, side: int = 12) -> np.ndarray:
    """n seeded 24x24 crops of the real photos, downscaled to side x side RGB, mean-centred."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = np.empty((n, side * side * 3), np.float32)
    i = 0
    while i < n:
        img = photos[names[rng.integers(len(names))]]
        y, x = rng.integers(0, img.shape[0] - 24), rng.integers(0, img.shape[1] - 24)
        v = np.asarray(Image.fromarray(img[y : y + 24, x : x + 24]).resize((side, side), Image.BILINEAR), np.float32).ravel()
        if v.std() > 4:  # flat patches (sky, background) have no direction to compare
            out[i] = v - v.mean()
            i += 1
    return out


@pytest.fixture(scope="module")
def crops(photos):
    return crop_vectors(photos, 4000)


def fill_store(root, X, n_shards: int = 4, dup: bool = True):
    keys = np.array([hashlib.sha256(f"crop-{i}".encode()).hexdigest() for i in range(len(X))])
    with open_store(root) as store:
        space = store.space(SPACE, dim=X.shape[1], dtype="float16")
        for part in np.array_split(np.arange(len(X)), n_shards):
            space.add(keys[part], X[part])
        if dup:  # the same images embedded again by a second writer: must be indexed once
            space.add(keys[:5], X[:5])
    return keys


def exact_neighbours(X16, Q, k):
    """Exact cosine top-k over the float16-stored vectors (what the store serves)."""
    Xn = X16 / np.linalg.norm(X16, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    return np.argsort(-(Qn @ Xn.T), axis=1, kind="stable")[:, :k]


def test_streaming_flat_build_returns_exactly_the_in_memory_build(tmp_path, crops, monkeypatch):
    X = crops[:1500]
    keys = fill_store(tmp_path / "store", X)
    monkeypatch.setattr(indexing, "CHUNK", 97)  # many chunks, across shard borders
    index, n_added = index_store(tmp_path / "store", SPACE, tmp_path / "idx", factory="Flat")
    assert n_added == index.count == 1500 and index.rerank == 0
    stored = X.astype(np.float16).astype(np.float32)
    reference = build_index(stored, list(keys), factory="Flat", space=SPACE)
    Q = stored[::50]
    s1, i1 = open_index(tmp_path / "idx").search(Q, 10)
    s2, i2 = reference.search(Q, 10)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-5)


def test_auto_picks_a_compressed_index_whose_reranked_recall_matches_exact_search(tmp_path, photos, monkeypatch):
    crops = crop_vectors(photos, 2500, seed=1, side=8)  # 192-d: PQ24 codebooks train fast
    keys = fill_store(tmp_path / "store", crops)
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX", 1000)
    monkeypatch.setattr(index_mod, "AUTO_COMPRESS_MIN", 1000)
    index, _ = index_store(tmp_path / "store", SPACE, tmp_path / "idx", factory="auto", max_memory="4GB")
    # 24 bytes a vector as 48 4-bit fast-scan codes after an OPQ rotation, re-ranked x30
    assert index.factory == "OPQ48,IVF128,PQ48x4fs" and index.rerank == indexing.RERANK_FAST_SCAN == 30
    # 24 code bytes + 8 id bytes per vector (lists padded to blocks of 32 codes), plus the
    # rotation, the 4-bit codebooks and the IVF centroids (fixed)
    fixed = 192 * 192 * 4 + 48 * 16 * 4 * 4 + 128 * 192 * 4
    assert 2500 * (24 + 8) + fixed <= index.nbytes <= (2500 + 128 * 31) * (24 + 8) + fixed + 4096, index.nbytes
    stored = crops.astype(np.float16).astype(np.float32)
    Q = stored[::20]
    truth = exact_neighbours(stored, Q, 10)
    key_row = {k: i for i, k in enumerate(keys)}

    def recall(idx):
        _, found = idx.search(Q, 10)
        return np.mean([len({key_row[k] for k in row} & set(t)) / 10 for row, t in zip(found, truth)])

    reopened = open_index(tmp_path / "idx")
    with_rerank = recall(reopened)
    reopened.rerank = 0
    without = recall(reopened)
    assert with_rerank >= 0.95 and with_rerank > without + 0.1, (with_rerank, without)


def test_compaction_after_the_build_is_detected_and_remapped_and_lost_rows_refused(tmp_path, crops, monkeypatch):
    fill_store(tmp_path / "store", crops[:1200], n_shards=6)
    index, _ = index_store(tmp_path / "store", SPACE, tmp_path / "idx", factory="IVF16,SQ8", rerank=5)
    Q = crops[:30]
    # the re-rank reads candidates at the rows recorded at the build, with no key lookup (a
    # listing of the shard folder per opened index checks that the shards are those of the build)
    rows = np.load(tmp_path / "idx" / "store_rows.npy")
    with open_store(tmp_path / "store") as store:
        keys = store.space(SPACE).key_array()
    assert rows.dtype == np.int32 and (keys[rows] == open_index(tmp_path / "idx")._labels).all()
    looked_up = []
    real_get = index_mod.SimilarityIndex._store_vectors
    monkeypatch.setattr(index_mod.SimilarityIndex, "_store_vectors",
                        lambda self, space, k: looked_up.append(len(k)) or real_get(self, space, k))
    before = open_index(tmp_path / "idx").search(Q, 5)
    assert looked_up == []
    monkeypatch.undo()
    by_key = open_index(tmp_path / "idx")
    by_key.store_rows = None
    assert by_key.search(Q, 5)[1] == before[1]
    with open_store(tmp_path / "store") as store:
        (report,) = store.compact(SPACE)["spaces"]
    assert report["shards_merged"] == 7 and report["rows_dropped"] == 5  # rows moved to a new shard
    after_index = open_index(tmp_path / "idx")
    after = after_index.search(Q, 5)
    assert after_index.store_changed and after[1] == before[1]
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    with open_store(tmp_path / "store") as store:
        (shard,) = store.space(SPACE).shards()
    os.unlink(shard)  # rows gone for good (a shard lost or quarantined whole)
    with pytest.raises(IndexFileError, match=r"no longer in the store .* featurebank index build .* --rebuild"):
        open_index(tmp_path / "idx").search(Q, 5)


def test_index_format_1_is_migrated_and_a_newer_format_refused(tmp_path, crops):
    keys = [hashlib.sha256(f"v{i}".encode()).hexdigest() for i in range(300)]
    build_index(crops[:300], keys, factory="Flat").save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format_version"] == 2 and (tmp_path / "idx" / "ids_order.npy").is_file()
    # what featurebank wrote before: no ids_order.npy, format_version 1
    (tmp_path / "idx" / "ids_order.npy").unlink()
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**meta, "format_version": 1}))
    old = open_index(tmp_path / "idx")
    assert keys[7] in old and "f" * 64 not in old
    assert old.search_by_id([keys[7]], 1)[1] == [[keys[7]]]
    old.save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["format_version"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / "ids_order.npy"), np.argsort(np.array([k.encode() for k in keys])))
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(IndexFileError, match="format_version 3; this featurebank .* reads versions 1 to 2; rebuild"):
        open_index(tmp_path / "idx")


def test_search_answers_from_a_memory_mapped_index_which_refuses_changes(tmp_path, crops):
    keys = fill_store(tmp_path / "store", crops[:2000], dup=False)
    index_store(tmp_path / "store", SPACE, tmp_path / "idx", factory="IVF32,Flat")
    plain, mapped = open_index(tmp_path / "idx"), open_index(tmp_path / "idx", mmap=True)
    assert isinstance(mapped._labels, np.memmap)
    (s1, i1), (s2, i2) = mapped.search(crops[:20], 10), plain.search(crops[:20], 10)
    assert i1 == i2
    np.testing.assert_array_equal(s1, s2)
    with pytest.raises(ValueError, match="opened memory-mapped"):
        mapped.remove([str(keys[0])])


def test_cli_index_build_reports_bytes_per_vector_and_search_uses_the_index(tmp_path, crops, capsys, monkeypatch):
    keys = fill_store(tmp_path / "store", crops[:3000], dup=False)
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX", 1000)
    assert main(["index", "build", "--store", str(tmp_path / "store"), "--space", SPACE, "--index",
                 str(tmp_path / "idx"), "--max-memory", "3MB"]) == 0
    out = capsys.readouterr().out
    # 3000 x 1736 float32 bytes (5.2 MB) exceed 3 MiB; SQ8 codes (1.3 MB) fit in half of it
    assert "IVF128,SQ8" in out and "re-rank x10 from the store" in out and "index bytes/vector" in out
    assert main(["search", "--index", str(tmp_path / "idx"), "--id", str(keys[11]), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["neighbours"]
    assert hits[0]["id"] == str(keys[11]) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="do not fit in max_memory"):
        index_mod.resolve_factory("auto", 10_000_000, dim=512, max_memory="50MB")
    # 10M x 512 in 4 GB: 64-byte fast-scan codes, HNSW coarse quantizer; 8-bit PQ where 4-bit
    # sub-quantizers of the same bytes do not divide the dimension
    assert index_mod.resolve_factory("auto", 10_000_000, dim=512) == "OPQ128,IVF8192_HNSW32,PQ128x4fs"
    assert index_mod.resolve_factory("auto", 2_000_000, dim=99) == "IVF2048,PQ11"
    assert indexing.default_rerank("IVF2048,PQ11") == 10 and indexing.default_rerank("IVF64,Flat") == 0


def test_an_hnsw_coarse_quantizer_searches_at_least_nprobe_wide(tmp_path, crops):
    # FAISS's default efSearch (16) returns a poor set of nprobe lists once nprobe exceeds it
    # (10M x 512: 84% of the right 128); the index raises it after the build and on open
    fill_store(tmp_path / "store", crops[:3000], dup=False)
    index, _ = index_store(tmp_path / "store", SPACE, tmp_path / "idx", factory="IVF64_HNSW32,SQ8", nprobe=48)

    def ef(idx):
        return faiss.downcast_index(faiss.extract_index_ivf(idx._index).quantizer).hnsw.efSearch

    assert ef(index) == index_mod.QUANTIZER_EF_SEARCH == 128
    for mmap in (False, True):
        opened = open_index(tmp_path / "idx", mmap=mmap)
        assert opened.nprobe == 48 and ef(opened) == 128
        opened.nprobe = 64
        assert ef(opened) == 128
