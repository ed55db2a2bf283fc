"""Benchmark photo sets: real camera photos at the sizes real folders hold.

``size_mix(folder, n=300, seed=0)`` writes ``n`` JPEGs (quality 90, 4:2:0 chroma) cropped
from real camera photographs, in the size mix of issue #14 (what a folder of user photos
looks like, many small ones):

    500x375 27%   375x500 18%   640x480 20%   800x600 11%   1024x768 14%   1600x1200 10%

The photographs come from Debian's wallpaper packages where they are installed (only the
camera photos among them, not the renders or vector art), else from scikit-image's own
photos (``skimage.data``), so the benchmarks run everywhere; ``photo_sources()`` says which
were used and every set writes them into ``SOURCES.json`` beside its images. Install the
better sources with

    apt-get install -y mate-backgrounds lomiri-wallpapers

Each image is a crop at a seeded position and scale (1/3 to all of the largest crop of the
target's aspect that fits the photo), resized to its target size, so the ``n`` images are
distinct content, and two seeds give two disjoint-looking sets (held-out images).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height): share of the set
SIZE_MIX: dict[tuple[int, int], float] = {
    (500, 375): 0.27, (375, 500): 0.18, (640, 480): 0.20, (800, 600): 0.11, (1024, 768): 0.14, (1600, 1200): 0.10,
}

# Camera photographs in Debian's wallpaper packages (looked at one by one: the packages also
# hold renders, gradients and vector art, which are left out). package: files
DEBIAN_PHOTOS: dict[str, list[str]] = {
    "mate-backgrounds": [f"/usr/share/backgrounds/mate/nature/{n}.jpg" for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")],
    "lomiri-wallpapers": [f"/usr/share/backgrounds/{n}.jpg" for n in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Kleiber_by_Lukas_Baubkus", "Picture_0B_by_freespace",
        "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
        "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")],
}

# scikit-image's colour camera photos (its microscope, astronomy and medical images left out)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")

QUALITY = 90
SUBSAMPLING = 2  # Pillow's 4:2:0


def photo_sources() -> dict:
    """Which photographs the sets are cropped from: ``{"kind", "packages", "files"}``."""
    found = {pkg: [f for f in files if Path(f).is_file()] for pkg, files in DEBIAN_PHOTOS.items()}
    found = {pkg: files for pkg, files in found.items() if files}
    if found:
        return {"kind": "debian-wallpapers", "packages": sorted(found),
                "files": [f for files in found.values() for f in files]}
    return {"kind": "skimage.data", "packages": ["scikit-image"], "files": list(SKIMAGE_PHOTOS)}


def size_counts(n: int) -> dict[tuple[int, int], int]:
    """Images per size for a set of ``n``: the mix's shares, rounded by largest remainder."""
    exact = {size: share * n for size, share in SIZE_MIX.items()}
    counts = {size: int(v) for size, v in exact.items()}
    by_remainder = sorted(exact, key=lambda s: exact[s] - counts[s], reverse=True)
    for size in by_remainder[: n - sum(counts.values())]:
        counts[size] += 1
    return counts


def _load(source: str, kind: str) -> Image.Image:
    if kind == "skimage.data":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import skimage.data as data
        if source.startswith("motorcycle_"):
            left, right = data.stereo_motorcycle()[:2]
            arr = left if source.endswith("left") else right
        else:
            arr = getattr(data, source)()
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    with Image.open(source) as img:
        if min(img.size) > 3000:  # JPEG's 1/2-scale decode: still over 1500 px, 4x less to crop from
            img.draft("RGB", (img.width // 2, img.height // 2))
        return img.convert("RGB")


def size_mix(folder, n: int = 300, seed: int = 0) -> list[str]:
    """Write ``n`` real-photo JPEGs in the issue's size mix into ``folder``; return their paths.

    The files are ``mix{seed}_{i:05d}.jpg`` in a seeded shuffled order of sizes. A folder that
    already holds the same set (same ``n``, ``seed`` and sources, per its ``SOURCES.json``) is
    reused as it is.
    """
    folder = Path(folder)
    sources = photo_sources()
    manifest = {"n": n, "seed": seed, "quality": QUALITY, "subsampling": "4:2:0",
                "size_mix": {f"{w}x{h}": share for (w, h), share in SIZE_MIX.items()}, "sources": sources}
    names = [f"mix{seed}_{i:05d}.jpg" for i in range(n)]
    paths = [str(folder / name) for name in names]
    record = folder / f"SOURCES-mix{seed}.json"
    if record.is_file() and json.loads(record.read_text()) == manifest and all(Path(p).is_file() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [size for size, count in size_counts(n).items() for _ in range(count)]
    sizes = [sizes[i] for i in rng.permutation(n)]
    files = sources["files"]
    # image i comes from photo i mod len(files), after a seeded shuffle of the photos, and each
    # photo is opened once (the largest are 24 megapixels)
    order = rng.permutation(len(files))
    by_photo: dict[int, list[int]] = {}
    for i in range(n):
        by_photo.setdefault(int(order[i % len(files)]), []).append(i)
    for k, images in by_photo.items():
        photo = _load(files[k], sources["kind"])
        pw, ph = photo.size
        for i in images:
            w, h = sizes[i]
            fit = min(pw / w, ph / h)  # the largest crop of the target's aspect that fits
            scale = fit * rng.uniform(1 / 3, 1.0)
            cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
            x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
            img = photo.resize((w, h), Image.LANCZOS, box=(x, y, x + cw, y + ch))
            img.save(paths[i], quality=QUALITY, subsampling=SUBSAMPLING)
    record.write_text(json.dumps(manifest, indent=2))
    return paths


if __name__ == "__main__":
    import sys
    import time

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/size_mix")
    t0 = time.perf_counter()
    written = size_mix(out)
    print(f"{len(written)} images in {time.perf_counter() - t0:.1f} s from {photo_sources()['kind']} -> {out}")
