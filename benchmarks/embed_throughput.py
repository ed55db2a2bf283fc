"""End-to-end embedding throughput: folders of real camera JPEGs into the store.

Two sets: the main one is issue #14's size mix of real camera photos (``_photos.size_mix``:
500x375 27%, 375x500 18%, 640x480 20%, 800x600 11%, 1024x768 14%, 1600x1200 10%; JPEG q90
4:2:0), the second the old set (scikit-image photos resized to 500x375 .. 1600x1200, mostly
large). In one run, on the same images and the same network (efficientnet_lite0, `features`,
avg), interleaved (each repeat runs every row once, the median counts), for each decode mode:

* featurebank   : ``embed_images`` into a fresh store, default settings: the batch size and
                  thread split ``tune_pipeline`` chose for this machine (measured once before
                  the timed runs, its seconds recorded: what a first run pays, once);
* untuned       : the same with the constants featurebank used before (batch 16, every core
                  for onnxruntime and for decoding);
* peer (b)      : a plain onnxruntime loop that decodes (PIL, full-size decode, the same
                  resize/crop/normalise) and then infers, batch by batch, in one process;
* peer (a)      : (main set, fast table) a torch ``Dataset`` with PIL and timm's eval
                  transform, ``DataLoader(num_workers=2)``, the same network in torch eager;
* ceiling       : D = decode+preprocess alone on all cores (the row's decode mode), M = the
                  model alone at its best thread count and batch size (the most favourable
                  ceiling); sharing the cores, 1/(1/D + 1/M). D and M are measured in every
                  repeat with the other rows (the median counts), so that load from others on
                  a shared machine weighs on the ceiling as on the rows;
* decode steps  : where a 500x375 JPEG's decode time goes, each Pillow step timed on its own.

With ``--int8-model PATH`` (an INT8 export of the same network, ``featurebank export
--precision int8``) the fast and exact tables are measured for it too, against the same
peer on its fp32 model. ``--memory``: peak RSS of embedding 1,000 and 10,000 small JPEGs
with a tiny model, each in a fresh process (bounded = does not grow with the dataset).

    python benchmarks/embed_throughput.py [--images 300] [--repeats 3] [--skip-torch]
"""

from __future__ import annotations

import argparse
import json
import os
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
from _photos import photo_sources, size_mix  # noqa: E402

from featurebank.decoding import decode_image, to_model_input  # noqa: E402
from featurebank.embed_into_store import embed_images  # noqa: E402
from featurebank.embedder.session import open_model, physical_cores  # noqa: E402
from featurebank.embedder.tuning import tune_pipeline  # noqa: E402


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
    """Images/s of decode_image alone on a pool of ``threads``."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: decode_image(p, pre, mode=mode), paths))
    return len(paths) / (time.perf_counter() - t0)


def model_ceiling(runner, n_images, batch=32) -> float:
    """Images/s of the model alone (random uint8 input) at one batch size, after a warm-up batch."""
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


def decode_steps(paths, pre, mode: str, reps: int = 3) -> dict:
    """Microseconds per image of each Pillow step of decode_image (``mode``) on ``paths``, each
    step timed on its own (best of ``reps`` passes over the images, per step), and of the
    whole decode_image for comparison. The steps are decode.py's own, in its order."""
    from featurebank.decoding import decode as dec

    filt = dec._FILTERS[pre.interpolation]
    _, ch, cw = pre.input_size
    steps: dict[str, list[float]] = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(reps):
        for p in paths:
            img = timed("open (header)", Image.open, p)
            w, h = img.size
            rw, rh = dec._resized_size(w, h, pre)
            box = dec._crop_box(rw, rh, pre)
            sx, sy = w / rw, h / rh
            src_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            if mode == "fast":
                drafted = timed("draft", img.draft, None, (rw, rh))
                if drafted is not None:
                    k = drafted[1][2] / w
                    src_box = tuple(v * k for v in src_box)
            timed("load (JPEG decode)", img.load)
            timed("exif orientation", dec._orientation, img)
            img = timed("convert RGB", dec._to_mode, img, "RGB")
            if mode == "fast":
                img = timed("resize (crop box only)", img.resize, (cw, ch), filt, box=src_box,
                            reducing_gap=dec._REDUCING_GAP)
            else:
                img = timed("resize (whole image)", img.resize, (rw, rh), filt)
                img = timed("crop", img.crop, box)
            arr = timed("to array", np.asarray, img)
            timed("normalise (float input; uint8 models do it in the graph)", to_model_input, arr[None], pre, "float")
    out = {name: round(float(np.median(np.reshape(v, (reps, -1)).min(axis=0))) * 1e6, 1) for name, v in steps.items()}
    out["sum of steps"] = round(sum(out.values()), 1)
    whole = []
    buf = np.empty((ch, cw, 3), np.uint8)
    for _ in range(reps):
        for p in paths:
            t0 = time.perf_counter()
            decode_image(p, pre, mode=mode, out=buf)
            whole.append(time.perf_counter() - t0)
    out["decode_image"] = round(float(np.median(np.reshape(whole, (reps, -1)).min(axis=0))) * 1e6, 1)
    return out


def embed_rate(folder, runner, tmp: Path, mode: str, n: int, **settings) -> tuple[float, dict]:
    """Images/s of embed_images of ``folder`` into a fresh store; the settings it used."""
    store = Path(tempfile.mkdtemp(dir=tmp, prefix="store-"))
    t0 = time.perf_counter()
    emb = embed_images(folder, runner, store=store, decode_mode=mode, progress=False, return_vectors=False,
                       **settings)
    rate = n / (time.perf_counter() - t0)
    assert emb.report.embedded == n, emb.report.summary()
    return rate, {"settings": emb.report.settings, "stage_seconds": {k: round(v, 2) for k, v in emb.report.timings.items()}}


def run_set(name: str, folder: Path, paths: list[str], models: dict[str, Path], model_float: Path, tmp: Path,
            repeats: int, torch_peer: bool) -> dict:
    """Every row for one image set, each mode and precision, interleaved repeats."""
    cores = physical_cores()
    n = len(paths)
    out: dict = {"images": n, "sizes": {}}
    for p in paths:
        with Image.open(p) as im:
            out["sizes"][f"{im.width}x{im.height}"] = out["sizes"].get(f"{im.width}x{im.height}", 0) + 1
    print(f"\n== {name}: {n} images {out['sizes']}", flush=True)
    runs: dict[str, list[float]] = {}
    detail: dict[str, dict] = {}
    tuned: dict[tuple[str, str], dict] = {}
    runners: dict[tuple[str, int], object] = {}
    for prec, model in models.items():
        for mode in ("fast", "exact"):
            t0 = time.perf_counter()
            st = tune_pipeline(model, device="cpu", decode_mode=mode, progress=True)
            tuned[(prec, mode)] = {**st.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}
            for t in (st.threads, cores):
                if (prec, t) not in runners:
                    runners[(prec, t)] = open_model(model, device="cpu", threads=t)
    warm = make_photos(tmp / "warm", 8, seed=99)
    for r in runners.values():
        embed_images(warm, r, store=tmp / "store-warm", progress=False, return_vectors=False)
    peer_plain_ort(warm, model_float)

    def row(key, fn):
        rate, info = fn()
        runs.setdefault(key, []).append(rate)
        if info:
            detail[key] = info
        print(f"  {key:34s} {rate:7.1f} img/s", flush=True)

    pre = next(iter(runners.values())).card.preprocessing
    for prec, model in models.items():  # the model-alone grid's sessions
        for t in sorted({1, cores}):
            if (prec, t) not in runners:
                runners[(prec, t)] = open_model(model, device="cpu", threads=t)
    alone: dict[str, dict[str, list[float]]] = {prec: {} for prec in models}
    # every row, the ceilings' D and M included, once per repeat: load from elsewhere on this
    # shared machine hits them alike
    for rep in range(repeats):
        for prec in models:
            for mode in ("fast", "exact"):
                st = tuned[(prec, mode)]
                row(f"featurebank_{prec}_{mode}", lambda: embed_rate(folder, runners[(prec, st["threads"])], tmp, mode, n))
                row(f"untuned_{prec}_{mode}", lambda: embed_rate(folder, runners[(prec, cores)], tmp, mode, n,
                                                                 batch_size=16, workers=cores))
        row("peer_b_plain_ort_loop", lambda: (peer_plain_ort(paths, model_float), None))
        for mode in ("fast", "exact"):
            row(f"D_{mode}", lambda: (decode_ceiling(paths, pre, mode, cores), None))
        for prec in models:
            for t in sorted({1, cores}):
                for bs in (8, 16, 32):
                    alone[prec].setdefault(f"threads{t}_batch{bs}", []).append(
                        model_ceiling(runners[(prec, t)], min(n, 128), batch=bs))
    med = {k: round(float(np.median(v)), 2) for k, v in runs.items()}
    out["runs_img_s"] = {k: [round(x, 1) for x in v] for k, v in runs.items()}
    out["median_img_s"] = med
    out["settings"] = {f"{p}_{m}": v for (p, m), v in tuned.items()}
    out["featurebank_detail"] = detail
    D = {mode: med[f"D_{mode}"] for mode in ("fast", "exact")}
    out["decode_ceiling_D_img_s"] = D
    tables = {}
    for prec in models:
        m_by = {k: round(float(np.median(v)), 1) for k, v in alone[prec].items()}
        M = max(m_by.values())
        out.setdefault("model_alone_img_s", {})[prec] = m_by
        for mode in ("fast", "exact"):
            ceiling = 1 / (1 / D[mode] + 1 / M)
            fb = med[f"featurebank_{prec}_{mode}"]
            tables[f"{prec}_{mode}"] = {
                "featurebank_img_s": fb, "untuned_img_s": med[f"untuned_{prec}_{mode}"],
                "peer_b_img_s": med["peer_b_plain_ort_loop"], "D_img_s": round(D[mode], 1), "M_img_s": M,
                "ceiling_img_s": round(ceiling, 1), "fraction_of_ceiling": round(fb / ceiling, 3),
                "ratio_to_peer_b": round(fb / med["peer_b_plain_ort_loop"], 3),
                "untuned_fraction_of_ceiling": round(med[f"untuned_{prec}_{mode}"] / ceiling, 3),
                "untuned_ratio_to_peer_b": round(med[f"untuned_{prec}_{mode}"] / med["peer_b_plain_ort_loop"], 3),
                "settings": tuned[(prec, mode)],
            }
            t = tables[f"{prec}_{mode}"]
            print(f"  [{prec} {mode}] featurebank {fb:.1f} img/s = {t['fraction_of_ceiling']:.2f} of ceiling "
                  f"{ceiling:.1f} (D {D[mode]:.0f}, M {M:.0f}), {t['ratio_to_peer_b']:.2f}x peer (b); untuned "
                  f"{t['untuned_img_s']:.1f} ({t['untuned_fraction_of_ceiling']:.2f})", flush=True)
    out["tables"] = tables
    if torch_peer:
        peer_torch(warm)
        a = peer_torch(paths)
        out["peer_a_torch_dataloader_img_s"] = round(a, 2)
        out["ratio_fast_fp32_to_peer_a"] = round(med["featurebank_fp32_fast"] / a, 2)
        print(f"  peer (a) torch DataLoader {a:.1f} img/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="images in the size-mix set")
    ap.add_argument("--old-images", type=int, default=192, help="images in the old set (0: skip it)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row; the median counts")
    ap.add_argument("--skip-torch", action="store_true", help="leave out peer (a)")
    ap.add_argument("--memory", action="store_true", help="also the 1,000 vs 10,000 images peak-RSS check")
    ap.add_argument("--int8-model", help="an INT8 export of efficientnet_lite0 (uint8 input) to measure too")
    ap.add_argument("--photos", help="folder for the size-mix set (kept; default: a temporary one)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed_throughput.json"))
    args = ap.parse_args()
    from featurebank.export.onnx_export import export_backbone

    result: dict = {"benchmark": "embed_throughput", "cores": physical_cores(), "machine": machine_info(),
                    "model": "efficientnet_lite0 (features, avg), uint8 input; peer (b) on the float-input export"}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        photos = Path(args.photos) if args.photos else tmp / "mix"
        paths = size_mix(photos, args.images)
        result["photo_sources"] = photo_sources()
        models = {"fp32": tmp / "lite0-u8.onnx"}
        export_backbone("efficientnet_lite0", models["fp32"], input_format="uint8")
        export_backbone("efficientnet_lite0", tmp / "lite0-f32.onnx")
        if args.int8_model:
            models["int8"] = tmp / "lite0-int8.onnx"
            import shutil

            shutil.copyfile(args.int8_model, models["int8"])
        pre = open_model(models["fp32"], device="cpu").card.preprocessing
        small = [p for p in paths if Image.open(p).size == (500, 375)]
        result["decode_steps_500x375_us"] = {mode: decode_steps(small, pre, mode) for mode in ("fast", "exact")}
        print("decode steps, 500x375 (us/image):", json.dumps(result["decode_steps_500x375_us"], indent=1), flush=True)
        result["sets"] = {"size_mix": run_set("size mix (issue #14)", photos, paths, models, tmp / "lite0-f32.onnx",
                                              tmp, args.repeats, not args.skip_torch)}
        if args.old_images:
            old = make_photos(tmp / "old", args.old_images)
            result["sets"]["old_set"] = run_set("old set (mostly large)", tmp / "old", old, {"fp32": models["fp32"]},
                                                tmp / "lite0-f32.onnx", tmp, args.repeats, False)
        if args.memory:
            result["memory"] = memory_check(tmp)
            print("memory", json.dumps(result["memory"]), flush=True)
    result["load_avg_at_end"] = os.getloadavg()
    result["peak_rss_mib_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v.get("tables") for k, v in result["sets"].items()}, indent=1))


if __name__ == "__main__":
    main()
