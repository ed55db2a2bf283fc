"""Shared fixtures: real photos from scikit-image, written as real image files.

Everything is seeded and offline. Rooms add their own fixtures in tests/<room>/conftest.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
TEXTURE_NAMES = ("grass", "gravel", "brick")


def _skimage_data():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data

    return skimage.data


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 RGB real photo."""
    data = _skimage_data()
    out = {name: np.ascontiguousarray(getattr(data, name)()[..., :3]) for name in PHOTO_NAMES}
    left, right, _ = data.stereo_motorcycle()
    out["motorcycle_left"], out["motorcycle_right"] = left, right
    return out


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """A flat folder of the real photos as JPEG files (quality 92)."""
    root = tmp_path_factory.mktemp("photos")
    for name, arr in photos.items():
        Image.fromarray(arr).save(root / f"{name}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def texture_dir(tmp_path_factory) -> Path:
    """ImageFolder layout: one class per real texture photo (grass, gravel, brick), 10 seeded
    160x160 crops each, saved as JPEG. A small real classification task."""
    data = _skimage_data()
    root = tmp_path_factory.mktemp("textures")
    rng = np.random.default_rng(0)
    for name in TEXTURE_NAMES:
        img = getattr(data, name)()
        (root / name).mkdir()
        for i in range(10):
            y, x = rng.integers(0, img.shape[0] - 160), rng.integers(0, img.shape[1] - 160)
            Image.fromarray(img[y : y + 160, x : x + 160]).convert("RGB").save(root / name / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def lfw_dir(tmp_path_factory) -> Path:
    """ImageFolder layout of scikit-image's lfw_subset: 100 faces and 100 non-faces,
    25x25 grayscale PNGs (a real labelled set)."""
    data = _skimage_data()
    faces = data.lfw_subset()
    root = tmp_path_factory.mktemp("lfw")
    for label, sl in (("face", slice(0, 100)), ("nonface", slice(100, 200))):
        (root / label).mkdir()
        for i, img in enumerate(faces[sl]):
            Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A real featurebank ONNX export of timm's tiny random-weight EfficientNet (uint8 input)."""
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    export_backbone("test_efficientnet", path, weights="random", input_format="uint8")
    return path


@pytest.fixture(scope="session")
def lite0_model(tmp_path_factory) -> Path:
    """The embedded default: efficientnet_lite0 with its real ImageNet weights, uint8 input."""
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("models") / "lite0.onnx"
    export_backbone("efficientnet_lite0", path, input_format="uint8")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches: one torch and one BLAS thread are faster than two on a shared 2-core machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(before)
