"""Augmented views for fine-tuning on cached activations.

The frozen bottom of the network never changes, so an augmented image costs one forward
through it *once*, like a plain one: each training image gets a fixed number of augmented
**views**, each embedded once and cached (in a store, each view is a space of its own: all
views share the file's content key), and each epoch trains every image on one of its views
drawn at random (view 0 is the plain image, as the embedder preprocesses it).

A view is a function of the file's *content* (its store key), the recipe and the view
index only, never of the path, the seed or the run: the same bytes give the same view
wherever they are, so the cache stays valid across runs and folders.

The ``light`` recipe is the lighter half of timm's / torchvision's training transform:
``RandomResizedCrop`` with scale (0.35, 1) and aspect ratio (3/4, 4/3) taken from the
square the evaluation transform crops from (the shorter side resized to
``input / crop_pct``), resized to the input size (bicubic), and a horizontal flip with
probability 1/2. No colour jitter: it moves features of pretrained networks more than it
teaches them on small sets.

>>> pixels = augmented_view("cat.jpg", pre, key, view=2, recipe=recipe("light"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping

import numpy as np

from featurebank.errors import FineTuneError

__all__ = ["AUGMENTS", "DEFAULT_VIEWS", "recipe", "view_params", "augmented_view"]

#: Augmentation recipes ``finetune --augment`` accepts.
AUGMENTS = ("none", "light")
#: Augmented views per training image for ``--augment light`` (``--views``).
DEFAULT_VIEWS = 4

_RECIPES: dict[str, dict[str, Any]] = {
    "light": {"name": "light", "version": 1, "crop": "random_resized", "scale": [0.35, 1.0],
              "ratio": [0.75, 4 / 3], "hflip": 0.5, "interpolation": "bicubic"},
}


def recipe(name: str) -> dict[str, Any] | None:
    """The recipe called ``name`` as a JSON-able dict (recorded in model cards, checkpoints and
    view spaces), or None for ``"none"``."""
    if name not in AUGMENTS:
        raise FineTuneError(f"augment must be one of {', '.join(AUGMENTS)}; got {name!r}")
    return None if name == "none" else dict(_RECIPES[name])


def view_params(key: str, view: int, rec: Mapping[str, Any]) -> tuple[float, float, float, float, bool]:
    """The crop box ``(left, top, width, height)`` as fractions of the source square, and the
    flip, of view ``view`` (>= 1) of the file whose content key is ``key``: drawn from a
    generator seeded by (key, recipe, view), so they depend on nothing else."""
    if not isinstance(view, int) or isinstance(view, bool) or view < 1:
        raise FineTuneError(f"augmented views are numbered from 1 (0 is the plain image); got {view!r}")
    blob = json.dumps({"key": key, "recipe": dict(rec), "view": view}, sort_keys=True).encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little"))
    lo, hi = rec["scale"]
    log_r = (math.log(rec["ratio"][0]), math.log(rec["ratio"][1]))
    for _ in range(10):  # torchvision's RandomResizedCrop: ten tries, then the whole square
        area = rng.uniform(lo, hi)
        ratio = math.exp(rng.uniform(*log_r))
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if w <= 1 and h <= 1:
            left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            break
    else:
        left, top, w, h = 0.0, 0.0, 1.0, 1.0
    flip = bool(rng.uniform() < rec["hflip"])
    return float(left), float(top), float(w), float(h), flip


def augmented_view(src: Any, pre: Any, key: str, view: int, rec: Mapping[str, Any], *, mode: str = "fast",
                   max_pixels: int | None = None) -> np.ndarray:
    """View ``view`` (>= 1) of one image under recipe ``rec``: uint8 (H, W, C) at ``pre``'s input
    size, ready for :func:`~featurebank.decoding.to_model_input` like a decoded image.

    ``src`` is anything :func:`~featurebank.decoding.decode_image` reads (it opens files the
    safe way and refuses what it refuses); ``key`` is the file's content key (the store's).
    """
    from PIL import Image

    from featurebank.decoding import DEFAULT_MAX_PIXELS, decode_image

    c, h, w = pre.input_size
    side = int(math.floor(max(h, w) / pre.crop_pct))
    # the square the evaluation transform crops its centre from: shorter side resized to `side`
    square = dataclasses.replace(pre, input_size=(c, side, side), crop_pct=1.0)
    base = decode_image(src, square, mode=mode, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    left, top, cw, ch, flip = view_params(key, view, rec)
    box = (left * side, top * side, (left + cw) * side, (top + ch) * side)
    img = Image.fromarray(base[..., 0] if c == 1 else base)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[rec["interpolation"]]
    out = img.resize((w, h), resample, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(out, np.uint8)
    return a[..., None] if c == 1 else a
