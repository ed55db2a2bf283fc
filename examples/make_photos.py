"""Write a small folder of REAL photos, available offline, for the README's main job.

    python examples/make_photos.py photos/

photos/
  textures/{brick,grass,gravel}/*.jpg   labelled crops of scikit-image's real texture photos
  scenes/*.jpg                           scikit-image's real photos (cat, coffee, astronaut, rocket ...)
  scenes/*-copy.jpg                      re-encoded, slightly resized near-duplicates (for `featurebank dedup`)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def main(dest: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data
    root = Path(dest)
    rng = np.random.default_rng(0)
    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        (root / "textures" / name).mkdir(parents=True, exist_ok=True)
        for i in range(24):
            y, x = rng.integers(0, 512 - 256, size=2)
            crop = Image.fromarray(img[y : y + 256, x : x + 256]).convert("RGB").rotate(90 * int(rng.integers(4)))
            crop.save(root / "textures" / name / f"{name}-{i:02d}.jpg", quality=90)
    (root / "scenes").mkdir(parents=True, exist_ok=True)
    scenes = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
              "rocket": data.rocket(), "hubble": data.hubble_deep_field(), "motorcycle": data.stereo_motorcycle()[0],
              "retina": data.retina(), "cells": data.immunohistochemistry()}
    for name, img in scenes.items():
        pic = Image.fromarray(np.ascontiguousarray(img[..., :3]))
        pic.save(root / "scenes" / f"{name}.jpg", quality=92)
        if name in ("chelsea", "rocket"):
            w, h = pic.size
            pic.resize((int(w * 0.8), int(h * 0.8)), Image.BICUBIC).save(root / "scenes" / f"{name}-copy.jpg", quality=75)
    n = sum(1 for _ in root.rglob("*.jpg"))
    print(f"wrote {n} real photos under {root}/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "photos")
