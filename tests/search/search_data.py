"""Data helpers for the search tests: real-photo vectors and seeded clustered vectors."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image


def pixel_vector(img: np.ndarray, side: int = 24) -> np.ndarray:
    """A crude real-image embedding: the photo downscaled to side x side RGB, mean-centred.
    (Centring makes cosine the pixel correlation, so unrelated photos stop looking alike.)"""
    v = np.asarray(Image.fromarray(img).convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    return v - v.mean()


def reencode_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def resize(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).convert("RGB").resize((int(w * factor), int(h * factor)), Image.LANCZOS))


def clustered(n: int, dim: int, n_clusters: int, seed: int, spread: float = 0.3) -> np.ndarray:
    """Seeded Gaussian clusters: centres ~ N(0, 1), points = centre + spread * N(0, 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    labels = rng.integers(0, n_clusters, size=n)
    return (centres[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def hex_ids(n: int, prefix: str = "") -> list[str]:
    """Store-like 64-hex ids (sha256 of the row number)."""
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]
