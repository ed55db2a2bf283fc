"""ImageEmbedder, the scikit-learn transformer: in pipelines, pickled, with a store, and
giving the same vectors as embed_images by default."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from featurebank.artifact import DEFAULT_DECODE_MODE
from featurebank.classifiers import LinearProbe
from featurebank.embed_into_store import embed_images
from featurebank.errors import ImageDecodeError
from featurebank.image_embedder import ImageEmbedder


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
    # the same store space as embed_images with its defaults: nothing to embed again
    assert embed_images(paths, tiny_model, store=tmp_path / "store", progress=False).report.cached == 4


def test_default_decode_mode_gives_the_vectors_of_embed_images(photo_dir, tiny_model):
    """Issue 12: ImageEmbedder used to decode with "exact" while embed_images, the CLI and the
    service use "fast": the same model gave another vector space. Real photos of 300x451 to
    1000x1000 pixels, where the JPEG decoder's reduced scale makes the two modes differ."""
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    assert ImageEmbedder(tiny_model).get_params()["decode_mode"] == DEFAULT_DECODE_MODE == "fast"
    by_transformer = ImageEmbedder(tiny_model).fit().transform(paths)
    by_embed_images = embed_images(paths, tiny_model, progress=False).X
    np.testing.assert_allclose(by_transformer, by_embed_images, rtol=1e-5, atol=1e-6)
    # the check has teeth: exact decoding gives other vectors for these photos, even at a
    # hundred times the tolerance above (measured: up to 1.8e-4 apart, vectors of norm ~0.03)
    exact = ImageEmbedder(tiny_model, decode_mode="exact").fit().transform(paths)
    assert not np.allclose(exact, by_embed_images, rtol=1e-3, atol=1e-4)


def test_an_image_that_fails_raises_its_decode_error(tmp_path, photo_dir, tiny_model):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photo_dir / "chelsea.jpg").read_bytes()[:5000])  # header whole, pixels cut short
    emb = ImageEmbedder(tiny_model).fit()
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg: truncated or corrupt image data"):
        emb.transform([str(photo_dir / "coffee.jpg"), str(broken)])
    with pytest.raises(ImageDecodeError, match=r"^bytes: not an image: unrecognised content"):
        emb.transform([b"not an image"])
