"""Curation fixtures: a small labelled set of real texture crops (scikit-image) with known
faults: two labels flipped on purpose, a photo of another kind (the astronaut) dropped into a
class, and a test set holding an exact copy of one training image."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass
class Faulty:
    train: Path
    test: Path
    flipped: set  # paths whose folder (label) is wrong
    intruder: Path  # a photo of another kind in class gravel
    original: Path  # the training image copied into the test set
    copy: Path


@pytest.fixture(scope="session")
def faulty(tmp_path_factory) -> Faulty:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data
    root = tmp_path_factory.mktemp("faulty")
    rng = np.random.default_rng(0)
    for name in ("grass", "gravel", "brick"):
        img = getattr(data, name)()
        (root / "train" / name).mkdir(parents=True)
        for i in range(16):
            y, x = rng.integers(0, img.shape[0] - 128), rng.integers(0, img.shape[1] - 128)
            Image.fromarray(img[y : y + 128, x : x + 128]).convert("RGB").save(
                root / "train" / name / f"{name}{i:02d}.jpg", quality=90)
    # two labels flipped on purpose: a grass crop filed as brick, a gravel crop filed as grass
    shutil.move(root / "train/grass/grass00.jpg", root / "train/brick/grass00.jpg")
    shutil.move(root / "train/gravel/gravel00.jpg", root / "train/grass/gravel00.jpg")
    intruder = root / "train/gravel/astronaut.jpg"
    Image.fromarray(data.astronaut()).resize((128, 128)).save(intruder, quality=90)
    (root / "test/brick").mkdir(parents=True)
    shutil.copy(root / "train/brick/brick05.jpg", root / "test/brick/copy.jpg")
    return Faulty(root / "train", root / "test", {str(root / "train/brick/grass00.jpg"),
                                                   str(root / "train/grass/gravel00.jpg")},
                  intruder, root / "train/brick/brick05.jpg", root / "test/brick/copy.jpg")
