"""Search fixtures: vectors derived from REAL photos (see search_data.py)."""

from __future__ import annotations

import numpy as np
import pytest
from search_data import pixel_vector, reencode_jpeg, resize


@pytest.fixture(scope="session")
def photo_vectors(photos):
    """Vectors of the real photos plus, for the first five, a JPEG-q40 re-encode and a
    half-size copy. Returns (X float32 (n, 1728), ids, expected duplicate groups).
    The stereo motorcycle pair stays without copies: similar scenes, not duplicates."""
    X, ids, groups = [], [], []
    names = sorted(photos)
    copied = [n for n in names if not n.startswith("motorcycle")][:5]
    for name in names:
        img = photos[name]
        X.append(pixel_vector(img))
        ids.append(f"{name}.jpg")
        if name in copied:
            X.append(pixel_vector(reencode_jpeg(img, 40)))
            ids.append(f"{name}_q40.jpg")
            X.append(pixel_vector(resize(img, 0.5)))
            ids.append(f"{name}_half.jpg")
            groups.append(sorted([f"{name}.jpg", f"{name}_q40.jpg", f"{name}_half.jpg"]))
    return np.stack(X).astype(np.float32), ids, sorted(groups)
