"""The data a study works on: labelled vectors of every model output, and the no-transfer
baseline's raw downscaled pixels."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featurebank.embedder.sources import ImageList, list_images

__all__ = ["LabelledVectors", "embed_labelled", "read_pixels", "PIXEL_MODES"]

PIXEL_MODES = ("gray", "rgb")


@dataclass
class LabelledVectors:
    """Vectors of the images that embedded, in source order.

    vectors : output name -> ndarray of shape (n, dim), float32
    labels : ndarray of shape (n,)
    paths, keys : lists of length n (keys: sha256 of the file bytes)
    failed : [(path, reason)] of the images left out
    embed_seconds : wall time of the embedding pass (cached vectors cost only their read)
    """

    vectors: dict[str, np.ndarray]
    labels: np.ndarray
    paths: list[str]
    keys: list[str]
    failed: list[tuple[str, str]]
    embed_seconds: float
    embedded: int
    cached: int


def embed_labelled(images: ImageList, model: str | os.PathLike[str], *, store: Any, decode_mode: str,
                   progress: bool | None, device: str = "auto") -> LabelledVectors:
    """Embed ``images`` once with ``model`` (every output of the graph in the same pass),
    filling and reusing ``store``; images that fail to decode are left out and listed."""
    from featurebank.embed_into_store import embed_images

    emb = embed_images(images, model, store=store, decode_mode=decode_mode, device=device, progress=progress)
    ok = emb.ok
    if not ok.any():
        raise ValueError(f"none of the {len(ok)} images could be embedded; see `featurebank store failures {store}`")
    idx = np.flatnonzero(ok)
    failed = [(p, why) for p, why in emb.report.failures]
    if failed:
        print(f"{len(failed)} of {len(ok)} images failed to decode and are left out "
              f"(first: {failed[0][0]}: {failed[0][1]})", file=sys.stderr)
    return LabelledVectors(
        vectors={name: v[ok] for name, v in emb.vectors.items()},
        labels=np.asarray([emb.labels[i] for i in idx]),
        paths=[emb.paths[i] for i in idx],
        keys=[emb.keys[i] for i in idx],
        failed=failed,
        embed_seconds=emb.report.elapsed,
        embedded=emb.report.embedded,
        cached=emb.report.cached,
    )


def read_pixels(paths: Sequence[str], *, mode: str = "gray", size: int = 32) -> np.ndarray:
    """Raw pixels of each image, the no-transfer baseline: ndarray of shape (n, size*size)
    (``gray``) or (n, size*size*3) (``rgb``), float32, each row standardised to zero mean
    and unit variance.

    Each image is squashed to ``size`` x ``size`` (bilinear with antialiasing). Standardising
    per image uses nothing but the image itself, so it cannot leak across a split; the
    classifiers standardise features on their training rows on top of it.
    """
    from PIL import Image, ImageOps

    if mode not in PIXEL_MODES:
        raise ValueError(f"pixels must be one of {', '.join(PIXEL_MODES)}; got pixels={mode!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 256:
        raise ValueError(f"pixel_size must be an int in [4, 256]; got pixel_size={size!r}")
    rows = np.empty((len(paths), size * size * (3 if mode == "rgb" else 1)), np.float32)
    from featurebank._files import open_image_file

    for i, path in enumerate(paths):
        with open_image_file(path) as fh, Image.open(fh) as im:
            im = ImageOps.exif_transpose(im).convert("L" if mode == "gray" else "RGB")
            rows[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), np.float32).ravel()
    rows -= rows.mean(axis=1, keepdims=True)
    std = rows.std(axis=1, keepdims=True)
    rows /= np.where(std > 0, std, 1.0)  # a flat image stays all-zero
    return rows


def list_labelled(source: Any) -> ImageList:
    return source if isinstance(source, ImageList) else list_images(source)
