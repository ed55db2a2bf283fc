"""embed_images end to end: real image files, a real onnxruntime session, a real store."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank.artifact import read_model_card, space_fingerprint
from featurebank.embed_into_store import embed_images, load_embeddings
from featurebank.store import open_store

from corpus import build_corpus

REPO = Path(__file__).resolve().parents[2]


def test_embed_then_everything_is_cached(tmp_path, texture_dir, tiny_model):
    store = tmp_path / "store"
    first = embed_images(texture_dir, tiny_model, store=store, progress=False)
    r = first.report
    assert (r.total, r.embedded, r.cached, r.failed) == (30, 30, 0, 0)
    assert first.ok.all() and first.X.shape == (30, read_model_card(tiny_model).dim)
    assert sorted(set(first.labels)) == ["brick", "grass", "gravel"]
    again = embed_images(texture_dir, tiny_model, store=store, progress=False)
    assert (again.report.embedded, again.report.cached) == (0, 30)
    np.testing.assert_array_equal(again.X, first.X)
    # the vectors equal a direct, store-less computation
    direct = embed_images(texture_dir, tiny_model, progress=False)
    np.testing.assert_allclose(direct.X, first.X, rtol=1e-6, atol=1e-6)


def test_new_images_cost_only_what_is_new_and_copies_are_free(tmp_path, texture_dir, tiny_model):
    src = tmp_path / "src"
    shutil.copytree(texture_dir, src)
    store = tmp_path / "store"
    embed_images(src, tiny_model, store=store, progress=False)
    shutil.copy(src / "grass" / "00.jpg", src / "grass" / "copy-of-00.jpg")  # same bytes, new path
    Image.open(src / "brick" / "01.jpg").rotate(90).save(src / "brick" / "new.jpg", quality=90)
    r = embed_images(src, tiny_model, store=store, progress=False)
    assert (r.report.total, r.report.embedded, r.report.cached, r.report.duplicates) == (32, 1, 30, 1)
    i, j = r.paths.index(str(src / "grass" / "00.jpg")), r.paths.index(str(src / "grass" / "copy-of-00.jpg"))
    assert r.keys[i] == r.keys[j]
    np.testing.assert_array_equal(r.X[i], r.X[j])


def test_decode_mode_and_model_are_separate_spaces(tmp_path, texture_dir, tiny_model):
    store = tmp_path / "store"
    fast = embed_images(texture_dir, tiny_model, store=store, decode_mode="fast", progress=False)
    exact = embed_images(texture_dir, tiny_model, store=store, decode_mode="exact", progress=False)
    assert exact.report.embedded == 30  # nothing reused across decode modes
    out_fp = read_model_card(tiny_model).output().fingerprint
    spaces = {s.fingerprint for s in open_store(store).spaces()}
    assert spaces == {space_fingerprint(out_fp, "fast"), space_fingerprint(out_fp, "exact")}
    assert fast.X.shape == exact.X.shape


def test_broken_and_odd_files_are_recorded_and_the_run_completes(tmp_path, tiny_model):
    corpus = tmp_path / "corpus"
    expected = build_corpus(corpus)
    assert len(expected) >= 15
    store = tmp_path / "store"
    emb = embed_images(corpus, tiny_model, store=store, progress=False, decode_mode="exact")
    listed = {n: e for n, e in expected.items() if e.listed}
    by_name = {os.path.relpath(p, corpus): ok for p, ok in zip(emb.paths, emb.ok)}
    assert set(by_name) == set(listed)
    reasons = {os.path.relpath(p, corpus): why for p, why in emb.report.failures}
    for name, e in listed.items():
        if e.outcome == "ok":
            assert by_name[name], f"{name} should embed: {reasons.get(name)}"
        else:
            assert not by_name[name] and name in reasons, name
            unreadable = emb.keys[emb.paths.index(str(corpus / name))] == ""
            if unreadable:  # refused when its bytes were read for hashing (the OS's or open_image_file's words)
                assert re.search(r"symbolic links|directory|Permission|No such|file is empty \(0 bytes\)",
                                 reasons[name]), reasons[name]
            elif e.match:
                assert re.search(e.match, reasons[name]), (name, reasons[name])
    assert np.isfinite(emb.X).all()
    # the failures are in the store, and are not retried unless asked
    fails = {os.path.relpath(f.path, corpus) for f in open_store(store).failures()}
    assert fails == set(reasons)
    again = embed_images(corpus, tiny_model, store=store, progress=False, decode_mode="exact")
    assert again.report.embedded == 0 and again.report.skipped_failed == len({n for n in reasons if emb.keys[emb.paths.index(str(corpus / n))]})
    retried = embed_images(corpus, tiny_model, store=store, progress=False, decode_mode="exact", retry_failed=True)
    assert retried.report.failed == len(reasons) and retried.report.embedded == 0


def test_multi_output_model_caches_each_layer(tmp_path, texture_dir):
    from featurebank.export.onnx_export import export_backbone

    card = export_backbone("test_efficientnet", tmp_path / "m.onnx", layers=["blocks.2", "features"], weights="random",
                           input_format="uint8")
    single = export_backbone("test_efficientnet", tmp_path / "s.onnx", layers=["features"], weights="random",
                             input_format="uint8")
    store = tmp_path / "store"
    multi = embed_images(texture_dir, tmp_path / "m.onnx", store=store, progress=False)
    assert {n: v.shape[1] for n, v in multi.vectors.items()} == {o.name: o.dim for o in card.outputs}
    # a single-layer export of the same layer reads the same cached vectors
    X, keys, labels, paths = load_embeddings(texture_dir, tmp_path / "s.onnx", store, progress=False)
    assert single.output().fingerprint == card.output("features").fingerprint
    np.testing.assert_array_equal(X, multi.vectors["embedding:features"])


def _embed_cmd(source, model, store, *extra):
    return [sys.executable, "-m", "featurebank", "embed", str(source), "--model", str(model), "--store", str(store),
            "--no-progress", "--batch-size", "4", "--workers", "1", *extra]


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, photos):
    """60 distinct real-photo JPEGs (seeded crops), camera-ish sizes."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    names = sorted(photos)
    for i in range(60):
        img = photos[names[i % len(names)]]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        Image.fromarray(img[y : y + ch, x : x + cw]).save(root / f"{i:03d}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_redoes_only_unfinished_work(tmp_path, many_photos, tiny_model):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_embed_cmd(many_photos, tiny_model, store), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    # kill once some shards are committed, in the middle of the run
    deadline = time.time() + 120
    while time.time() < deadline:
        shards = list(store.glob("spaces/*/shards/*.arrow"))
        if len(shards) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(open_store(store).spaces()[0]) if open_store(store).spaces() else 0
    assert 0 < committed < 60, "the kill should land mid-run"
    assert open_store(store).verify().ok
    out = subprocess.run(_embed_cmd(many_photos, tiny_model, store, "--json"), env=env, capture_output=True, text=True,
                         check=True)
    import json

    report = json.loads(out.stdout)
    assert report["cached"] == committed and report["embedded"] == 60 - committed and report["failed"] == 0
    st = open_store(store)
    assert st.verify().ok and len(st.spaces()[0]) == 60
    clean = embed_images(many_photos, tiny_model, progress=False)
    resumed = embed_images(many_photos, tiny_model, store=store, progress=False)
    np.testing.assert_allclose(resumed.X, clean.X, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_embedding_into_one_store(tmp_path, many_photos, tiny_model):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(_embed_cmd(many_photos, tiny_model, store), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    st = open_store(store)
    assert st.verify().ok
    (space,) = st.spaces()
    assert len(space) == 60
    clean = embed_images(many_photos, tiny_model, progress=False)
    got = embed_images(many_photos, tiny_model, store=store, progress=False)
    assert got.report.embedded == 0
    np.testing.assert_allclose(got.X, clean.X, rtol=1e-5, atol=1e-6)


def test_a_space_that_already_holds_a_key_does_not_get_it_twice(tmp_path, texture_dir):
    from featurebank.export.onnx_export import export_backbone

    export_backbone("test_efficientnet", tmp_path / "s.onnx", layers=["features"], weights="random", input_format="uint8")
    export_backbone("test_efficientnet", tmp_path / "m.onnx", layers=["blocks.2", "features"], weights="random",
                    input_format="uint8")
    store = tmp_path / "store"
    embed_images(texture_dir, tmp_path / "s.onnx", store=store, progress=False)
    multi = embed_images(texture_dir, tmp_path / "m.onnx", store=store, progress=False)
    assert multi.report.embedded == 30  # blocks.2 was missing everywhere
    report = open_store(store).verify()
    assert report.ok and report.n_rows == report.n_vectors == 60  # 30 per space, no duplicate rows


def _overwrite_8_bytes_of_a_vector(shard: Path) -> list[str]:
    """Overwrite 8 bytes inside the first stored vector of ``shard``; return the shard's keys."""
    import pyarrow.feather as feather

    t = feather.read_table(shard)
    first = np.asarray(t["vector"][0].values, np.float32).tobytes()
    data = bytearray(shard.read_bytes())
    at = bytes(data).index(first) + 16
    data[at : at + 8] = np.array([9.5e14, 9.5e14], np.float32).tobytes()
    shard.write_bytes(bytes(data))
    return t["key"].to_pylist()


def test_damaged_cached_vectors_are_embedded_again_and_training_loads_refuse(tmp_path, texture_dir, tiny_model):
    from featurebank.errors import StoreError
    from featurebank.workflow import train_classifier

    store = tmp_path / "store"
    clean = embed_images(texture_dir, tiny_model, store=store, batch_size=8, progress=False)
    (space,) = open_store(store).spaces()
    shard = space.shards()[1]
    damaged_keys = _overwrite_8_bytes_of_a_vector(shard)
    assert len(damaged_keys) == 8 and not open_store(store).verify().ok
    hint = rf"{shard} \(record batch 0\): vectors do not match their checksum.*store verify {store} --quarantine"

    # loads for training read the store as it is: they refuse, naming the shard
    with pytest.raises(StoreError, match=hint):
        load_embeddings(texture_dir, tiny_model, store, progress=False)
    with pytest.raises(StoreError, match=hint):
        train_classifier(texture_dir, tiny_model, tmp_path / "clf.skops", store=store, progress=False)
    assert shard.exists()

    # embed treats the damaged rows as missing: the shard goes to quarantine, its images are embedded again
    again = embed_images(texture_dir, tiny_model, store=store, batch_size=8, progress=False)
    r = again.report
    assert (r.embedded, r.cached, r.damaged, r.failed) == (8, 22, 8, 0)
    assert r.quarantined == [str(store / "quarantine" / space.fingerprint / shard.name)] and not shard.exists()
    assert "8 cached vectors failed their checksum and were embedded again" in r.summary()
    assert again.ok.all()
    np.testing.assert_allclose(again.X, clean.X, rtol=1e-6, atol=1e-6)
    st = open_store(store)
    assert st.verify().ok
    X, found = st.spaces()[0].get(damaged_keys)
    assert found.all()
    np.testing.assert_allclose(X, clean.X[[clean.keys.index(k) for k in damaged_keys]], rtol=1e-6, atol=1e-6)
    third = embed_images(texture_dir, tiny_model, store=store, progress=False)
    assert (third.report.embedded, third.report.cached, third.report.damaged) == (0, 30, 0)
    Xl, *_ = load_embeddings(texture_dir, tiny_model, store, progress=False)
    np.testing.assert_array_equal(Xl, third.X)


def test_fp16_storage_halves_the_shards_and_loads_float32(tmp_path, texture_dir, tiny_model):
    a = embed_images(texture_dir, tiny_model, store=tmp_path / "s32", progress=False)
    b = embed_images(texture_dir, tiny_model, store=tmp_path / "s16", progress=False, store_dtype="float16")
    assert b.X.dtype == np.float32
    np.testing.assert_allclose(b.X, a.X, rtol=2e-3, atol=2e-3)
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.arrow"))  # noqa: E731
    assert size(tmp_path / "s16") < 0.7 * size(tmp_path / "s32")
