"""End-to-end embedding throughput: a folder of camera-sized real JPEGs into the store.

In one run, on the same images and the same network (efficientnet_lite0, `features`, avg):

* featurebank   : ``embed_images`` into a fresh store (decode threads overlapped with
                  onnxruntime, uint8 input), in the default decode mode (and in ``exact``);
* peer (a)      : what a typical user writes: a torch ``Dataset`` with PIL and timm's eval
                  transform, ``DataLoader(num_workers=2)``, the same network in torch eager;
* peer (b)      : a plain onnxruntime loop that decodes (PIL, full-size decode, the same
                  resize/crop/normalise) and then infers, batch by batch, in one process;
* ceiling       : D = decode+preprocess alone on all cores (the decode mode featurebank used),
                  M = the model alone on all cores; on a CPU-only machine they share the cores,
                  so the ceiling is 1/(1/D + 1/M) (with a GPU it would be min(D, M));
* cached re-run : the same folder again, every vector from the store;
* memory        : peak RSS of embedding 1,000 and 10,000 small real-photo JPEGs with a tiny
                  model, each in a fresh process (bounded = does not grow with the dataset).

    python benchmarks/embed_throughput.py [--images 192] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info  # noqa: E402

from featurebank.decoding import decode_image  # noqa: E402
from featurebank.artifact import DEFAULT_DECODE_MODE  # noqa: E402
from featurebank.embed_into_store import embed_images  # noqa: E402
from featurebank.embedder.session import open_model, physical_cores  # noqa: E402


def make_photos(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEGs of 500x375 .. 1600x1200 from scikit-image's real photos (crops + resizes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.hubble_deep_field(),
               data.immunohistochemistry(), data.retina(), *data.stereo_motorcycle()[:2]]
    sizes = [(500, 375), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = sizes[i % len(sizes)]
        img = Image.fromarray(np.ascontiguousarray(src[y : y + ch, x : x + cw, :3])).resize(size, Image.BICUBIC)
        p = folder / f"img{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(str(p))
    return paths


def decode_ceiling(paths, pre, mode, threads) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: decode_image(p, pre, mode=mode), paths))
    return len(paths) / (time.perf_counter() - t0)


def model_ceiling(runner, n_images, batch=32) -> float:
    c, h, w = runner.card.preprocessing.input_size
    x = np.random.default_rng(0).integers(0, 256, (batch, h, w, c), dtype=np.uint8)
    runner.run(x)
    done, t0 = 0, time.perf_counter()
    while done < n_images:
        runner.run(x)
        done += batch
    return done / (time.perf_counter() - t0)


def peer_plain_ort(paths, model_float, batch=32) -> float:
    """Peer (b): decode then infer, batch by batch, one process, full-size PIL decode."""
    runner = open_model(model_float, device="cpu")
    pre = runner.card.preprocessing
    mean, std = np.float32(pre.mean), np.float32(pre.std)
    rh, rw = pre.resize_size
    _, h, w = pre.input_size
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        arrs = []
        for p in paths[i : i + batch]:
            img = Image.open(p).convert("RGB")
            s = rh / min(img.size)
            img = img.resize((max(rh, round(img.size[0] * s)), max(rw, round(img.size[1] * s))), Image.BICUBIC)
            left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
            arr = np.asarray(img.crop((left, top, left + w, top + h)), np.float32) / 255.0
            arrs.append(((arr - mean) / std).transpose(2, 0, 1))
        runner.run(np.stack(arrs))
    return len(paths) / (time.perf_counter() - t0)


def peer_torch(paths, batch=32) -> float:
    """Peer (a): torch Dataset + PIL + timm transform, DataLoader(num_workers=2), torch eager."""
    import timm
    import torch

    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone

    model = build_backbone(get_backbone("efficientnet_lite0")).model
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB"))

    torch.set_num_threads(physical_cores())
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=2)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            model.forward_features(x).mean((2, 3))
    return len(paths) / (time.perf_counter() - t0)


# VmHWM (peak RSS of this process image) and not getrusage's ru_maxrss: Linux carries
# ru_maxrss across fork+exec, so a child would report the parent's peak (torch, exports).
MEMORY_CHILD = r"""
import sys
from featurebank.embed_into_store import embed_images
emb = embed_images(sys.argv[1], sys.argv[2], store=sys.argv[3], progress=False, return_vectors=False)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(emb.report.total, emb.report.embedded + emb.report.duplicates, hwm)
"""


def memory_check(tmp: Path) -> dict:
    """Peak RSS (MiB) embedding 1,000 vs 10,000 real-photo JPEGs (160x120) with a tiny model."""
    from featurebank.export.onnx_export import export_backbone

    tiny = tmp / "tiny.onnx"
    export_backbone("test_efficientnet", tiny, weights="random", input_format="uint8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data
    photo = data.astronaut()
    out = {}
    rng = np.random.default_rng(1)
    folder = tmp / "mem"
    folder.mkdir()
    written = 0
    for n in (1000, 10000):
        while written < n:  # distinct images: seeded crops, so every file is new content
            y, x = rng.integers(0, 512 - 120), rng.integers(0, 512 - 160)
            Image.fromarray(photo[y : y + 120, x : x + 160]).save(folder / f"m{written:05d}.jpg", quality=85)
            written += 1
        sub = tmp / f"list{n}.txt"
        sub.write_text("\n".join(str(folder / f"m{i:05d}.jpg") for i in range(n)))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(sub), str(tiny), str(tmp / f"store{n}")],
                           capture_output=True, text=True, check=True)
        total, done, rss_kib = map(int, r.stdout.split())
        assert total == done == n, r.stdout
        out[n] = {"peak_rss_mib": round(rss_kib / 1024, 1), "seconds": round(time.perf_counter() - t0, 1)}
    out["growth_10k_over_1k"] = round(out[10000]["peak_rss_mib"] / out[1000]["peak_rss_mib"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of featurebank and peer (b); the median counts")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed_throughput.json"))
    args = ap.parse_args()
    from featurebank.export.onnx_export import export_backbone

    cores = physical_cores()
    result: dict = {"benchmark": "embed_throughput", "images": args.images, "cores": cores,
                    "decode_mode": DEFAULT_DECODE_MODE, "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        paths = make_photos(tmp / "photos", args.images)
        export_backbone("efficientnet_lite0", tmp / "lite0-u8.onnx", input_format="uint8")
        export_backbone("efficientnet_lite0", tmp / "lite0-f32.onnx")
        runner = open_model(tmp / "lite0-u8.onnx", device="cpu")
        pre = runner.card.preprocessing

        def log(k, v):
            result[k] = round(v, 2)
            print(f"{k:40s} {v:8.2f}", flush=True)

        # warm-up (imports, thread pools, onnxruntime's first allocations) on other images,
        # as every peer gets its own warm-up below
        warm = make_photos(tmp / "warm", 8, seed=99)
        embed_images(warm, runner, store=tmp / "store-warm", progress=False, return_vectors=False)
        # featurebank, default mode, fresh store (median of 3 fresh stores), then the cached re-run
        firsts = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            emb = embed_images(tmp / "photos", runner, store=tmp / f"store{rep}", progress=False, return_vectors=False)
            firsts.append(time.perf_counter() - t0)
            assert emb.report.embedded == args.images, emb.report.summary()
        first = float(np.median(firsts))
        log("featurebank_img_s", args.images / first)
        result["featurebank_img_s_runs"] = [round(args.images / f, 1) for f in firsts]
        result["featurebank_stage_seconds"] = {k: round(v, 2) for k, v in emb.report.timings.items()}
        t0 = time.perf_counter()
        again = embed_images(tmp / "photos", runner, store=tmp / "store0", progress=False, return_vectors=False)
        second = time.perf_counter() - t0
        assert again.report.cached == args.images
        log("cached_rerun_img_s", args.images / second)
        log("cached_rerun_speedup", first / second)
        # featurebank in exact mode (fresh store)
        t0 = time.perf_counter()
        embed_images(tmp / "photos", runner, store=tmp / "store-exact", decode_mode="exact", progress=False,
                     return_vectors=False)
        log("featurebank_exact_img_s", args.images / (time.perf_counter() - t0))
        # ceilings
        # ceilings: medians of `repeats` runs, like the pipeline's own figure
        D = float(np.median([decode_ceiling(paths, pre, DEFAULT_DECODE_MODE, cores) for _ in range(args.repeats)]))
        # the model alone at its best batch size (the most favourable ceiling)
        m_by_batch = {bs: float(np.median([model_ceiling(runner, args.images, batch=bs) for _ in range(args.repeats)]))
                      for bs in (8, 16, 32)}
        result["model_img_s_by_batch"] = {bs: round(v, 1) for bs, v in m_by_batch.items()}
        M = max(m_by_batch.values())
        log("decode_ceiling_D_img_s", D)
        log("model_ceiling_M_img_s", M)
        ceiling = 1 / (1 / D + 1 / M)
        log("ceiling_cpu_img_s", ceiling)
        log("fraction_of_ceiling", result["featurebank_img_s"] / ceiling)
        # peers
        peer_plain_ort(warm, tmp / "lite0-f32.onnx")  # warm-up
        b = float(np.median([peer_plain_ort(paths, tmp / "lite0-f32.onnx") for _ in range(args.repeats)]))
        log("peer_b_plain_ort_loop_img_s", b)
        log("ratio_to_peer_b", result["featurebank_img_s"] / b)
        a = peer_torch(paths)
        log("peer_a_torch_dataloader_img_s", a)
        log("ratio_to_peer_a", result["featurebank_img_s"] / a)
        if not args.skip_memory:
            result["memory"] = memory_check(tmp)
            print("memory", json.dumps(result["memory"]), flush=True)
    result["peak_rss_mib_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
