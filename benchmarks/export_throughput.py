"""Model-only throughput of the exported default (onnxruntime) vs the same network in torch eager.

Same network (efficientnet_lite0 cut at `features`, avg pool), same batch sizes, same inputs,
same number of threads (all cores), in one run. Reports images/s and the ratio ORT / torch.

    python benchmarks/export_throughput.py [--batch-sizes 1 8 32] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _machine import machine_info
from featurebank.embedder.session import open_model, physical_cores
from featurebank.export.layers import list_layers, resolve_layers, truncate
from featurebank.export.onnx_export import export_backbone
from featurebank.export.registry import get_backbone
from featurebank.export.weights import build_backbone


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export_throughput.json"))
    args = ap.parse_args()
    threads = physical_cores()
    torch.set_num_threads(threads)
    spec = get_backbone("efficientnet_lite0")
    lb = build_backbone(spec)
    (info,) = resolve_layers(["features"], list_layers(spec, lb.model))
    net = truncate(lb.model, spec, [info])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lite0.onnx"
        export_backbone("efficientnet_lite0", path)
        runner = open_model(path, device="cpu", threads=threads, spin=True)
        rows = []
        for bs in args.batch_sizes:
            x = np.random.default_rng(0).normal(size=(bs, *spec.input_size)).astype(np.float32)
            xt = torch.from_numpy(x)

            def torch_step():
                with torch.inference_mode():
                    net(xt)[0].mean((2, 3))

            ort_rate = rate(lambda: runner.run(x), bs, args.seconds)
            torch_rate = rate(torch_step, bs, args.seconds)
            rows.append({"batch": bs, "onnxruntime_img_s": round(ort_rate, 1), "torch_eager_img_s": round(torch_rate, 1),
                         "ratio": round(ort_rate / torch_rate, 2)})
            print(f"batch {bs:3d}: onnxruntime {ort_rate:7.1f} img/s  torch eager {torch_rate:7.1f} img/s  "
                  f"ratio {ort_rate / torch_rate:.2f}x", flush=True)
    result = {"benchmark": "export_throughput", "model": "efficientnet_lite0/features/avg fp32", "threads": threads,
              "seconds_per_point": args.seconds, "rows": rows, "machine": machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
