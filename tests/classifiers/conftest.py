"""Seeded embedding-like data for the classifier tests."""

from __future__ import annotations

import numpy as np
import pytest


def make_vectors(n_per_class=(20, 20, 20), n_features=16, seed=0, spread=0.6):
    """Gaussian classes around distinct unit directions: (X float32, y str)."""
    rng = np.random.default_rng(seed)
    names = np.array(["brick", "grass", "gravel", "sand", "wood"])[: len(n_per_class)]
    centers = rng.standard_normal((len(n_per_class), n_features))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    X = np.concatenate([c + spread * rng.standard_normal((n, n_features)) / np.sqrt(n_features)
                        for c, n in zip(centers, n_per_class)]).astype(np.float32)
    y = np.repeat(names, n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


@pytest.fixture
def vectors():
    return make_vectors()


@pytest.fixture(name="make_vectors")
def make_vectors_fixture():
    return make_vectors
