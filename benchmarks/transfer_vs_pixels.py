"""Transfer features vs a raw-pixel baseline on real labelled photos (issue: classifiers).

A real labelled set of camera-sized photos available offline: crops of scikit-image's real
texture photos (brick, grass, gravel), 40 per class, each 448x448 crop rotated/flipped and
saved as a 1024x1024 JPEG (the set of benchmarks/decode_modes.py). Held-out test split
(25%), efficientnet_lite0 `features` vs raw 32x32 RGB pixels, the same linear probe and
prototype classifiers, 1..all labels per class (featurebank.fewshot_study).

    python benchmarks/transfer_vs_pixels.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info  # noqa: E402
from decode_modes import texture_set  # noqa: E402

from featurebank.studies import fewshot_study  # noqa: E402


def main() -> None:
    out_dir = Path(__file__).parent / "results" / "transfer_vs_pixels"
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        texture_set(tmp / "tex")
        result = fewshot_study(tmp / "tex", store=tmp / "store", backbone="efficientnet_lite0", shots=(1, 2, 5, 10, "all"),
                               repeats=5, test_size=0.25, pixels="rgb", seed=0, out_dir=out_dir, progress=False)
    rows = {}
    for r in result.rows:
        m = r["accuracy_mean"]
        rows.setdefault(f"{r['features']}, {r['classifier']}", {})[str(r["shots"])] = None if m is None else round(m, 3)
    summary = {"benchmark": "transfer_vs_pixels", "set": "skimage textures brick/grass/gravel, 40 per class, 1024px JPEG",
               "accuracy": rows, "machine": machine_info()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
