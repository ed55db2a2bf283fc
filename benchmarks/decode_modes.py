"""fast vs exact decoding: how far the vectors move, and whether it matters for a probe.

1. Cosine between the `fast` and `exact` vectors of each image, on camera-sized real JPEGs
   (500x375 .. 1600x1200, built from scikit-image photos, as in embed_throughput.py).
2. Linear-probe accuracy (5-fold, seeded) with each mode on a real labelled set at camera
   size: crops of scikit-image's real texture photos (brick, grass, gravel), 40 per class,
   each 448x448 crop rotated/flipped and saved as a 1024x1024 JPEG.
3. Decode speed of each mode on all cores.

    python benchmarks/decode_modes.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info  # noqa: E402
from embed_throughput import decode_ceiling, make_photos  # noqa: E402

from featurebank.classifiers import LinearProbe  # noqa: E402
from featurebank.embed_into_store import embed_images  # noqa: E402
from featurebank.embedder.session import open_model, physical_cores  # noqa: E402


def texture_set(folder: Path, per_class: int = 40) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data
    rng = np.random.default_rng(0)
    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            y, x = rng.integers(0, 512 - 448, size=2)
            crop = Image.fromarray(img[y : y + 448, x : x + 448]).convert("RGB").rotate(90 * int(rng.integers(4)))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.resize((1024, 1024), Image.BICUBIC).save(folder / name / f"{i:03d}.jpg", quality=90)


def probe_accuracy(X, y, folds=5) -> tuple[float, float]:
    from sklearn.model_selection import StratifiedKFold

    scores = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(X, y):
        scores.append(LinearProbe(random_state=0).fit(X[tr], y[tr]).score(X[te], y[te]))
    return float(np.mean(scores)), float(np.std(scores))


def main() -> None:
    from featurebank.export.onnx_export import export_backbone

    out: dict = {"benchmark": "decode_modes", "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        export_backbone("efficientnet_lite0", tmp / "m.onnx", input_format="uint8")
        runner = open_model(tmp / "m.onnx", device="cpu")
        paths = make_photos(tmp / "photos", 96)
        vec = {m: embed_images(tmp / "photos", runner, decode_mode=m, progress=False).X for m in ("exact", "fast")}
        a, b = vec["exact"], vec["fast"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        out["cosine_fast_vs_exact"] = {"min": float(cos.min()), "p05": float(np.percentile(cos, 5)),
                                       "median": float(np.median(cos)), "mean": float(cos.mean()), "n": len(cos)}
        print("cosine fast vs exact:", out["cosine_fast_vs_exact"], flush=True)
        pre = runner.card.preprocessing
        out["decode_img_s"] = {m: round(decode_ceiling(paths, pre, m, physical_cores()), 1) for m in ("exact", "fast")}
        print("decode img/s:", out["decode_img_s"], flush=True)
        texture_set(tmp / "tex")
        out["probe_accuracy"] = {}
        for m in ("exact", "fast"):
            emb = embed_images(tmp / "tex", runner, decode_mode=m, progress=False)
            mean, std = probe_accuracy(emb.X, np.array(emb.labels))
            out["probe_accuracy"][m] = {"mean": round(mean, 4), "std": round(std, 4), "n": len(emb.labels)}
        print("probe accuracy:", out["probe_accuracy"], flush=True)
    dest = Path(__file__).parent / "results" / "decode_modes.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
