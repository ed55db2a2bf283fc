"""Embedding on Ray vs the local embedder, on this machine, in the same run.

Same images (camera-sized real JPEGs made from scikit-image photos, as in
embed_throughput.py), same network (efficientnet_lite0 `features`, avg pool, uint8 input,
the CLI's default export), same decode mode, each run into a fresh store:

* local      : ``embed_images`` (decode threads + one onnxruntime session on all cores);
* local t1   : the same with ``threads=1`` (one onnxruntime thread, as in each Ray actor);
* ray x1     : ``embed_images_ray`` with 1 actor (1 CPU, 1 onnxruntime thread) and decode
               tasks of 1 CPU, on a local Ray instance of ``--ray-cpus`` CPUs;
* ray x2     : 2 actors of 0.5 CPU (1 thread each) and decode tasks of 0.5 CPU.

Ray is started before timing (as a running cluster would be) and warmed up with one small
run; each measured Ray run still includes starting its actors and loading the model, which a
one-off job pays. images/s = embedded / wall time of the call, hashing included for all.

    python benchmarks/ray_scaling.py [--images 200] [--ray-cpus 2] [--json-out benchmarks/results/ray_scaling.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info  # noqa: E402
from embed_throughput import make_photos  # noqa: E402

from featurebank.distributed import embed_images_ray  # noqa: E402
from featurebank.artifact import DEFAULT_DECODE_MODE  # noqa: E402
from featurebank.embed_into_store import embed_images  # noqa: E402
from featurebank.export.cache import cached_export  # noqa: E402


def _row(name: str, report, elapsed: float) -> dict:
    row = {"run": name, "embedded": report.embedded, "elapsed_s": round(elapsed, 2),
           "images_per_s": round(report.embedded / elapsed, 1),
           "stage_s": {k: round(v, 2) for k, v in report.timings.items()}}
    print(f"{name:10s} {row['images_per_s']:7.1f} images/s  ({report.embedded} in {elapsed:.1f} s; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in row["stage_s"].items()) + ")", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    import ray

    model = str(cached_export("efficientnet_lite0", input_format="uint8"))
    info = machine_info()
    info["versions"]["ray"] = md.version("ray")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "photos", a.images)
        make_photos(tmp / "warm", 8, seed=1)
        folder = str(tmp / "photos")

        t0 = time.perf_counter()
        emb = embed_images(folder, model, store=tmp / "local", batch_size=a.batch_size, progress=False,
                           return_vectors=False)
        rows.append(_row("local", emb.report, time.perf_counter() - t0))
        # the local embedder with one onnxruntime thread, as each Ray actor runs: tells
        # whether a gap comes from Ray or from threads contending for the cores
        t0 = time.perf_counter()
        emb = embed_images(folder, model, store=tmp / "local-t1", batch_size=a.batch_size, threads=1, progress=False,
                           return_vectors=False)
        rows.append(_row("local t1", emb.report, time.perf_counter() - t0))

        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, logging_level="WARNING")
        t0 = time.perf_counter()
        warm = embed_images_ray(str(tmp / "warm"), model, store=tmp / "warm-store", batch_size=a.batch_size,
                                num_actors=1, progress=False)
        warm_s = time.perf_counter() - t0
        print(f"ray warm-up (8 images, actor start + model load): {warm_s:.1f} s", flush=True)
        for name, kw in (
            ("ray x1", {"num_actors": 1, "num_cpus_per_actor": 1, "num_cpus_per_decode_task": 1}),
            ("ray x2", {"num_actors": 2, "num_cpus_per_actor": 0.5, "num_cpus_per_decode_task": 0.5}),
        ):
            t0 = time.perf_counter()
            rep = embed_images_ray(folder, model, store=tmp / name.replace(" ", ""), batch_size=a.batch_size,
                                   progress=False, **kw)
            row = _row(name, rep, time.perf_counter() - t0)
            row["settings"] = kw
            rows.append(row)
        ray.shutdown()
        assert warm.embedded == 8

    local = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_vs_local"] = round(r["images_per_s"] / local, 2)
    out = {"benchmark": "ray_scaling", "machine": info, "images": a.images, "batch_size": a.batch_size,
           "decode_mode": DEFAULT_DECODE_MODE, "model": "efficientnet_lite0 features avg uint8",
           "ray_cpus": a.ray_cpus, "ray_warmup_s": round(warm_s, 2), "results": rows}
    print(json.dumps({r["run"]: r["ratio_vs_local"] for r in rows}))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
