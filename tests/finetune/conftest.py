"""Fixtures of the fine-tuning room: the tiny random-weight EfficientNet and real photo crops."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from featurebank.export.registry import get_backbone
from featurebank.export.weights import build_backbone

TEXTURES = ("grass", "gravel", "brick")


def _preprocess(crop: np.ndarray, spec) -> np.ndarray:
    x = crop.astype(np.float32) / 255.0
    return ((x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1)


@pytest.fixture()
def tiny_backbone() -> torch.nn.Module:
    """timm's test_efficientnet, seeded random weights, eval mode (a fresh copy per test)."""
    return build_backbone(get_backbone("test_efficientnet"), "random", seed=0).model


@pytest.fixture(scope="session")
def texture_crops() -> tuple[np.ndarray, np.ndarray]:
    """(X, y): 8 seeded 64x64 crops from each of three real texture photos (grass, gravel,
    brick), normalised like test_efficientnet expects; X (24, 3, 64, 64) float32, y (24,) int64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data

    spec = get_backbone("test_efficientnet")
    rng = np.random.default_rng(0)
    X, y = [], []
    for label, name in enumerate(TEXTURES):
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        for _ in range(8):
            r, c = rng.integers(0, img.shape[0] - 64), rng.integers(0, img.shape[1] - 64)
            X.append(_preprocess(img[r : r + 64, c : c + 64, :3], spec))
            y.append(label)
    return np.stack(X), np.asarray(y, np.int64)
