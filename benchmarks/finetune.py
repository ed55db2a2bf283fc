"""Fine-tuning vs the linear probe, what an epoch costs, and training from scratch:
efficientnet_lite0 (real weights) on Fashion-MNIST (issue #13's "Must show").

Data, real and offline:

* **Fashion-MNIST** from Debian's ``dataset-fashion-mnist`` (``apt-get install
  dataset-fashion-mnist``; /usr/share/datasets/fashion-mnist). ``--per-class`` training
  images per class (seeded) from the official *train* split; the official 10,000-image *test*
  split (``--test-size`` cuts it, stratified, for smoke runs). Each image is written once as an
  RGB PNG (the 28x28 gray channel replicated) into ``--cache-dir``; the model card's
  preprocessing does the resize (bicubic to 256, 224 centre crop), as the embedder does.
* **small set** (row ``small-set``): scikit-image's ``lfw_subset`` (100 faces, 100 non-faces,
  25x25 gray), half trains, half tests (stratified, seeded): the probe should win there.

Rows (each writes ``<results-dir>/<row>.json``; a row whose JSON exists is skipped unless
``--force``; ``--rows`` picks rows):

* ``probe``: :class:`~featurebank.classifiers.probe.LinearProbe` on the frozen pooled features
  of all training images; test accuracy, wall time.
* ``ft-default``: ``featurebank finetune`` with no options: the unfreeze point its
  ``default_unfreeze`` picks for the training split's size (8000 images: ``blocks.4``), label
  smoothing and dropout before the head, the recipe below; ``--epochs`` cap.
* ``ft-default-augment``: ft-default with ``--augment light`` and ``--views`` views per image
  (augmentation is measured on the default configuration).
* ``ft-blocks.6`` / ``ft-blocks.5`` / ``ft-blocks.4``: the recipe of ``featurebank
  finetune`` without label smoothing and dropout (LP-FT: probe-initialised head, AdamW lr 1e-3 head / 1e-4 top, cosine, early
  stopping patience 3 on a stratified 20% validation split of the training images, batch norm in
  inference mode), trained on cached activations of the frozen bottom; test accuracy of the
  whole network on the decoded test images, wall time, epochs run. Epoch caps: ``--epochs``
  (blocks.6, blocks.5), ``--epochs-blocks4``.
* ``epoch-cost``: for blocks.6 and blocks.5, one epoch on ``--cost-images`` training images,
  batch 32, three ways on the same batches: ``train_top`` on cached activations; the top's own
  forward + backward + AdamW step on in-memory tensors; and the loop a typical user writes in
  torch (a DataLoader with 2 workers decoding the PNGs with PIL, resize + crop + normalise, a
  no-grad forward through the frozen bottom, then the trainable top). Targets: cached within
  1.2x of the top's own time; >= 10x faster than the typical loop for blocks.6.
* ``scratch-10`` / ``scratch-100``: the same network from random weights, the same recipe, at
  10 and 100 labels per class, every layer training (cut at ``conv_stem``: the cached
  "activations" are the preprocessed pixels), batch norm in train mode (a random network
  has no statistics to keep), a seeded random head and no early stopping (a probe on random
  features is neither a start nor a trained network): ``--epochs-scratch`` epochs, the last
  one kept.
* ``small-set``: probe vs ft-blocks.6 on the small set.

* ``ft-blocks.6-train-bn``: ft-blocks.6 with the batch norm of the trainable top in train mode
  (fastai) instead of inference mode (Keras's guide): which default ``--train-bn`` gets.
* ``ft-blocks.6-augment``: ft-blocks.6 with ``--augment light`` and ``--views`` augmented views
  per training image (each run once through the frozen bottom; each epoch trains each image on
  one of its views): augmentation on the default configuration only.

    python benchmarks/finetune.py                                  # ~3 h on 2 cores (estimate)
    python benchmarks/finetune.py --rows probe ft-blocks.6
    python benchmarks/finetune.py --per-class 20 --test-size 200 --epochs 1 --epochs-blocks4 1 \\
        --epochs-scratch 1 --cost-images 64 --results-dir /tmp/ft-smoke      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info  # noqa: E402
from studies import FMNIST_CLASSES, FMNIST_DIR, _read_idx, _stratified_subset  # noqa: E402

ROWS = ("probe", "ft-default", "ft-blocks.6", "ft-blocks.5", "ft-blocks.4", "epoch-cost", "ft-blocks.6-train-bn",
        "ft-blocks.6-augment", "ft-default-augment", "scratch-10", "scratch-100", "small-set")
BACKBONE = "efficientnet_lite0"
BATCH = 32
LR_HEAD = 1e-3  # featurebank finetune's defaults
LR_BACKBONE = LR_HEAD / 10
VAL_SPLIT = 0.2
DECODE_MODE = "fast"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ------------------------------------------------------------------------------------


def write_fmnist(cache: Path, split: str, idx: np.ndarray) -> tuple[list[str], np.ndarray]:
    """RGB PNGs of the official ``split`` ("train" / "t10k") images ``idx``, written once."""
    from PIL import Image

    if not FMNIST_DIR.is_dir():
        raise SystemExit(f"{FMNIST_DIR} is missing: apt-get install dataset-fashion-mnist")
    X = _read_idx(FMNIST_DIR / f"{split}-images-idx3-ubyte.gz")
    y = _read_idx(FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz")
    paths = []
    for i in idx:
        d = cache / "fashion_mnist" / split / FMNIST_CLASSES[y[i]]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{split}_{i:05d}.png"
        if not p.exists():
            tmp = p.with_suffix(".tmp.png")
            Image.fromarray(X[i], mode="L").convert("RGB").save(tmp)
            os.replace(tmp, p)
        paths.append(str(p))
    return paths, y[idx].astype(np.int64)


def fmnist_train(cache: Path, per_class: int, seed: int) -> tuple[list[str], np.ndarray]:
    y = _read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    return write_fmnist(cache, "train", _stratified_subset(y, per_class * 10, seed))


def fmnist_test(cache: Path, size: int, seed: int) -> tuple[list[str], np.ndarray]:
    y = _read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    idx = np.arange(len(y)) if size >= len(y) else _stratified_subset(y, size, seed)
    return write_fmnist(cache, "t10k", idx)


def small_set(cache: Path) -> tuple[list[str], np.ndarray]:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data
    faces = skimage.data.lfw_subset()
    paths, labels = [], []
    for label, sl in ((0, slice(0, 100)), (1, slice(100, 200))):
        d = cache / "lfw_subset" / ("face", "nonface")[label]
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(faces[sl]):
            p = d / f"{i:03d}.png"
            if not p.exists():
                Image.fromarray((img * 255).round().astype(np.uint8), mode="L").convert("RGB").save(p)
            paths.append(str(p))
            labels.append(label)
    return paths, np.asarray(labels, np.int64)


def split(paths: list[str], y: np.ndarray, test_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    a, b, ya, yb = train_test_split(paths, y, test_size=test_size, random_state=seed, stratify=y)
    return list(a), np.asarray(ya), list(b), np.asarray(yb)


# -- network pieces --------------------------------------------------------------------------


def build(weights: str | None, unfreeze: str, seed: int):
    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone
    from featurebank.finetune.model import split_backbone

    spec = get_backbone(BACKBONE)
    loaded = build_backbone(spec, weights, seed=seed)
    bottom, top = split_backbone(loaded.model, unfreeze)
    return spec.preprocessing, bottom, top, loaded.weights_sha256


def pixels(paths: list[str], pre, view: tuple[list[str], int, dict] | None = None) -> np.ndarray:
    """The model input (N, 3, 224, 224) float32 for ``paths``, as the embedder preprocesses;
    with ``view`` = (content keys, index, recipe), that augmented view of each image."""
    from featurebank.decoding import decode_image, to_model_input
    from featurebank.finetune.augment import augmented_view

    if view is None:
        decoded = [decode_image(p, pre, mode=DECODE_MODE) for p in paths]
    else:
        keys, v, rec = view
        decoded = [augmented_view(p, pre, k, v, rec, mode=DECODE_MODE) for p, k in zip(paths, keys)]
    return to_model_input(np.stack(decoded), pre, "float")


def content_keys(paths: list[str]) -> list[str]:
    import hashlib

    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def activations(bottom, paths: list[str], pre, what: str, view=None) -> np.ndarray:
    """The frozen bottom's output for ``paths`` (what the store caches), with progress."""
    import torch

    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), BATCH):
            v = None if view is None else (view[0][s: s + BATCH], view[1], view[2])
            out.append(bottom(torch.from_numpy(pixels(paths[s: s + BATCH], pre, v))).numpy())
            done = min(s + BATCH, len(paths))
            if (s // BATCH) % 20 == 0 or done == len(paths):
                rate = done / (time.perf_counter() - t0)
                log(f"  {what}: {done}/{len(paths)} images, {rate:.1f} img/s, ETA {(len(paths) - done) / rate:.0f} s")
    return np.concatenate(out)


def pooled(top, A: np.ndarray) -> np.ndarray:
    import torch

    top.eval()
    with torch.no_grad():
        return np.concatenate([top(torch.from_numpy(A[s: s + BATCH])).numpy() for s in range(0, len(A), BATCH)])


def test_accuracy(bottom, top, head, paths: list[str], y: np.ndarray, pre) -> float:
    """The whole network (bottom, top, head) on the decoded test images, streamed."""
    import torch

    bottom.eval(), top.eval(), head.eval()
    correct, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), BATCH):
            x = torch.from_numpy(pixels(paths[s: s + BATCH], pre))
            correct += int((head(top(bottom(x))).argmax(1).numpy() == y[s: s + BATCH]).sum())
            done = min(s + BATCH, len(paths))
            if (s // BATCH) % 40 == 0 or done == len(paths):
                rate = done / (time.perf_counter() - t0)
                log(f"  test: {done}/{len(paths)} images, {rate:.1f} img/s, ETA {(len(paths) - done) / rate:.0f} s")
    return correct / len(paths)


def lp_ft(paths, y, test_paths, test_y, *, unfreeze: str, weights: str | None, epochs: int, seed: int,
          ckpt: Path, label: str, train_bn: bool = False, augment: str = "none", views: int = 0,
          early_stopping: bool = True, regularise: bool = False) -> dict:
    """featurebank finetune's recipe from ``unfreeze``: cache the bottom's activations (and, with
    ``augment``, of ``views`` augmented views of each training image), LP head, train_top with
    early stopping on a stratified validation split; then the test accuracy."""
    from featurebank.finetune.augment import recipe
    from featurebank.finetune.head import fit_probe_head
    from featurebank.finetune.job import DROP_RATE, LABEL_SMOOTHING
    from featurebank.finetune.train import train_top

    t0 = time.perf_counter()
    # regularise: featurebank finetune's label smoothing and dropout (the rows measured before they became the
    # default ran without them: their JSON's recipe says so)
    reg = {"label_smoothing": LABEL_SMOOTHING, "drop_rate": DROP_RATE} if regularise else {}
    pre, bottom, top, weights_sha = build(weights, unfreeze, seed)
    tr_p, tr_y, va_p, va_y = split(paths, y, VAL_SPLIT, seed)
    A_tr = activations(bottom, tr_p, pre, f"{label} frozen layers (train)")
    A_va = activations(bottom, va_p, pre, f"{label} frozen layers (val)")
    rec = recipe(augment)
    A_views = []
    if rec is not None:
        keys = content_keys(tr_p)
        A_views = [activations(bottom, tr_p, pre, f"{label} frozen layers (train, view {v})", view=(keys, v, rec))
                   for v in range(1, views + 1)]
    t_cache = time.perf_counter() - t0
    if early_stopping:
        head, probe = fit_probe_head(pooled(top, A_tr), tr_y)
        probe_val = float(np.mean(probe.predict(pooled(top, A_va).astype(np.float32)) == va_y))
    else:  # from scratch: a probe on random features is no start for a network whose every layer trains
        import torch

        torch.manual_seed(seed)
        head, probe_val = torch.nn.Linear(pooled(top, A_tr[:1]).shape[1], int(tr_y.max()) + 1), None
    t_probe = time.perf_counter() - t0 - t_cache
    log(f"  {label}: head ready (LP val acc {probe_val}); training up to {epochs} epochs")
    trained = train_top([A_tr, *A_views] if A_views else A_tr, tr_y, top, head, epochs=epochs, lr_head=LR_HEAD,
                        lr_backbone=LR_BACKBONE, seed=seed, val=(A_va, va_y) if early_stopping else None,
                        train_bn=train_bn, checkpoint_dir=ckpt, progress=True, **reg)
    t_train = time.perf_counter() - t0 - t_cache - t_probe
    for h in trained.history:
        log(f"  {label} epoch {h['epoch']}: train loss {h['train_loss']}, val acc {h['val_accuracy']}, "
            f"{h.get('images_per_s')} img/s")
    t1 = time.perf_counter()
    acc = test_accuracy(bottom, top, head, test_paths, test_y, pre)
    return {
        "unfreeze": unfreeze, "weights": weights or "registry", "weights_sha256": weights_sha,
        "n_train": len(tr_p), "n_val": len(va_p), "n_test": len(test_paths),
        "epoch_cap": epochs, "epochs_run": sum(1 for h in trained.history if h["epoch"] > 0), "best_epoch": trained.best_epoch,
        "stopped": trained.stopped, "resumed_from": trained.resumed_from,
        "lp_head_val_accuracy": probe_val, "best_val_accuracy": trained.best_val_accuracy,
        "test_accuracy": acc, "history": trained.history,
        "recipe": {"lr_head": LR_HEAD, "lr_backbone": LR_BACKBONE, "val_split": VAL_SPLIT, "batch_size": BATCH,
                   "patience": 3 if early_stopping else None, "train_bn": train_bn, "init": "linear probe (LP-FT)" if early_stopping else "random head",
                   "augment": rec,
                   "views": len(A_views), "label_smoothing": reg.get("label_smoothing", 0.0),
                   "drop_rate": reg.get("drop_rate", 0.0)},
        "seconds": {"frozen_layers": t_cache, "probe_head": t_probe, "train": t_train,
                    "total_to_model": t1 - t0, "test_eval": time.perf_counter() - t1},
    }


def _lite0():
    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone

    return build_backbone(get_backbone(BACKBONE), "random", seed=0).model


def probe_row(paths, y, test_paths, test_y, seed: int) -> dict:
    from featurebank.finetune.head import fit_probe_head

    t0 = time.perf_counter()
    pre, bottom, top, weights_sha = build(None, "blocks.6", seed)
    A = activations(bottom, paths, pre, "probe frozen layers (train)")
    head, probe = fit_probe_head(pooled(top, A), y)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    acc = test_accuracy(bottom, top, head, test_paths, test_y, pre)
    return {"n_train": len(paths), "n_test": len(test_paths), "weights_sha256": weights_sha,
            "probe_C": float(probe.C_), "test_accuracy": acc,
            "seconds": {"features_and_fit": t_fit, "test_eval": time.perf_counter() - t1}}


# -- epoch cost ------------------------------------------------------------------------------


class _PngDataset:
    """What a typical user writes: PIL decode, resize the shorter side, centre crop, normalise."""

    def __init__(self, paths, y, pre):
        self.paths, self.y, self.pre = paths, y, pre

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        _, h, w = self.pre.input_size
        side = int(round(h / self.pre.crop_pct))
        img = Image.open(self.paths[i]).convert("RGB")
        s = side / min(img.size)
        img = img.resize((max(side, round(img.size[0] * s)), max(side, round(img.size[1] * s))), Image.BICUBIC)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        x = np.asarray(img.crop((left, top, left + w, top + h)), np.float32) / 255.0
        x = (x - np.asarray(self.pre.mean, np.float32)) / np.asarray(self.pre.std, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), int(self.y[i])


def epoch_cost(paths, y, unfreeze: str, seed: int) -> dict:
    import torch
    from torch import nn

    from featurebank.finetune.train import batch_loss, set_train_modes, train_top

    pre, bottom, top, _ = build(None, unfreeze, seed)
    A = activations(bottom, paths, pre, f"epoch-cost {unfreeze} frozen layers")
    torch.manual_seed(seed)  # the head's start does not change an epoch's cost: no probe fit here
    head = nn.Linear(pooled(top, A[:1]).shape[1], int(y.max()) + 1)
    init = {k: v.clone() for k, v in {**top.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}.items()}

    def reset():
        top.load_state_dict({k: v for k, v in init.items() if not k.startswith("head.")})
        head.load_state_dict({k[5:]: v for k, v in init.items() if k.startswith("head.")})

    def optimizer():
        return torch.optim.AdamW([{"params": [p for p in top.parameters() if p.requires_grad], "lr": LR_BACKBONE},
                                  {"params": head.parameters(), "lr": LR_HEAD}], weight_decay=0.01)

    order = np.random.default_rng(seed).permutation(len(paths))
    batches = [order[s: s + BATCH] for s in range(0, len(order), BATCH)]

    # warm-up (one forward + backward) so the first timed loop does not pay torch's first-call costs
    reset()
    set_train_modes(top, head, False)
    loss, _ = batch_loss(top, head, torch.from_numpy(A[:BATCH]), torch.from_numpy(y[:BATCH]))
    loss.backward()
    top.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True)

    # 1. train_top, one epoch on the cached activations (no validation, no checkpoints)
    reset()
    t0 = time.perf_counter()
    train_top(A, y, top, head, epochs=1, lr_head=LR_HEAD, lr_backbone=LR_BACKBONE, seed=seed, val=None,
              checkpoint_dir=None, patience=None, progress=False)
    cached = time.perf_counter() - t0
    log(f"  {unfreeze}: cached epoch {cached:.2f} s")

    # 2. the top's own forward + backward + step on in-memory tensors, the same batches
    reset()
    At, yt = torch.from_numpy(A), torch.from_numpy(y)
    opt = optimizer()
    set_train_modes(top, head, False)
    t0 = time.perf_counter()
    for b in batches:
        ib = torch.from_numpy(b)
        opt.zero_grad(set_to_none=True)
        loss, _ = batch_loss(top, head, At[ib], yt[ib])
        loss.backward()
        opt.step()
    own = time.perf_counter() - t0
    log(f"  {unfreeze}: top's own forward+backward {own:.2f} s")

    # 3. the typical torch loop: DataLoader decoding PNGs (2 workers), no-grad bottom, the top
    reset()
    opt = optimizer()
    loader = torch.utils.data.DataLoader(_PngDataset(paths, y, pre), batch_size=BATCH, num_workers=2,
                                         sampler=[int(i) for b in batches for i in b])
    bottom.eval()
    set_train_modes(top, head, False)
    t0 = time.perf_counter()
    for x, yb in loader:
        with torch.no_grad():
            a = bottom(x)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(top(a)), yb)
        loss.backward()
        opt.step()
    typical = time.perf_counter() - t0
    log(f"  {unfreeze}: typical loop {typical:.2f} s")
    return {"unfreeze": unfreeze, "n_images": len(paths), "batch_size": BATCH,
            "activation_shape": list(A.shape[1:]),
            "seconds_per_epoch": {"cached_train_top": cached, "top_own_forward_backward": own,
                                  "typical_torch_loop": typical},
            "cached_over_own": cached / own, "typical_over_cached": typical / cached,
            "targets": {"cached_over_own_max": 1.2, "typical_over_cached_min_blocks6": 10.0}}


# -- driver ----------------------------------------------------------------------------------


def report(results_dir: Path) -> str:
    """The Markdown table of RESULTS.md from the rows' JSON files (those that exist)."""
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    probe = rows.get("probe", {}).get("test_accuracy")
    lines = ["| configuration | test accuracy | vs probe | epochs run (cap) / best | wall time to model | test eval |",
             "|---|---:|---:|---|---:|---:|"]

    def line(name, r, vs):
        acc = r["test_accuracy"]
        diff = "" if vs is None or r is rows.get("probe") else f"{100 * (acc - vs):+.1f} pts"
        ep = f"{r['epochs_run']} ({r['epoch_cap']}) / {r['best_epoch']}" if "epochs_run" in r else ""
        sec = r.get("seconds", {})
        wall = sec.get("total_to_model", sec.get("features_and_fit"))
        lines.append(f"| {name} | {acc:.4f} | {diff} | {ep} | {wall / 60:.1f} min | {sec.get('test_eval', 0) / 60:.1f} min |")

    names = {"probe": "linear probe (frozen features)",
             "ft-default": "fine-tune, defaults (from " + rows.get("ft-default", {}).get("unfreeze", "?") + ", smoothing + dropout)",
             "ft-default-augment": "defaults, --augment light",
             "ft-blocks.6": "fine-tune from blocks.6",
             "ft-blocks.5": "fine-tune from blocks.5", "ft-blocks.4": "fine-tune from blocks.4",
             "ft-blocks.6-train-bn": "blocks.6, --train-bn", "ft-blocks.6-augment": "blocks.6, --augment light",
             "scratch-100": "from scratch, 100 labels/class", "scratch-10": "from scratch, 10 labels/class"}
    for key, name in names.items():
        if key in rows:
            recipe = rows[key].get("recipe", {})
            if key.startswith("ft-blocks") and not recipe.get("label_smoothing"):
                name += " (no smoothing / dropout)"  # measured before they became the defaults
            line(name, rows[key], probe)
    if "small-set" in rows:
        r = rows["small-set"]
        line("small set: linear probe", r["probe"], None)
        line("small set: fine-tune, defaults (from blocks.6)", r["ft-blocks.6"], r["probe"]["test_accuracy"])
    if "epoch-cost" in rows:
        lines += ["", "| trainable part | images | cached epoch (train_top) | top's own fwd+bwd | typical torch loop | "
                  "cached / own | typical / cached |", "|---|---:|---:|---:|---:|---:|---:|"]
        for c in rows["epoch-cost"]["configs"]:
            s = c["seconds_per_epoch"]
            lines.append(f"| {c['unfreeze']} + head ({' x '.join(map(str, c['activation_shape']))} in) | {c['n_images']} | "
                         f"{s['cached_train_top']:.2f} s | {s['top_own_forward_backward']:.2f} s | "
                         f"{s['typical_torch_loop']:.2f} s | {c['cached_over_own']:.2f}x | {c['typical_over_cached']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--per-class", type=int, default=1000, help="training images per class (official train split)")
    ap.add_argument("--test-size", type=int, default=10000, help="test images (official test split; 10000 = all)")
    ap.add_argument("--epochs", type=int, default=10, help="epoch cap of ft-blocks.6 / ft-blocks.5 / small-set")
    ap.add_argument("--epochs-blocks4", type=int, default=6, help="epoch cap of ft-blocks.4")
    ap.add_argument("--epochs-scratch", type=int, default=15, help="epoch cap of the from-scratch rows")
    ap.add_argument("--views", type=int, default=4, help="augmented views per image in ft-blocks.6-augment "
                    "(featurebank finetune's default)")
    ap.add_argument("--cost-images", type=int, default=1024, help="training images in the epoch-cost row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", type=Path, default=HERE / "results" / "finetune")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "featurebank-finetune-cache")
    ap.add_argument("--force", action="store_true", help="re-run rows whose JSON exists")
    ap.add_argument("--report", action="store_true", help="print the Markdown tables of the rows run so far and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.results_dir))
        return 0

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    log(f"settings: {json.dumps(settings)}")
    log(f"epoch caps: ft-blocks.6/5 and small-set {args.epochs}, ft-blocks.4 {args.epochs_blocks4}, "
        f"from scratch {args.epochs_scratch}")
    t_all = time.perf_counter()
    cache = args.cache_dir
    train_p, train_y = fmnist_train(cache, args.per_class, args.seed)
    test_p, test_y = fmnist_test(cache, args.test_size, args.seed)
    log(f"Fashion-MNIST: {len(train_p)} training, {len(test_p)} test PNGs in {cache}")
    ckpts = args.results_dir / "checkpoints"

    def scratch_subset(n: int):
        rng = np.random.default_rng(args.seed)
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(train_y == c), min(n, int((train_y == c).sum())),
                                                 replace=False) for c in range(10)]))
        return [train_p[i] for i in idx], train_y[idx]

    results = {}
    for row in args.rows:
        out = args.results_dir / f"{row}.json"
        if out.exists() and not args.force:
            log(f"{row}: {out} exists, skipped (--force to re-run)")
            results[row] = json.loads(out.read_text())
            continue
        log(f"{row}: start")
        t0 = time.perf_counter()
        machine = machine_info()
        if row == "probe":
            res = probe_row(train_p, train_y, test_p, test_y, args.seed)
        elif row.startswith("ft-default"):
            from featurebank.finetune.job import default_unfreeze

            # what `featurebank finetune` does with no options on this set (the unfreeze point chosen by the
            # number of training images, label smoothing and dropout); -augment: with --augment light
            n_fit = len(train_p) - round(VAL_SPLIT * len(train_p))
            unfreeze = default_unfreeze(_lite0(), n_fit)
            aug = row.endswith("-augment")
            res = lp_ft(train_p, train_y, test_p, test_y, unfreeze=unfreeze, weights=None, seed=args.seed,
                        epochs=args.epochs, ckpt=ckpts / row, label=row, regularise=True,
                        augment="light" if aug else "none", views=args.views if aug else 0)
            res["default_unfreeze_for_n_train"] = n_fit
        elif row.startswith("ft-"):
            unfreeze = row[3:].split("-")[0]
            res = lp_ft(train_p, train_y, test_p, test_y, unfreeze=unfreeze, weights=None, seed=args.seed,
                        epochs=args.epochs_blocks4 if unfreeze == "blocks.4" else args.epochs,
                        ckpt=ckpts / row, label=row, train_bn=row.endswith("-train-bn"),
                        augment="light" if row.endswith("-augment") else "none",
                        views=args.views if row.endswith("-augment") else 0)
        elif row == "epoch-cost":
            n = min(args.cost_images, len(train_p))
            sub = _stratified_subset(train_y, n, args.seed)
            p, y = [train_p[i] for i in sub], train_y[sub]
            res = {"configs": [epoch_cost(p, y, u, args.seed) for u in ("blocks.6", "blocks.5")]}
        elif row.startswith("scratch-"):
            n = int(row.split("-")[1])
            p, y = scratch_subset(n)
            # batch norm in train mode: a random network has no statistics to keep; a random head, every epoch,
            # the last one kept: a probe on random features is neither a start nor a candidate (fewshot --scratch
            # does the same)
            res = lp_ft(p, y, test_p, test_y, unfreeze="conv_stem", weights="random", seed=args.seed,
                        epochs=args.epochs_scratch, ckpt=ckpts / row, label=row, train_bn=True, early_stopping=False)
            res["labels_per_class"] = n
        else:  # small-set
            p, y = small_set(cache)
            tr_p, tr_y, te_p, te_y = split(p, y, 0.5, args.seed)
            res = {"set": "skimage lfw_subset (face vs non-face, 25x25 gray)",
                   "probe": probe_row(tr_p, tr_y, te_p, te_y, args.seed),
                   # the defaults: 100 training images -> the last stage, smoothing and dropout
                   "ft-blocks.6": lp_ft(tr_p, tr_y, te_p, te_y, unfreeze="blocks.6", weights=None, seed=args.seed,
                                        epochs=args.epochs, ckpt=ckpts / row, label=row, regularise=True)}
        res.update(row=row, backbone=BACKBONE, wall_seconds=time.perf_counter() - t0, machine=machine,
                   settings=settings, dataset="Fashion-MNIST (dataset-fashion-mnist)" if row != "small-set" else res["set"])
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2, default=float))
        os.replace(tmp, out)
        results[row] = res
        log(f"{row}: done in {res['wall_seconds']:.0f} s -> {out}")

    print(f"\nsummary ({time.perf_counter() - t_all:.0f} s this run; train {len(train_p)}, test {len(test_p)})")
    print(f"{'row':<14} {'test acc':>9} {'epochs':>7} {'wall s':>8}  notes")
    for row, r in results.items():
        if row == "epoch-cost":
            for c in r["configs"]:
                s = c["seconds_per_epoch"]
                print(f"{'cost ' + c['unfreeze']:<14} {'':>9} {'':>7} {'':>8}  cached {s['cached_train_top']:.2f} s, "
                      f"own {s['top_own_forward_backward']:.2f} s, typical {s['typical_torch_loop']:.2f} s: "
                      f"cached/own {c['cached_over_own']:.2f}x, typical/cached {c['typical_over_cached']:.1f}x")
        elif row == "small-set":
            print(f"{'small probe':<14} {r['probe']['test_accuracy']:>9.4f} {'':>7} {r['wall_seconds']:>8.0f}")
            f = r["ft-blocks.6"]
            print(f"{'small ft-b6':<14} {f['test_accuracy']:>9.4f} {f['epochs_run']:>7}")
        elif "epochs_run" in r:
            print(f"{row:<14} {r['test_accuracy']:>9.4f} {r['epochs_run']:>7} {r['wall_seconds']:>8.0f}  "
                  f"cap {r['epoch_cap']}, best epoch {r['best_epoch']}, {r['stopped']}")
        else:
            print(f"{row:<14} {r['test_accuracy']:>9.4f} {'':>7} {r['wall_seconds']:>8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
