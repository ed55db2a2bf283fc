"""Which layer to cut at: a linear probe per layer on the same seeded stratified folds.

One export holds every layer asked for (one graph output per layer), so each image is
decoded and run through the backbone once per pooling, whatever the number of layers; the
store caches each output as its own space, so a second sweep, or a later
``featurebank embed`` with a single-layer export of the same layer, reuses the vectors.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featurebank.artifact import POOLINGS
from featurebank.studies.protocol import check_labels, make_folds, score_folds

__all__ = ["sweep_layers", "SweepResult", "stage_layers"]

POOLS = tuple(p for p in POOLINGS if p != "none")  # a sweep scores pooled vectors, not feature maps


def stage_layers(backbone: str) -> list[str]:
    """The stage outputs of ``backbone``, in order, then ``features``.

    Stages are the numbered top-level modules (``layer1`` .. ``layer4`` in a ResNet) or,
    failing that, the children of the largest numbered container (``blocks.0`` ..
    ``blocks.6`` in an EfficientNet, ``features.0`` .. in torchvision's). ``features`` (the
    map before the head) is added when it is not already the last stage.

    >>> stage_layers("efficientnet_lite0")  # doctest: +SKIP
    ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3', 'blocks.4', 'blocks.5', 'blocks.6', 'features']
    """
    from featurebank.errors import UnknownLayerError
    from featurebank.export.layers import list_layers

    infos = list_layers(backbone)
    names = [i.name for i in infos if i.name not in ("features", "logits")]
    top: dict[str, list[str]] = {}
    for n in names:
        m = re.fullmatch(r"([A-Za-z_]+?)(\d+)", n)
        if m:
            top.setdefault(m.group(1), []).append(n)
    stages = max(top.values(), key=len, default=[])
    if len(stages) < 3:
        children: dict[str, list[str]] = {}
        for n in names:
            m = re.fullmatch(r"(.+)\.(\d+)", n)
            if m:
                children.setdefault(m.group(1), []).append(n)
        stages = max(children.values(), key=len, default=[])
    if len(stages) < 2:
        raise UnknownLayerError(
            f"cannot tell the stages of {backbone} from its layer names; pass the layers to sweep "
            f"(`featurebank layers {backbone}` lists them)"
        )
    feats = next((i for i in infos if i.name == "features"), None)
    if feats is not None and (feats.alias_of or "features") != stages[-1]:
        stages.append("features")
    return stages


@dataclass
class SweepResult:
    """A layer sweep. ``rows`` holds one dict per (pooling, layer): ``layer``, ``pool``,
    ``output``, ``dim``, ``accuracy_mean``, ``accuracy_std``, ``accuracy_folds``,
    ``C_folds`` (the C each fold's probe chose), ``fit_seconds_mean``."""

    backbone: str
    weights: str | None
    rows: list[dict[str, Any]]
    n_images: int
    classes: list[str]
    folds: int
    inner_cv: Any
    seed: int
    fold_of: list[int]
    recommended: dict[str, Any]
    export_command: str
    models: dict[str, str]
    timings: dict[str, float]
    embedding: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicates_dropped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "layer_sweep",
            "backbone": self.backbone,
            "weights": self.weights,
            "protocol": {"kind": "stratified_kfold", "folds": self.folds, "seed": self.seed,
                         "classifier": f"LinearProbe(cv={self.inner_cv!r}) fitted on each training fold",
                         "fold_of": self.fold_of},
            "n_images": self.n_images,
            "duplicates_dropped": self.duplicates_dropped,
            "classes": self.classes,
            "rows": self.rows,
            "recommended": self.recommended,
            "export_command": self.export_command,
            "models": self.models,
            "embedding": self.embedding,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "timings_s": self.timings,
            "environment": self.environment,
        }

    def table(self) -> str:
        from featurebank.studies.report import format_table

        several = len({r["pool"] for r in self.rows}) > 1
        rows = []
        for r in self.rows:
            mark = "*" if (r["layer"], r["pool"]) == (self.recommended["layer"], self.recommended["pool"]) else ""
            rows.append([r["layer"] + mark, *([r["pool"]] if several else []), r["dim"],
                         f"{r['accuracy_mean']:.4f}", f"{r['accuracy_std']:.4f}", f"{r['fit_seconds_mean']:.2f}"])
        header = ["layer", *(["pool"] if several else []), "dim", "accuracy", "std", "fit_s"]
        return format_table(rows, header)

    def summary(self) -> str:
        rec = self.recommended
        lines = [
            f"{self.backbone}: linear probe, {self.folds}-fold stratified CV (seed {self.seed}), "
            f"{self.n_images} images, {len(self.classes)} classes"
            + (f" ({self.duplicates_dropped} duplicate files left out)" if self.duplicates_dropped else ""),
            self.table(),
            f"recommended: {rec['layer']} (pool {rec['pool']}, {rec['dim']}-d): accuracy "
            f"{rec['accuracy_mean']:.4f} +- {rec['accuracy_std']:.4f}",
            f"export it with:\n  {self.export_command}",
        ]
        if self.files:
            lines.append("wrote " + ", ".join(self.files.values()))
        return "\n".join(lines)


def _plot(result: SweepResult):
    from matplotlib.figure import Figure

    layers = list(dict.fromkeys(r["layer"] for r in result.rows))
    dims = {r["layer"]: r["dim"] for r in result.rows}
    pools = list(dict.fromkeys(r["pool"] for r in result.rows))
    fig = Figure(figsize=(max(6.0, 0.9 * len(layers) + 2.5), 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    for j, pool in enumerate(pools):
        rows = {r["layer"]: r for r in result.rows if r["pool"] == pool}
        offset = (j - (len(pools) - 1) / 2) * 0.08
        ax.errorbar(x + offset, [rows[l]["accuracy_mean"] for l in layers], yerr=[rows[l]["accuracy_std"] for l in layers],
                    marker="o", capsize=4, label=f"pool {pool}")
    rec = result.recommended
    ax.plot([layers.index(rec["layer"])], [rec["accuracy_mean"]], marker="*", markersize=16, color="crimson",
            linestyle="none", label=f"recommended: {rec['layer']}", zorder=5)
    ax.axhline(result.recommended["majority_baseline"], color="grey", linestyle="--", linewidth=1,
               label="majority class")
    ax.set_xticks(x, labels=[f"{l}\n{dims[l]}-d" for l in layers], fontsize=8)
    ax.set_xlabel("layer (cut point) and vector dimension")
    ax.set_ylabel(f"accuracy ({result.folds}-fold CV, mean +- std)")
    ax.set_title(f"{result.backbone}: linear probe by layer (n={result.n_images}, {len(result.classes)} classes)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _export_command(backbone: str, layer: str, pool: str, weights: str | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{backbone}-{layer}-{pool}")
    cmd = f"featurebank export {backbone} --layer {layer} --pool {pool} --input uint8"
    if weights is not None:
        cmd += f" --weights {weights}"
    return cmd + f" -o {safe}.onnx"


def sweep_layers(
    source: Any,
    *,
    backbone: str = "efficientnet_lite0",
    layers: Sequence[str] | None = None,
    all_stages: bool = False,
    pool: str | Sequence[str] = "avg",
    store: Any,
    folds: int = 5,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    inner_cv: int | float = 5,
    decode_mode: str | None = None,
    device: str = "auto",
    progress: bool | None = None,
) -> SweepResult:
    """Measure linear-probe accuracy of ``backbone`` cut at each of ``layers``.

    One export with one output per layer (per pooling), one embedding pass over
    ``source`` into ``store``, then for each layer a :class:`~featurebank.classifiers.LinearProbe`
    is fitted and scored on the same seeded stratified folds. Each fold's probe sees only
    that fold's training rows: its standardisation and its choice of C (on ``inner_cv``
    inner splits) never see the test rows.

    Parameters
    ----------
    source : labelled images: a class-subfolder tree, a list file with labels, or an ImageList
    backbone : registry / timm / ``torchvision/<name>`` backbone
    layers : layers to compare (``featurebank layers BACKBONE`` lists them); default, and
        with ``all_stages=True``: :func:`stage_layers`
    pool : pooling head, or a list of them to compare (one export and pass per pooling)
    store : store directory (vectors are cached there and reused)
    folds : outer stratified folds (every class needs at least ``folds`` images)
    seed : seeds the folds and the probes' inner splits
    out_dir : when given, ``sweep.json`` and ``sweep.png`` are written there
    weights : weights source passed to the export (None: the registry's)
    inner_cv : ``cv`` of each fold's LinearProbe (int folds or float validation fraction)
    decode_mode, device : as in :func:`~featurebank.embed_into_store.embed_images`

    Returns
    -------
    SweepResult
        ``rows`` per layer, ``recommended`` (highest mean accuracy; ties go to the smaller
        vector) and ``export_command`` reproducing that model.
    """
    from featurebank.artifact import read_model_card
    from featurebank.classifiers import LinearProbe
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.export.cache import cached_export
    from featurebank.studies.data import embed_labelled, list_labelled
    from featurebank.studies.report import environment, write_figure, write_json

    t_start = time.perf_counter()
    if layers is not None and all_stages:
        raise ValueError("give layers=[...] or all_stages=True, not both")
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise ValueError("layers is empty; name at least one layer or use all_stages=True")
    pools = [pool] if isinstance(pool, str) else list(pool)
    if not pools or any(p not in POOLS for p in pools) or len(set(pools)) != len(pools):
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or a list of distinct ones; got pool={pool!r}")
    decode_mode = decode_mode or DEFAULT_DECODE_MODE

    images = list_labelled(source)
    y_all = check_labels(images.labels)
    # validate the folds before the (slow) export and embedding
    make_folds(y_all, folds, seed)
    if layers is None:
        layers = stage_layers(backbone)

    models: dict[str, str] = {}
    data = {}
    t = time.perf_counter()
    for p in pools:
        path = cached_export(backbone, layers=list(layers), pool=p, input_format="uint8", weights=weights)
        models[p] = str(path)
        card = read_model_card(path)
        data[p] = (card, embed_labelled(images, path, store=store, decode_mode=decode_mode, device=device, progress=progress))
    t_embed = time.perf_counter() - t

    # the images that embedded under every pooling, so every row is scored on the same set;
    # a file whose bytes repeat an earlier one is dropped: in two folds it would be tested
    # on a copy of itself
    common = set.intersection(*(set(d.keys) for _, d in data.values()))
    first = next(iter(data.values()))[1]
    seen: set[str] = set()
    keep = np.zeros(len(first.keys), bool)
    for i, k in enumerate(first.keys):
        keep[i] = k in common and k not in seen
        seen.add(k)
    n_duplicates = int(sum(1 for k in first.keys if k in common) - keep.sum())
    y = first.labels[keep]
    y = check_labels(list(y))
    fold_list = make_folds(y, folds, seed)
    fold_of = np.empty(len(y), np.int64)
    for i, (_, te) in enumerate(fold_list):
        fold_of[te] = i
    classes, counts = np.unique(y, return_counts=True)

    probe = LinearProbe(cv=inner_cv, random_state=seed)
    rows = []
    from tqdm import tqdm

    units = [(p, o) for p in pools for o in data[p][0].outputs]
    bar = tqdm(total=len(units) * len(fold_list), unit="fit", desc="probing", file=sys.stderr,
               disable=not (sys.stderr.isatty() if progress is None else progress))
    t = time.perf_counter()
    for p, out in units:
        card, lv = data[p]
        order = {k: i for i, k in enumerate(lv.keys)}
        X = lv.vectors[out.name][[order[k] for k in np.asarray(first.keys)[keep]]]
        scores = score_folds(probe, X, y, fold_list, keep_estimators=True)
        bar.update(len(fold_list))
        rows.append({
            "layer": out.layer, "pool": p, "output": out.name, "dim": int(out.dim),
            "accuracy_mean": scores.mean, "accuracy_std": scores.std,
            "accuracy_folds": [float(a) for a in scores.accuracy],
            "C_folds": [float(e.C_) for e in scores.estimators],
            "fit_seconds_mean": float(scores.fit_seconds.mean()),
            "convergence_warnings": scores.convergence_warnings,
        })
    bar.close()
    t_probe = time.perf_counter() - t

    # highest mean accuracy; among equals the smaller vector, then the earlier layer
    best = min(range(len(rows)), key=lambda i: (-round(rows[i]["accuracy_mean"], 12), rows[i]["dim"], i))
    rec = {k: rows[best][k] for k in ("layer", "pool", "dim", "accuracy_mean", "accuracy_std")}
    rec["majority_baseline"] = float(counts.max() / counts.sum())
    result = SweepResult(
        backbone=backbone, weights=weights, rows=rows, n_images=int(len(y)), classes=[str(c) for c in classes],
        folds=int(folds), inner_cv=inner_cv, seed=int(seed), fold_of=fold_of.tolist(), recommended=rec,
        export_command=_export_command(backbone, rec["layer"], rec["pool"], weights), models=models,
        timings={"embed": t_embed, "probe": t_probe, "total": time.perf_counter() - t_start},
        embedding={p: {"embedded": d.embedded, "cached": d.cached} for p, (_, d) in data.items()},
        duplicates_dropped=n_duplicates,
        failed=sorted({f for _, d in data.values() for f in d.failed}), environment=environment(),
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.files = {"json": str(out / "sweep.json"), "png": str(out / "sweep.png")}
        write_figure(out / "sweep.png", _plot(result))
        write_json(out / "sweep.json", result.to_dict())
    return result
