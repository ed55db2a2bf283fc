"""ImageEmbedder in scikit-learn pipelines; provider policy; doctor; fp16 storage."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from featurebank.classifiers import LinearProbe
from featurebank.embedder.doctor import run_doctor
from featurebank.embedder.pipeline import embed_images
from featurebank.embedder.session import cuda_status, open_model
from featurebank.embedder.transformer import ImageEmbedder
from featurebank.errors import NotOnnxModelError, ProviderError


def test_image_embedder_in_a_pipeline_takes_paths_pil_and_arrays(texture_dir, tiny_model):
    paths = sorted(str(p) for p in texture_dir.rglob("*.jpg"))
    y = [p.split("/")[-2] for p in paths]
    pipe = make_pipeline(ImageEmbedder(tiny_model), LinearProbe(cv=3))
    scores = cross_val_score(pipe, paths, y, cv=3)
    # measured 0.7, 0.7, 0.8 (ten images per fold, chance 1/3, the tiny random-weight model):
    # the floor leaves one image per fold of margin
    assert scores.shape == (3,) and scores.min() >= 0.6, scores
    emb = ImageEmbedder(tiny_model).fit()
    from_paths = emb.transform(paths[:3])
    pil = [Image.open(p) for p in paths[:3]]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    np.testing.assert_allclose(emb.transform(pil), from_paths, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.transform(arrays), from_paths, rtol=1e-5, atol=1e-6)
    assert from_paths.shape == (3, emb.n_features_out_) and from_paths.dtype == np.float32


def test_image_embedder_pickles_without_its_session_and_uses_a_store(tmp_path, texture_dir, tiny_model):
    emb = ImageEmbedder(tiny_model, store=str(tmp_path / "store")).fit()
    paths = sorted(str(p) for p in texture_dir.rglob("*.jpg"))[:4]
    first = emb.transform(paths)
    assert hasattr(emb, "_runner_")
    clone = pickle.loads(pickle.dumps(emb))
    assert not hasattr(clone, "_runner_")  # the session is not pickled; it reopens lazily
    np.testing.assert_array_equal(clone.transform(paths), first)
    assert embed_images(paths, tiny_model, store=tmp_path / "store", decode_mode="exact", progress=False).report.cached == 4


def test_cuda_requested_but_not_running_is_an_error(tiny_model):
    usable, reason = cuda_status()
    if usable:
        pytest.skip("CUDA runs here")
    with pytest.raises(ProviderError, match="--device cuda asked for, but CUDA cannot run here"):
        open_model(tiny_model, device="cuda")
    assert open_model(tiny_model, device="auto").provider == "CPUExecutionProvider"


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(NotOnnxModelError, match="onnxruntime cannot load"):
        open_model(bad)


def test_doctor_runs_a_tiny_inference_per_provider():
    report = run_doctor()
    assert report["ok"] and report["providers"]["CPUExecutionProvider"]["ok"]
    assert "onnxruntime-gpu" in report["distributions"] and "onnxruntime" not in report["distributions"]
    assert "embedding will run on" in report["text"]


def test_fp16_storage_halves_the_shards_and_loads_float32(tmp_path, texture_dir, tiny_model):
    a = embed_images(texture_dir, tiny_model, store=tmp_path / "s32", progress=False)
    b = embed_images(texture_dir, tiny_model, store=tmp_path / "s16", progress=False, store_dtype="float16")
    assert b.X.dtype == np.float32
    np.testing.assert_allclose(b.X, a.X, rtol=2e-3, atol=2e-3)
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.arrow"))  # noqa: E731
    assert size(tmp_path / "s16") < 0.7 * size(tmp_path / "s32")
