"""Which layer, how much data: the layer sweep and few-labels curve of efficientnet_lite0
(real weights) on Fashion-MNIST and on a set of natural photos.

Data, both real and offline:

* **Fashion-MNIST** from the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``; files under /usr/share/datasets/fashion-mnist).
  The official split is kept: a seeded stratified subset of the official *train* set
  (``--fmnist-train`` images, equal per class) is the sweep's cross-validation set and the
  few-shot training pool; a seeded stratified subset of the official *test* set
  (``--fmnist-test``) is the few-shot test split. Each 28x28 grayscale image is written as
  a PNG file; the embedder converts it to RGB by replicating the channel and the model's
  own preprocessing resizes it (bicubic, shorter side to 256 = 224 / crop_pct 0.875, then
  the 224x224 centre crop, which trims 12.5% of the border).
* **Faces vs non-faces**: scikit-image's ``lfw_subset`` (100 faces from Labeled Faces in the
  Wild and 100 non-face crops of natural photos, 25x25 grayscale), written as PNG files.

Runs on the CPU in practical time on a shared 2-core machine; subset sizes are flags.

    python benchmarks/studies.py                       # both sets, writes benchmarks/studies/
    python benchmarks/studies.py --sets lfw --repeats 3

Writes ``benchmarks/studies/<set>/{sweep,fewshot}.{json,png}`` and
``benchmarks/studies/summary.json`` (machine, versions, settings, runtimes, findings).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle_boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    classes = np.unique(y)
    per = n // len(classes)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per, replace=False) for c in classes]))


def write_fashion_mnist(root: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    from PIL import Image

    if not FMNIST_DIR.is_dir():
        raise SystemExit(f"{FMNIST_DIR} is missing: apt-get install dataset-fashion-mnist")
    out = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        X = _read_idx(FMNIST_DIR / f"{split}-images-idx3-ubyte.gz")
        y = _read_idx(FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz")
        folder = root / f"fashion_mnist_{'train' if split == 'train' else 'test'}_{n}"
        idx = _stratified_subset(y, n, seed)
        for i in idx:
            d = folder / FMNIST_CLASSES[y[i]]
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{split}_{i:05d}.png"
            if not p.exists():
                Image.fromarray(X[i], mode="L").save(p)
        out.append(folder)
    return out[0], out[1]


def write_lfw(root: Path) -> Path:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data

    faces = skimage.data.lfw_subset()
    folder = root / "lfw_subset"
    for label, sl in (("face", slice(0, 100)), ("nonface", slice(100, 200))):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(faces[sl]):
            p = folder / label / f"{i:03d}.png"
            if not p.exists():
                Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(p)
    return folder


def run_set(name: str, train: Path, test: Path | None, args, store: Path) -> dict:
    from featurebank.export.cache import cached_export
    from featurebank.studies import fewshot_study, sweep_layers

    out = HERE / "studies" / name
    t = time.perf_counter()
    sweep = sweep_layers(train, backbone=args.backbone, all_stages=True, pool="avg", store=store, folds=args.folds,
                         seed=args.seed, out_dir=out, inner_cv=args.inner_cv, progress=args.progress)
    t_sweep = time.perf_counter() - t
    print(sweep.summary(), flush=True)
    layer = sweep.recommended["layer"]
    t = time.perf_counter()
    # a one-layer export of the recommended layer: its vectors are already in the store
    model = cached_export(args.backbone, layers=[layer], pool="avg", input_format="uint8")
    few = fewshot_study(train, store=store, model=model, shots=args.shots, repeats=args.repeats,
                        test_source=test, test_size=args.test_size, pixels="gray", pixel_size=32, seed=args.seed,
                        out_dir=out, progress=args.progress)
    t_few = time.perf_counter() - t
    print(few.summary(), flush=True)
    return {
        "train": str(train), "test": str(test) if test else None,
        "sweep": {"best_layer": layer, "best_accuracy": sweep.recommended["accuracy_mean"],
                  "rows": [{k: r[k] for k in ("layer", "dim", "accuracy_mean", "accuracy_std", "fit_seconds_mean")}
                           for r in sweep.rows],
                  "n_images": sweep.n_images, "embedding": sweep.embedding, "timings_s": sweep.timings,
                  "seconds": t_sweep},
        "fewshot": {"layer": layer, "n_pool": few.n_pool, "n_test": few.n_test,
                    "transfer_beats_pixels_from": few.transfer_beats_pixels_from,
                    "table": {str(k): {f"{r['features']}/{r['classifier']}": [r["accuracy_mean"], r["accuracy_std"]]
                                       for r in few.rows if r["shots"] == k} for k in few.shots},
                    "timings_s": few.timings, "seconds": t_few},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="fashion_mnist,lfw", help="comma-separated: fashion_mnist, lfw")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featurebank-studies"),
                        help="where the PNG files and the store go")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--fmnist-train", type=int, default=2000, help="official-train images (equal per class)")
    parser.add_argument("--fmnist-test", type=int, default=1000, help="official-test images (equal per class)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--inner-cv", type=int, default=5)
    parser.add_argument("--shots", default="1,2,5,10,20,all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--test-size", type=float, default=0.3, help="lfw: held-out fraction (no official split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = parser.parse_args()

    from _machine import machine_info

    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"
    summary = {"machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()}, "sets": {}}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        t = time.perf_counter()
        if name == "fashion_mnist":
            train, test = write_fashion_mnist(args.work, args.fmnist_train, args.fmnist_test, args.seed)
        elif name == "lfw":
            train, test = write_lfw(args.work), None
        else:
            raise SystemExit(f"unknown set {name!r}; choose from fashion_mnist, lfw")
        summary["sets"][name] = run_set(name, train, test, args, store)
        summary["sets"][name]["seconds"] = time.perf_counter() - t
    summary["total_seconds"] = time.perf_counter() - t0
    path = HERE / "studies" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps({k: v for k, v in summary.items() if k != "sets"} | {
        "findings": {n: {"best_layer": s["sweep"]["best_layer"],
                         "transfer_beats_pixels_from": s["fewshot"]["transfer_beats_pixels_from"]}
                     for n, s in summary["sets"].items()}}, indent=2))


if __name__ == "__main__":
    main()
