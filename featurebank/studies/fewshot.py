"""How many labels: accuracy against labelled images per class, transfer vs raw pixels.

The test split is fixed once (stratified, seeded, or a separate ``test_source`` such as an
official test set) and never changes between shot counts or repeats, so every point of the
curve is measured on the same images. Training images are drawn, ``k`` per class, from the
training pool only; the pool has the test split removed, and any pool image whose bytes
equal a test image's is dropped as well, so a duplicated file cannot leak a test image
into training.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featurebank.studies.protocol import check_labels, draw_shots, holdout_split, one_blas_thread

__all__ = ["fewshot_study", "FewshotResult"]

FEATURES = ("transfer", "pixels")
CLASSIFIERS = ("linear_probe", "prototype")


def _parse_shots(shots: Sequence[int | str] | str) -> list[int | str]:
    if isinstance(shots, str):
        shots = [s.strip() for s in shots.split(",") if s.strip()]
    out: list[int | str] = []
    for s in shots:
        if isinstance(s, str) and s.lower() == "all":
            out.append("all")
            continue
        try:
            k = int(s)
        except (TypeError, ValueError):
            k = None
        if k is None or isinstance(s, bool) or k < 1 or (isinstance(s, float) and s != k):
            raise ValueError(f"shots must be positive ints or 'all' (e.g. 1,2,5,10,all); got {s!r}")
        out.append(k)
    if not out:
        raise ValueError("shots is empty; give shot counts such as 1,2,5,10,all")
    ints = sorted({k for k in out if k != "all"})
    return [*ints, *(["all"] if "all" in out else [])]


def _probe_cv(k: int) -> int | None:
    """LinearProbe's C is chosen on k-fold inner splits of the k images per class: at most
    5 folds, and impossible with a single image per class."""
    return None if k < 2 else min(5, k)


@dataclass
class FewshotResult:
    """A few-labels study.

    rows : one dict per (features, classifier, shots): ``features`` (``transfer`` or
        ``pixels``), ``classifier``, ``shots`` (int or ``"all"``), ``shots_per_class``
        (mean images per class trained on), ``accuracy_mean``, ``accuracy_std``,
        ``accuracy_runs`` (one per repeat; ``None`` where the classifier cannot be trained,
        with ``skipped`` saying why)
    draws : shots -> list (one per repeat) of int indices into the training pool
    pool_keys, test_keys : content keys (sha256 of the file bytes) of the pool and test images
    transfer_beats_pixels_from : classifier -> the smallest shot count from which transfer's
        mean accuracy beats raw pixels' at every larger count too (None if it does not win
        at the largest count)
    transfer_wins_at : classifier -> the shot counts at which transfer's mean is higher
    """

    model: dict[str, Any]
    rows: list[dict[str, Any]]
    shots: list[int | str]
    repeats: int
    seed: int
    classes: list[str]
    n_pool: int
    n_test: int
    test_protocol: dict[str, Any]
    pixels: dict[str, Any]
    draws: dict[str, list[list[int]]]
    pool_keys: list[str]
    test_keys: list[str]
    pool_paths: list[str]
    test_paths: list[str]
    transfer_beats_pixels_from: dict[str, int | str | None]
    transfer_wins_at: dict[str, list[int | str]]
    timings: dict[str, float]
    convergence_warnings: int = 0
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "fewshot",
            "model": self.model,
            "shots": self.shots,
            "repeats": self.repeats,
            "seed": self.seed,
            "classes": self.classes,
            "n_pool": self.n_pool,
            "n_test": self.n_test,
            "test_protocol": self.test_protocol,
            "pixels_baseline": self.pixels,
            "rows": self.rows,
            "transfer_beats_pixels_from": self.transfer_beats_pixels_from,
            "transfer_wins_at": self.transfer_wins_at,
            "draws": self.draws,
            "convergence_warnings": self.convergence_warnings,
            "timings_s": self.timings,
            "environment": self.environment,
        }

    def row(self, features: str, classifier: str, shots: int | str) -> dict[str, Any]:
        for r in self.rows:
            if (r["features"], r["classifier"], r["shots"]) == (features, classifier, shots):
                return r
        raise KeyError(f"no row for features={features!r}, classifier={classifier!r}, shots={shots!r}")

    def table(self) -> str:
        from featurebank.studies.report import format_table

        def cell(r):
            return "n/a" if r["accuracy_mean"] is None else f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f}"

        rows = [[str(k), *(cell(self.row(f, c, k)) for f in FEATURES for c in CLASSIFIERS)] for k in self.shots]
        header = ["shots/class", *(f"{f} {c}" for f in FEATURES for c in CLASSIFIERS)]
        return format_table(rows, header)

    def summary(self) -> str:
        lines = [
            f"{self.model['backbone']} ({self.model['layer']}, pool {self.model['pool']}): {len(self.classes)} classes, "
            f"training pool {self.n_pool}, fixed test split {self.n_test}, {self.repeats} draws per shot count "
            f"(seed {self.seed}); baseline: raw {self.pixels['mode']} pixels {self.pixels['size']}x{self.pixels['size']}",
            self.table(),
        ]
        for c, k in self.transfer_beats_pixels_from.items():
            wins = ", ".join(str(w) for w in self.transfer_wins_at[c]) or "none"
            lines.append(f"{c}: transfer beats raw pixels at every count from "
                         + ("- (not at the largest)" if k is None else f"{k} labels per class")
                         + f"; higher mean at: {wins}")
        if any(r.get("skipped") for r in self.rows):
            lines.append("n/a: " + next(r["skipped"] for r in self.rows if r.get("skipped")))
        if self.files:
            lines.append("wrote " + ", ".join(self.files.values()))
        return "\n".join(lines)


def _plot(result: FewshotResult):
    from matplotlib.figure import Figure

    per_class = {r["shots"]: r["shots_per_class"] for r in result.rows}
    x = np.array([per_class[k] for k in result.shots], dtype=np.float64)
    fig = Figure(figsize=(7.0, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    colours = {"transfer": "tab:blue", "pixels": "tab:orange"}
    styles = {"linear_probe": "-", "prototype": "--"}
    for f in FEATURES:
        for c in CLASSIFIERS:
            rows = [result.row(f, c, k) for k in result.shots]
            m = np.array([np.nan if r["accuracy_mean"] is None else r["accuracy_mean"] for r in rows])
            s = np.array([np.nan if r["accuracy_std"] is None else r["accuracy_std"] for r in rows])
            label = f"{'transfer' if f == 'transfer' else 'raw pixels'}, {c.replace('_', ' ')}"
            ax.plot(x, m, styles[c], marker="o", color=colours[f], label=label)
            ax.fill_between(x, m - s, m + s, color=colours[f], alpha=0.15, linewidth=0)
    ax.axhline(1.0 / len(result.classes), color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(x, labels=[f"all\n({v:.0f})" if k == "all" else str(k) for k, v in zip(result.shots, x)])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel(f"test accuracy (mean +- std of {result.repeats} draws)")
    ax.set_title(f"{result.model['backbone']} {result.model['layer']} vs raw pixels (test n={result.n_test})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _wins(rows: list[dict[str, Any]], shots: list[int | str], classifier: str) -> list[int | str]:
    means = {(r["features"], r["shots"]): r["accuracy_mean"] for r in rows if r["classifier"] == classifier}
    return [k for k in shots if means[("transfer", k)] is not None and means[("pixels", k)] is not None
            and means[("transfer", k)] > means[("pixels", k)]]


def _crossover(rows: list[dict[str, Any]], shots: list[int | str], classifier: str) -> int | str | None:
    def mean(f, k):
        return next(r["accuracy_mean"] for r in rows if (r["features"], r["classifier"], r["shots"]) == (f, classifier, k))

    found = None
    for k in reversed(shots):
        t, p = mean("transfer", k), mean("pixels", k)
        if t is None or p is None or not t > p:
            break
        found = k
    return found


def fewshot_study(
    source: Any,
    *,
    store: Any,
    model: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
    layer: str | None = None,
    pool: str | None = None,
    weights: str | None = None,
    shots: Sequence[int | str] | str = (1, 2, 5, 10, 20, "all"),
    repeats: int = 5,
    test_size: float | int = 0.25,
    test_source: Any = None,
    pixels: str = "gray",
    pixel_size: int = 32,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    decode_mode: str | None = None,
    device: str = "auto",
    progress: bool | None = None,
) -> FewshotResult:
    """Accuracy against the number of labelled images per class, transfer vs raw pixels.

    For each shot count ``k`` and each of ``repeats`` seeded draws, ``k`` images per class are
    drawn from the training pool; a :class:`~featurebank.classifiers.LinearProbe` and a
    :class:`~featurebank.classifiers.PrototypeClassifier` are trained on their embeddings
    (transfer) and on their raw downscaled pixels (no transfer), and all four are scored on
    the same fixed test split. ``"all"`` trains on the whole pool once (its draws would all
    be equal).

    Parameters
    ----------
    source : labelled images (class subfolders, a list file with labels, or an ImageList)
    store : store directory; vectors are cached there and reused
    model : a featurebank ONNX model with one output, or
    backbone, layer, pool, weights : a backbone exported (once, into the model cache) at
        ``layer`` (default: its default layer)
    shots : shot counts (ints >= 1 and ``"all"``), or a string ``"1,2,5,all"``
    repeats : draws per shot count
    test_size : fraction (float) or count (int) of ``source`` held out as the fixed test
        split; ignored when ``test_source`` is given
    test_source : a separate labelled test set (e.g. an official test split)
    pixels, pixel_size : the baseline's pixels: ``gray`` or ``rgb``, squashed to
        ``pixel_size`` x ``pixel_size``, each image standardised
    seed : seeds the test split, the draws and the probes' inner splits
    out_dir : when given, ``fewshot.json`` and ``fewshot.png`` are written there
    decode_mode, device : as in :func:`~featurebank.embed_into_store.embed_images`

    Returns
    -------
    FewshotResult

    Notes
    -----
    With one image per class the probe's C cannot be chosen on held-out data, so the
    linear probe is not trained at ``k=1`` (its row says so); the prototype classifier is.
    """
    from sklearn.exceptions import ConvergenceWarning

    from featurebank.artifact import read_model_card
    from featurebank.classifiers import LinearProbe, PrototypeClassifier
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.studies.data import PIXEL_MODES, embed_labelled, list_labelled, read_pixels
    from featurebank.studies.report import environment, write_figure, write_json

    t_start = time.perf_counter()
    if model is not None and (backbone is not None or layer is not None or pool is not None or weights is not None):
        raise ValueError("give model= or backbone= (with layer/pool/weights), not both")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int; got repeats={repeats!r}")
    if pixels not in PIXEL_MODES:
        raise ValueError(f"pixels must be one of {', '.join(PIXEL_MODES)}; got pixels={pixels!r}")
    shot_list = _parse_shots(shots)
    decode_mode = decode_mode or DEFAULT_DECODE_MODE

    images = list_labelled(source)
    check_labels(images.labels)
    test_images = None
    if test_source is not None:
        test_images = list_labelled(test_source)
        check_labels(test_images.labels, "test source")

    if model is None:
        from featurebank.export.cache import cached_export

        model = cached_export(backbone or "efficientnet_lite0", layers=[layer] if layer else None, pool=pool,
                              weights=weights, input_format="uint8")
    card = read_model_card(model)
    if len(card.outputs) != 1:
        raise ValueError(
            f"{model} has {len(card.outputs)} outputs ({', '.join(o.layer for o in card.outputs)}); a few-shot "
            "study needs a one-layer model: export one layer (featurebank export ... --layer NAME)"
        )
    out = card.outputs[0]

    t = time.perf_counter()
    data = embed_labelled(images, model, store=store, decode_mode=decode_mode, device=device, progress=progress)
    if test_images is not None:
        test_data = embed_labelled(test_images, model, store=store, decode_mode=decode_mode, device=device, progress=progress)
        X_pool, y_pool = data.vectors[out.name], check_labels(list(data.labels))
        X_test, y_test = test_data.vectors[out.name], check_labels(list(test_data.labels), "test source")
        pool_keys, test_keys = list(data.keys), list(test_data.keys)
        pool_paths, test_paths = list(data.paths), list(test_data.paths)
        protocol = {"kind": "test_source", "n_test": int(len(y_test))}
        unknown = sorted(set(y_test.tolist()) - set(y_pool.tolist()))
        if unknown:
            raise ValueError(f"the test source has classes the training source lacks: {unknown!r}")
    else:
        y = check_labels(list(data.labels))
        pool_idx, test_idx = holdout_split(y, test_size, seed)
        X = data.vectors[out.name]
        X_pool, y_pool, X_test, y_test = X[pool_idx], y[pool_idx], X[test_idx], y[test_idx]
        pool_keys, test_keys = [data.keys[i] for i in pool_idx], [data.keys[i] for i in test_idx]
        pool_paths, test_paths = [data.paths[i] for i in pool_idx], [data.paths[i] for i in test_idx]
        protocol = {"kind": "stratified_holdout", "test_size": test_size, "seed": int(seed)}
    t_embed = time.perf_counter() - t

    # a file whose bytes equal a test image's would put that test image into training
    test_set = set(test_keys)
    clean = np.array([k not in test_set for k in pool_keys], bool)
    protocol["pool_dropped_as_test_duplicates"] = int((~clean).sum())
    X_pool, y_pool = X_pool[clean], y_pool[clean]
    pool_keys = [k for k, c in zip(pool_keys, clean) if c]
    pool_paths = [p for p, c in zip(pool_paths, clean) if c]
    classes, pool_counts = np.unique(y_pool, return_counts=True)
    largest = max((k for k in shot_list if k != "all"), default=0)
    if largest > pool_counts.min():
        small = classes[pool_counts < largest].tolist()
        raise ValueError(
            f"shots={largest} needs {largest} training images per class; classes {small!r} have only "
            f"{int(pool_counts.min())} in the training pool. Lower the shot counts or add images"
        )

    t = time.perf_counter()
    P_pool = read_pixels(pool_paths, mode=pixels, size=pixel_size)
    P_test = read_pixels(test_paths, mode=pixels, size=pixel_size)
    t_pixels = time.perf_counter() - t
    feats = {"transfer": (X_pool, X_test), "pixels": (P_pool, P_test)}

    runs: dict[tuple[str, str, int | str], list[float | None]] = {}
    skipped: dict[tuple[str, int | str], str] = {}
    draws: dict[str, list[list[int]]] = {}
    per_class: dict[int | str, float] = {}
    n_warn = 0
    from tqdm import tqdm

    total = sum(1 if k == "all" else repeats for k in shot_list)
    bar = tqdm(total=total, unit="draw", desc="few-shot", file=sys.stderr,
               disable=not (sys.stderr.isatty() if progress is None else progress))
    t = time.perf_counter()
    for k in shot_list:
        if k == "all":
            idx_list = [np.arange(len(y_pool))]
            per_class[k] = float(len(y_pool) / len(classes))
        else:
            # one independent stream per (seed, k, repeat): adding a shot count does not change the others
            idx_list = [draw_shots(y_pool, k, np.random.default_rng([int(seed), int(k), r])) for r in range(repeats)]
            draws[str(k)] = [ix.tolist() for ix in idx_list]
            per_class[k] = float(k)
        smallest = int(np.unique(y_pool, return_counts=True)[1].min()) if k == "all" else int(k)
        cv = _probe_cv(smallest)
        for ix in idx_list:
            for f, (F_pool, F_test) in feats.items():
                for c in CLASSIFIERS:
                    key = (f, c, k)
                    if c == "linear_probe" and cv is None:
                        skipped[(c, k)] = ("the linear probe needs 2 images per class to choose C on held-out data; "
                                           "not trained at 1 shot")
                        runs.setdefault(key, []).append(None)
                        continue
                    est = LinearProbe(cv=cv, random_state=seed) if c == "linear_probe" else PrototypeClassifier()
                    with warnings.catch_warnings(record=True) as caught, one_blas_thread():
                        warnings.simplefilter("always", ConvergenceWarning)
                        est.fit(F_pool[ix], y_pool[ix])
                    n_warn += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
                    runs.setdefault(key, []).append(float(np.mean(est.predict(F_test) == y_test)))
            bar.update(1)
    bar.close()
    t_fit = time.perf_counter() - t

    rows = []
    for k in shot_list:
        for f in FEATURES:
            for c in CLASSIFIERS:
                acc = runs[(f, c, k)]
                done = [a for a in acc if a is not None]
                row = {"features": f, "classifier": c, "shots": k, "shots_per_class": per_class[k],
                       "repeats": len(acc), "accuracy_runs": acc,
                       "accuracy_mean": float(np.mean(done)) if done else None,
                       "accuracy_std": float(np.std(done)) if done else None}
                if (c, k) in skipped:
                    row["skipped"] = skipped[(c, k)]
                rows.append(row)

    result = FewshotResult(
        model={"path": str(model), "backbone": card.backbone, "layer": out.layer, "pool": out.pooling, "dim": int(out.dim),
               "weights_source": card.weights_source, "decode_mode": decode_mode},
        rows=rows, shots=shot_list, repeats=int(repeats), seed=int(seed), classes=[str(c) for c in classes],
        n_pool=int(len(y_pool)), n_test=int(len(y_test)), test_protocol=protocol,
        pixels={"mode": pixels, "size": int(pixel_size), "standardised": "per image (zero mean, unit variance)"},
        draws=draws, pool_keys=pool_keys, test_keys=list(test_keys), pool_paths=pool_paths, test_paths=list(test_paths),
        transfer_beats_pixels_from={c: _crossover(rows, shot_list, c) for c in CLASSIFIERS},
        transfer_wins_at={c: _wins(rows, shot_list, c) for c in CLASSIFIERS},
        timings={"embed": t_embed, "pixels": t_pixels, "fit": t_fit, "total": time.perf_counter() - t_start},
        convergence_warnings=n_warn, environment=environment(),
    )
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        result.files = {"json": str(out_path / "fewshot.json"), "png": str(out_path / "fewshot.png")}
        write_figure(out_path / "fewshot.png", _plot(result))
        write_json(out_path / "fewshot.json", result.to_dict())
    return result
