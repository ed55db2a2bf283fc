"""INT8 vs fp32 efficientnet_lite0 on this CPU (issue #14's "Must show"), with the naive
quantization as the peer that shows what the care bought.

Three models, all with uint8 input (what ``featurebank embed --backbone`` exports):

* ``fp32``: ``cached_export("efficientnet_lite0", input_format="uint8")``;
* ``int8``: the default INT8 export, ``embed --backbone efficientnet_lite0 --precision int8
  --calibrate SOURCE`` (percentile calibration, the exclusion search, the default gates, which
  it must pass: median cosine >= 0.99, top-10 agreement >= 0.90, faster than fp32);
* ``naive``: MinMax calibration, everything quantized, no search, no gates (this CPU's
  settings: per-channel u8s8, ``reduce_range`` only without VNNI).

Data, real and offline. Photos: ``benchmarks/_photos.size_mix`` (real camera photographs in
the issue's size mix): seed 0 calibrates (64 of its 300 calibrate, the rest gate), seed 1 is
scored (cosine, neighbours, model-only speed), seed 2 is the end-to-end set; each seed crops
the photographs at other seeded positions and scales. Fashion-MNIST (Debian's
``dataset-fashion-mnist``): 1000 per class of the official train split train the linear
probe, the official 10,000-image test split tests it; the INT8 models for it are calibrated
(and gated) on 300 other train images (the user's own data, disjoint from both). scikit-image's
``lfw_subset`` (100 faces, 100 non-faces, too few to calibrate on): the photo-calibrated models,
140 train, 60 test (stratified, seeded).

Rows (each writes ``benchmarks/results/int8/<row>.json`` and is skipped when that exists;
``--force`` reruns):

* ``models``: the exports (seconds, the gates the card records, the stages kept fp32);
* ``model-speed``: model-only images/s, the three models interleaved on the same batches of
  held-out photos (batches of 16 and 32; 2 threads and 1), best and median of the rounds;
* ``embed-speed``: end-to-end ``embed_images`` images/s on the size-mix set (default decode
  mode and pipeline settings), interleaved rounds;
* ``features``: cosine of INT8 to fp32 vectors on held-out photos (median, p1, min) and top-10
  neighbour agreement;
* ``probe-fmnist``, ``probe-lfw``: linear-probe accuracy (featurebank's LinearProbe) of each
  model's vectors, plus their cosine / neighbour agreement to fp32 on the test images.

Speed rows run at normal priority on an otherwise quiet machine (the 1-minute load average at
the start is recorded); the others can run niced. ``--report`` prints the Markdown tables.

    python benchmarks/int8.py                       # all rows
    python benchmarks/int8.py --rows models features
    python benchmarks/int8.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info  # noqa: E402
from _photos import photo_sources, size_mix  # noqa: E402

ROWS = ("models", "model-speed", "embed-speed", "features", "probe-fmnist", "probe-lfw")
MODELS = ("fp32", "int8", "naive")
BACKBONE = "efficientnet_lite0"
RESULTS = HERE / "results" / "int8"
N_PHOTOS = 300
FMNIST_PER_CLASS = 1000
FMNIST_CALIBRATION = 300
NAIVE = dict(calibration_method="minmax", search_budget_s=0, min_cosine=0.0, min_knn_agreement=0.0, min_speedup=0.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_flags_line() -> str:
    from featurebank._cpu import cpu_flags

    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "avx512_bf16")
    return " ".join(f for f in wanted if f in cpu_flags())


# -- data ------------------------------------------------------------------------------------


def photos(cache: Path, seed: int) -> list[str]:
    return size_mix(cache / "photos", N_PHOTOS, seed=seed)


def fmnist(cache: Path):
    """(train paths, train y), (test paths, test y), calibration paths (train images outside the probe's)."""
    from finetune import fmnist_test, fmnist_train, write_fmnist
    from studies import FMNIST_DIR, _read_idx

    data = cache / "data"
    train = fmnist_train(data, FMNIST_PER_CLASS, 0)
    test = fmnist_test(data, 10_000, 0)
    y = _read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    used = {int(Path(p).stem.split("_")[1]) for p in train[0]}
    rest = np.array([i for i in range(len(y)) if i not in used])
    cal_idx = np.sort(np.random.default_rng(1).choice(rest, FMNIST_CALIBRATION, replace=False))
    cal, _ = write_fmnist(data, "train", cal_idx)
    return train, test, cal


def lfw(cache: Path):
    from finetune import small_set, split

    paths, y = small_set(cache / "data")
    return split(paths, y, 0.3, 0)  # 140 train, 60 test


# -- models ----------------------------------------------------------------------------------


def build_models(cache: Path, calibrate: list[str], tag: str) -> dict:
    """fp32 / int8 (default export, gated) / naive paths and the facts of their exports."""
    from featurebank.artifact import read_model_card
    from featurebank.export.cache import cached_export
    from featurebank.errors import QuantizationGateError
    from featurebank.export.quantize import DEFAULT_MIN_COSINE, quantize_model

    t0 = time.perf_counter()
    fp32 = cached_export(BACKBONE, input_format="uint8")
    t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    refused = None
    try:
        int8 = cached_export(BACKBONE, input_format="uint8", precision="int8", calibrate=calibrate)
    except QuantizationGateError as e:  # measured anyway (same recipe, gates off) and reported as refused
        refused = str(e)
        log(f"{tag}: the default INT8 export was refused: {refused}")
        int8 = cache / f"int8-{tag}-refused-by-gates.onnx"
        if not int8.is_file():
            # the search still aims at the default gate + margin (its target is min_cosine + search_margin)
            quantize_model(fp32, int8, calibrate, min_cosine=0.0, min_knn_agreement=0.0,
                           search_margin=DEFAULT_MIN_COSINE + 0.005)
    t_int8 = time.perf_counter() - t0
    naive = cache / f"naive-{tag}.onnx"
    t0 = time.perf_counter()
    if not naive.is_file():
        quantize_model(fp32, naive, calibrate, **NAIVE)
    t_naive = time.perf_counter() - t0
    out = {"paths": {"fp32": str(fp32), "int8": str(int8), "naive": str(naive)},
           "seconds": {"fp32": round(t_fp32, 1), "int8": round(t_int8, 1), "naive": round(t_naive, 1)},
           "int8_refused_by_gates": refused}
    for name in ("int8", "naive"):
        card = read_model_card(out["paths"][name])
        out[name] = {"quantization": card.quantization, "gates": card.verification["gates"],
                     "search": card.verification.get("search"), "fingerprint": card.outputs[0].fingerprint}
    out["fp32_fingerprint"] = read_model_card(fp32).outputs[0].fingerprint
    return out


def models_row(cache: Path) -> dict:
    photo_models = build_models(cache, photos(cache, 0), "photos")
    log(f"photo models: int8 export {photo_models['seconds']['int8']} s, stages kept fp32 "
        f"{(photo_models['int8']['search'] or {}).get('chosen')}")
    _, _, fm_cal = fmnist(cache)
    fm_models = build_models(cache, fm_cal, "fmnist")
    log(f"fmnist models: int8 export {fm_models['seconds']['int8']} s, stages kept fp32 "
        f"{(fm_models['int8']['search'] or {}).get('chosen')}")
    return {"photos": photo_models, "fmnist": fm_models, "photo_sources": photo_sources()}


def model_paths(which: str = "photos") -> dict[str, str]:
    row = RESULTS / "models.json"
    if not row.is_file():
        raise SystemExit("run the models row first: python benchmarks/int8.py --rows models")
    return json.loads(row.read_text())[which]["paths"]


# -- speed -----------------------------------------------------------------------------------


def model_speed_row(cache: Path, rounds: int = 5) -> dict:
    from featurebank.artifact import read_model_card
    from featurebank.decoding import decode_image
    from featurebank.embedder.session import open_model

    paths = model_paths()
    # the INT8 model calibrated on Fashion-MNIST (other stages kept fp32) timed on the same batches
    paths["int8-fmnist"] = model_paths("fmnist")["int8"]
    timed = (*MODELS, "int8-fmnist")
    card = read_model_card(paths["fp32"])
    pixels = np.stack([decode_image(p, card, mode="exact") for p in photos(cache, 1)[:64]])
    out = {}
    for threads in (2, 1):
        runners = {m: open_model(paths[m], device="cpu", threads=threads) for m in timed}
        for batch in (16, 32):
            batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
            for r in runners.values():
                r.run(batches[0])  # warm-up: first runs allocate
            times = {m: [] for m in timed}
            for _ in range(rounds):
                for m, r in runners.items():
                    t0 = time.perf_counter()
                    for b in batches:
                        r.run(b)
                    times[m].append(time.perf_counter() - t0)
            key = f"threads{threads}_batch{batch}"
            n = len(pixels)
            out[key] = {m: {"best_images_per_s": round(n / min(t), 2),
                            "median_images_per_s": round(n / statistics.median(t), 2)} for m, t in times.items()}
            for m in ("int8", "naive", "int8-fmnist"):
                out[key][m]["speedup_best"] = round(min(times["fp32"]) / min(times[m]), 3)
                out[key][m]["speedup_median"] = round(statistics.median(times["fp32"]) / statistics.median(times[m]), 3)
            log(f"{key}: " + ", ".join(f"{m} {v['best_images_per_s']:.1f}/s" for m, v in out[key].items())
                + f"; int8 {out[key]['int8']['speedup_best']:.2f}x, naive {out[key]['naive']['speedup_best']:.2f}x, "
                f"int8-fmnist {out[key]['int8-fmnist']['speedup_best']:.2f}x")
    return {"images": len(pixels), "rounds": rounds, "results": out}


def embed_speed_row(cache: Path, rounds: int = 2) -> dict:
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.embed_into_store import embed_images
    from featurebank.embedder.session import open_model

    paths = model_paths()
    images = photos(cache, 2)
    runners = {m: open_model(paths[m], device="cpu") for m in MODELS}
    for m, r in runners.items():  # warm-up (and any one-off measurement of pipeline settings)
        embed_images(images[:32], r, store=None, progress=False)
    ips = {m: [] for m in MODELS}
    for i in range(rounds):
        for m, r in runners.items():
            emb = embed_images(images, r, store=None, progress=False)
            ips[m].append(emb.report.images_per_s)
            log(f"round {i + 1}: {m} {ips[m][-1]:.1f} images/s")
    res = {m: {"best_images_per_s": round(max(v), 2), "rounds": [round(x, 2) for x in v]} for m, v in ips.items()}
    for m in ("int8", "naive"):
        res[m]["speedup"] = round(max(ips[m]) / max(ips["fp32"]), 3)
    return {"images": len(images), "decode_mode": DEFAULT_DECODE_MODE, "set": "size_mix seed 2", "results": res,
            "threads": runners["fp32"].session.get_session_options().intra_op_num_threads}


# -- features and probes -----------------------------------------------------------------------


def vectors(model: str, images: list[str], store: Path | None = None) -> np.ndarray:
    from featurebank.embed_into_store import embed_images

    emb = embed_images(images, model, store=store, device="cpu", progress=False)
    if not emb.ok.all():
        raise SystemExit(f"{int((~emb.ok).sum())} images failed to embed with {model}")
    return next(iter(emb.vectors.values()))


def agreement(ref: np.ndarray, got: np.ndarray, limit: int = 2000) -> dict:
    from featurebank.export.quantize import feature_agreement

    fig = feature_agreement(ref[:limit], got[:limit])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items()}


def features_row(cache: Path) -> dict:
    paths = model_paths()
    images = photos(cache, 1)
    vec = {m: vectors(paths[m], images) for m in MODELS}
    res = {m: agreement(vec["fp32"], vec[m]) for m in ("int8", "naive")}
    for m, r in res.items():
        log(f"{m}: median cosine {r['median_cosine']:.4f}, p1 {r['p1_cosine']:.4f}, min {r['min_cosine']:.4f}, "
            f"top-10 {r['knn_agreement']:.3f}")
    return {"set": "size_mix seed 1 (held out: calibration was seed 0)", "images": len(images), "results": res}


def probe_accuracy(X_tr, y_tr, X_te, y_te) -> float:
    from featurebank.classifiers.probe import LinearProbe

    return float(np.mean(LinearProbe().fit(X_tr, y_tr).predict(X_te) == y_te))


def probe_row(cache: Path, dataset: str) -> dict:
    if dataset == "fmnist":
        (tr_p, tr_y), (te_p, te_y), _ = fmnist(cache)
        paths = model_paths("fmnist")
    else:
        tr_p, tr_y, te_p, te_y = lfw(cache)
        paths = model_paths("photos")
    store = cache / "store"  # resumable: vectors already embedded for a model are read back
    res = {}
    fp32_test = None
    for m in MODELS:
        t0 = time.perf_counter()
        X_tr, X_te = vectors(paths[m], tr_p, store), vectors(paths[m], te_p, store)
        acc = probe_accuracy(X_tr, tr_y, X_te, te_y)
        res[m] = {"test_accuracy": round(acc, 4), "seconds": round(time.perf_counter() - t0, 1)}
        if m == "fp32":
            fp32_test = X_te
        else:
            res[m]["vs_fp32_points"] = round(100 * (acc - res["fp32"]["test_accuracy"]), 2)
            res[m]["agreement_on_test"] = agreement(fp32_test, X_te)
        log(f"{dataset} {m}: probe accuracy {acc:.4f} ({res[m]['seconds']} s)")
    return {"dataset": dataset, "train": len(tr_p), "test": len(te_p), "results": res,
            "calibrated_on": "300 Fashion-MNIST train images outside the probe's" if dataset == "fmnist"
            else "the size-mix photos (seed 0)"}


# -- report ----------------------------------------------------------------------------------


def load(row: str) -> dict | None:
    p = RESULTS / f"{row}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def report() -> str:
    lines = []
    models, ms, es, ft = load("models"), load("model-speed"), load("embed-speed"), load("features")
    any_row = next((r for r in (models, ms, es, ft, load("probe-fmnist"), load("probe-lfw")) if r), None)
    if any_row:
        mi = any_row["machine"]
        v = mi["versions"]
        lines += [f"Machine: {mi['cpu']}, {mi['cores']} cores, CPU flags {any_row.get('cpu_flags')}, kernel class "
                  f"`{any_row.get('kernel_class')}`; onnxruntime {v.get('onnxruntime-gpu') or v.get('onnxruntime')}, "
                  f"onnx {v.get('onnx')}, torch {v.get('torch')}, timm {v.get('timm')}, numpy {v.get('numpy')}.", ""]
    names = {"fp32": "fp32", "int8": "INT8 (default export)", "naive": "naive INT8 (MinMax, all quantized)"}
    if ms:
        extra = [m for m in ("int8-fmnist",) if m in next(iter(ms["results"].values()))]
        names["int8-fmnist"] = "INT8 calibrated on Fashion-MNIST"
        lines += ["Model-only images/s (the models interleaved on the same 64 held-out photos; best of "
                  f"{ms['rounds']} rounds, ratio to fp32 best / median):", "",
                  "| threads, batch | " + " | ".join(names[m] for m in (*MODELS, *extra)) + " |",
                  "|---|---|---|---|" + "---|" * len(extra)]
        for key, r in ms["results"].items():
            t, b = key.replace("threads", "").split("_batch")
            cells = [f"{r['fp32']['best_images_per_s']:.1f}"] + [
                f"{r[m]['best_images_per_s']:.1f} ({r[m]['speedup_best']:.2f}x / {r[m]['speedup_median']:.2f}x)"
                for m in ("int8", "naive", *extra)]
            lines.append(f"| {t}, {b} | " + " | ".join(cells) + " |")
        lines += [f"(load average at start {ms['machine']['load_avg_at_start'][0]:.2f})", ""]
    if es:
        r = es["results"]
        lines += [f"End-to-end `embed_images` images/s, {es['images']} size-mix JPEGs, decode mode "
                  f"{es['decode_mode']}, default pipeline settings, {len(r['fp32']['rounds'])} interleaved rounds "
                  f"(best): fp32 {r['fp32']['best_images_per_s']:.1f}, INT8 {r['int8']['best_images_per_s']:.1f} "
                  f"({r['int8']['speedup']:.2f}x), naive {r['naive']['best_images_per_s']:.1f} "
                  f"({r['naive']['speedup']:.2f}x) (load average at start "
                  f"{es['machine']['load_avg_at_start'][0]:.2f}).",
                  ""]
    rows = []
    for label, row in (("held-out photos", ft), ("Fashion-MNIST test", load("probe-fmnist")),
                       ("lfw_subset test", load("probe-lfw"))):
        if not row:
            continue
        for m in ("int8", "naive"):
            a = row["results"][m] if label == "held-out photos" else row["results"][m]["agreement_on_test"]
            rows.append(f"| {label} ({a['n']}) | {names[m]} | {a['median_cosine']:.4f} | {a['p1_cosine']:.4f} | "
                        f"{a['min_cosine']:.4f} | {a['knn_agreement']:.3f} |")
    if rows:
        lines += ["Features vs fp32 (cosine of each image's INT8 vector to its fp32 vector; share of each image's "
                  "top-10 cosine neighbours kept):", "",
                  "| images | model | median cosine | p1 | min | top-10 agreement |", "|---|---|---|---|---|---|",
                  *rows, ""]
    probes = [(label, load(row)) for label, row in (("Fashion-MNIST", "probe-fmnist"), ("lfw_subset", "probe-lfw"))]
    if any(p for _, p in probes):
        header = "| dataset (train / test) | " + " | ".join(names[m] for m in MODELS) + " |"
        lines += ["Linear-probe test accuracy:", "", header, "|---|---|---|---|"]
        for label, p in probes:
            if p:
                r = p["results"]
                cells = [f"{r['fp32']['test_accuracy']:.4f}"] + [
                    f"{r[m]['test_accuracy']:.4f} ({r[m]['vs_fp32_points']:+.2f} pts)" for m in ("int8", "naive")]
                lines.append(f"| {label} ({p['train']} / {p['test']}) | " + " | ".join(cells) + " |")
        lines.append("")
    if models:
        lines += ["The exports (gates measured at export on the calibration set's held-out images):", "",
                  "| calibrated on | model | export s | stages kept fp32 | gate median cosine | gate top-10 | "
                  "gate speed-up |", "|---|---|---|---|---|---|---|"]
        for which in ("photos", "fmnist"):
            mm = models[which]
            for m in ("int8", "naive"):
                g = mm[m]["gates"]
                fig = next(iter(g["outputs"].values()))
                kept = ", ".join((mm[m]["search"] or {}).get("chosen") or []) or "none"
                lines.append(f"| {which} | {names[m]} | {mm['seconds'][m]:.0f} | {kept} | {fig['median_cosine']:.4f} | "
                             f"{fig['knn_agreement']:.3f} | {g['speed']['speedup']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    default_cache = Path(os.environ.get("INT8_BENCH_CACHE", "/tmp/featurebank-int8-bench"))
    ap.add_argument("--cache", type=Path, default=default_cache,
                    help="photos, Fashion-MNIST PNGs, the model cache and the store (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rerun rows whose JSON exists")
    ap.add_argument("--report", action="store_true", help="print the Markdown tables and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        return 0
    from featurebank._cpu import cpu_kernel_class

    os.environ.setdefault("FEATUREBANK_CACHE", str(args.cache / "featurebank"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        out = RESULTS / f"{row}.json"
        if out.is_file() and not args.force:
            log(f"{row}: done before ({out}); --force reruns it")
            continue
        log(f"{row} ...")
        info = machine_info()
        t0 = time.perf_counter()
        if row == "models":
            res = models_row(args.cache)
        elif row == "model-speed":
            res = model_speed_row(args.cache)
        elif row == "embed-speed":
            res = embed_speed_row(args.cache)
        elif row == "features":
            res = features_row(args.cache)
        else:
            res = probe_row(args.cache, row.split("-")[1])
        res.update(machine=info, cpu_flags=cpu_flags_line(), kernel_class=cpu_kernel_class(), nice=os.nice(0),
                   wall_seconds=round(time.perf_counter() - t0, 1), when=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        os.replace(tmp, out)
        log(f"{row}: wrote {out}")
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
