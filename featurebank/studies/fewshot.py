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
#: the opt-in curves of training runs (``finetune=True``, ``scratch=True``): their rows'
#: ``features``, all with ``classifier`` "finetune"
CURVES = ("finetuned", "scratch")
MAX_FINETUNE_SHOTS = 100
MAX_FINETUNE_REPEATS = 3


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
    finetune : None unless fine-tuning curves were asked for (``finetune=True`` or
        ``scratch=True``); then their settings, ``runs`` and ``seconds`` (training runs and
        their wall time), and the comparisons, each over the draws both curves share (the
        first ``repeats`` of the probe's): ``finetune_beats_probe_from`` (the smallest count
        at which the fine-tuned mean beats the transfer linear probe's and is not lower at any
        larger trained count, ties allowed as both saturate; None if behind or level at the
        largest), ``finetune_wins_at``, and
        ``pretrained_vs_scratch`` (shot count -> the ``finetuned`` and ``scratch`` means and
        ``pretrained_higher``: whether the pretrained network fine-tuned beats the same
        network trained from random weights)
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
    finetune: dict[str, Any] | None = None

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
            "finetune": self.finetune,
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

        columns = [(f, c) for f in FEATURES for c in CLASSIFIERS] + [(f, "finetune") for f in self._curves()]
        rows = [[str(k), *(cell(self.row(f, c, k)) for f, c in columns)] for k in self.shots]
        header = ["shots/class", *(f"{f} {c}" for f, c in columns)]
        return format_table(rows, header)

    def _curves(self) -> list[str]:
        present = {r["features"] for r in self.rows}
        return [f for f in CURVES if f in present]

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
        if self.finetune is not None:
            lines.extend(_finetune_summary(self.finetune))
        reasons = dict.fromkeys(r["skipped"] for r in self.rows if r.get("skipped"))
        lines.extend(f"n/a: {why}" for why in reasons)
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
    curve_style = {"finetuned": ("tab:green", "fine-tuned"), "scratch": ("tab:red", "from scratch (random weights)")}
    for f in result._curves():
        rows = [result.row(f, "finetune", k) for k in result.shots]
        m = np.array([np.nan if r["accuracy_mean"] is None else r["accuracy_mean"] for r in rows])
        s = np.array([np.nan if r["accuracy_std"] is None else r["accuracy_std"] for r in rows])
        colour, label = curve_style[f]
        if f == "finetuned":
            label += f" from {result.finetune['unfreeze']}"
        ax.plot(x, m, "-", marker="s", color=colour, label=f"{label} ({result.finetune['repeats']} draws)")
        ax.fill_between(x, m - s, m + s, color=colour, alpha=0.15, linewidth=0)
    ax.axhline(1.0 / len(result.classes), color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(x, labels=[f"all\n({v:.0f})" if k == "all" else str(k) for k, v in zip(result.shots, x)])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel(f"test accuracy (mean +- std of {result.repeats} draws)")
    tuned = " and fine-tuned" if result._curves() else ""
    ax.set_title(f"{result.model['backbone']} {result.model['layer']}{tuned} vs raw pixels (test n={result.n_test})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _means(rows: list[dict[str, Any]], features: str, classifier: str, n: int | None = None) -> dict[int | str, float | None]:
    """Shot count -> mean accuracy of the (features, classifier) rows over their first ``n``
    draws (all with None), leaving out runs that could not be trained."""
    out: dict[int | str, float | None] = {}
    for r in rows:
        if (r["features"], r["classifier"]) == (features, classifier):
            done = [a for a in r["accuracy_runs"][:n] if a is not None]
            out[r["shots"]] = float(np.mean(done)) if done else None
    return out


def _higher(a: dict[int | str, float | None], b: dict[int | str, float | None], k: int | str) -> bool:
    return a.get(k) is not None and b.get(k) is not None and a[k] > b[k]


def _wins(a: dict[int | str, float | None], b: dict[int | str, float | None], shots: list[int | str]) -> list[int | str]:
    """The shot counts at which ``a``'s mean is higher than ``b``'s."""
    return [k for k in shots if _higher(a, b, k)]


def _crossover(a: dict[int | str, float | None], b: dict[int | str, float | None], shots: list[int | str], *,
               ties: bool = False) -> int | str | None:
    """The smallest shot count from which ``a`` beats ``b`` at every larger count too; with
    ``ties``, from which ``a`` beats ``b`` and is not behind at any larger count (both curves
    saturate: at 100% accuracy neither can beat the other)."""
    found = None
    for k in reversed(shots):
        if _higher(a, b, k):
            found = k
        elif not (ties and a.get(k) is not None and a.get(k) == b.get(k)):
            break
    return found


def _finetune_summary(ft: dict[str, Any]) -> list[str]:
    lines = [f"fine-tuning curves: {ft['runs']} training runs in {ft['seconds']:.0f} s, {ft['repeats']} draws per count "
             f"(the probe's first), at most {ft['epochs']} epochs each (lr {ft['lr_head']:g} head, "
             f"{ft['lr_backbone']:g} below it); early stopping on 20% of the draw from {ft['val_min_shots']} per class"]
    if "finetuned" in ft["curves"]:
        wins = ", ".join(str(w) for w in ft["finetune_wins_at"]) or "none"
        k = ft["finetune_beats_probe_from"]
        lines.append(f"fine-tuned ({ft['backbone']} from {ft['unfreeze']}, {ft['weights_source']}): overtakes the "
                     "transfer linear probe "
                     + ("- (behind or level at the largest count)" if k is None
                        else f"from {k} labels per class (higher there, never lower at a larger count)")
                     + f"; higher mean at: {wins}")
    if "finetuned" in ft["curves"] and "scratch" in ft["curves"]:
        parts = []
        for k, c in ft["pretrained_vs_scratch"].items():
            verdict = "pretrained higher" if c["pretrained_higher"] else "pretrained NOT higher"
            parts.append(f"{k}: {c['finetuned']:.4f} vs {c['scratch']:.4f} ({verdict})")
        lines.append("pretrained vs the same network from random weights: " + "; ".join(parts))
    return lines


def _check_curve_args(curves: list[str], model: Any, shots: list[int | str], repeats: int,
                      finetune_repeats: int | None, unfreeze: str | None, epochs: int | None) -> tuple[int, int]:
    """(draws per shot count, epochs) of the fine-tuning curves, each argument checked."""
    if not curves:
        given = [n for n, v in (("finetune_repeats", finetune_repeats), ("unfreeze", unfreeze), ("epochs", epochs))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set the fine-tuning curves; pass finetune=True or scratch=True "
                             "(--finetune / --scratch)")
        return 0, 0
    if model is not None:
        raise ValueError("fine-tuning needs a torch network: pass backbone= (--backbone NAME, with --weights) instead "
                         "of model= (--model); an ONNX file cannot be trained")
    if unfreeze is not None and "finetuned" not in curves:
        raise ValueError("unfreeze sets where the pretrained network's training starts (the from-scratch curve trains "
                         "every layer); pass finetune=True (--finetune) or drop unfreeze")
    over = [k for k in shots if k != "all" and k > MAX_FINETUNE_SHOTS]
    if over:
        raise ValueError(f"fine-tuning curves take at most {MAX_FINETUNE_SHOTS} labels per class (each point is a "
                         f"training run); got shots={over[0]}: lower the shot counts or leave out --finetune/--scratch")
    if all(k == "all" for k in shots):
        raise ValueError(f"fine-tuning curves need shot counts of at most {MAX_FINETUNE_SHOTS} (e.g. 1,5,10); "
                         "'all' is not trained")
    most = min(repeats, MAX_FINETUNE_REPEATS)
    n = most if finetune_repeats is None else finetune_repeats
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise ValueError(f"finetune_repeats must be an int from 1 to {most} (at most {MAX_FINETUNE_REPEATS}, and "
                         f"at most repeats={repeats}); got finetune_repeats={finetune_repeats!r}")
    epochs = 10 if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int; got epochs={epochs!r}")
    return n, epochs


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _run_curves(nets: dict[str, Any], *, epochs: int, repeats: int, shots: list[int | str],
                draws: dict[str, list[list[int]]], pool_paths: list[str], y_pool: np.ndarray, test_paths: list[str],
                y_test: np.ndarray, classes: np.ndarray, seed: int, progress: bool | None) -> dict[str, Any]:
    """One training run per (curve, shot count, draw): the first ``repeats`` draws of the
    probe's, scored on the same test split. The frozen bottom runs once over the images any
    of those draws holds and over the test split."""
    from featurebank.finetune.curve import LR_HEAD, VAL_FRACTION, VAL_MIN_SHOTS, finetune_point

    say = progress is not False  # plain lines (runs done, ETA): wanted in a log file too
    bars = sys.stderr.isatty() if progress is None else bool(progress)
    ints = [k for k in shots if k != "all"]
    index = {c: i for i, c in enumerate(classes.tolist())}
    yp = np.asarray([index[c] for c in y_pool.tolist()], np.int64)
    yt = np.asarray([index[c] for c in y_test.tolist()], np.int64)
    used = sorted({i for k in ints for d in draws[str(k)][:repeats] for i in d})
    pos = {i: j for j, i in enumerate(used)}

    t0 = time.perf_counter()
    acts = {f: (net.activations([pool_paths[i] for i in used], progress=bars), net.activations(test_paths, progress=bars))
            for f, net in nets.items()}
    t_act = time.perf_counter() - t0
    plan = [(k, r, f) for k in ints for r in range(repeats) for f in nets]
    if say:
        print(f"fine-tuning curves: {len(plan)} training runs ({' and '.join(nets)}: {len(ints)} shot counts x "
              f"{repeats} draws), each up to {epochs} epochs; the ETA follows the first run", file=sys.stderr)

    def work(k: int) -> float:  # a run costs about its training images x epochs, plus one pass over the test split
        return k * len(classes) * epochs + len(yt)

    spent = {f: [0.0, 0.0] for f in nets}  # seconds, work
    done: dict[tuple[str, int], list[tuple[Any, np.ndarray]]] = {}
    for n, (k, r, f) in enumerate(plan, 1):
        ix = np.asarray(draws[str(k)][r], np.int64)
        A, A_test = acts[f]
        with one_blas_thread():  # the head's probe fit, as the study's own probes
            point = finetune_point(nets[f], A[[pos[i] for i in ix]], yp[ix], A_test, yt, epochs=epochs, seed=seed)
        done.setdefault((f, k), []).append((point, ix))
        spent[f][0] += point.seconds
        spent[f][1] += work(k)
        if say:
            overall = sum(s for s, _ in spent.values()) / sum(w for _, w in spent.values())
            eta = sum(work(kk) * (spent[ff][0] / spent[ff][1] if spent[ff][1] else overall) for kk, _, ff in plan[n:])
            print(f"fine-tuning {n}/{len(plan)} runs ({f}, {k} per class, draw {r + 1}: accuracy {point.accuracy:.3f} "
                  f"in {point.seconds:.1f} s), ETA {_duration(eta)}", file=sys.stderr)

    points: dict[tuple[str, int | str], dict[str, Any]] = {}
    for f in nets:
        points[(f, "all")] = {"repeats": 1, "accuracy_runs": [None], "accuracy_mean": None, "accuracy_std": None,
                              "skipped": f"fine-tuning curves stop at {MAX_FINETUNE_SHOTS} labels per class (each "
                              "point is a training run); not trained on all"}
        for k in ints:
            runs = done[(f, k)]
            acc = [p.accuracy for p, _ in runs]
            points[(f, k)] = {
                "repeats": len(runs), "accuracy_runs": acc, "accuracy_mean": float(np.mean(acc)),
                "accuracy_std": float(np.std(acc)), "start_accuracy_runs": [p.start_accuracy for p, _ in runs],
                "head_init": runs[0][0].head_init, "best_epoch_runs": [p.best_epoch for p, _ in runs],
                "seconds_runs": [p.seconds for p, _ in runs],
                "train_pool_indices": [ix[p.train_index].tolist() for p, ix in runs],
                "val_pool_indices": [ix[p.val_index].tolist() for p, ix in runs],
            }
    first = next(iter(nets.values()))
    pretrained = nets.get("finetuned")
    return {
        "curves": list(nets), "backbone": first.backbone,
        "weights_source": pretrained.weights_source if pretrained is not None else None,
        "unfreeze": pretrained.unfreeze if pretrained is not None else None,
        "scratch_weights_source": nets["scratch"].weights_source if "scratch" in nets else None,
        "epochs": epochs, "lr_head": LR_HEAD, "lr_backbone": LR_HEAD / 10, "repeats": repeats,
        "val_min_shots": VAL_MIN_SHOTS, "val_fraction": VAL_FRACTION, "runs": len(plan),
        "seconds": time.perf_counter() - t0, "activation_seconds": t_act, "points": points,
    }


def _compare_curves(ft: dict[str, Any], rows: list[dict[str, Any]], shots: list[int | str]) -> dict[str, Any]:
    """The curves' settings with the comparisons, over the draws the curves share with the probe."""
    ints = [k for k in shots if k != "all"]
    out = {k: v for k, v in ft.items() if k != "points"}
    if "finetuned" in ft["curves"]:
        tuned, probe = _means(rows, "finetuned", "finetune"), _means(rows, "transfer", "linear_probe", ft["repeats"])
        out["finetune_beats_probe_from"] = _crossover(tuned, probe, ints, ties=True)
        out["finetune_wins_at"] = _wins(tuned, probe, ints)
        if "scratch" in ft["curves"]:
            scratch = _means(rows, "scratch", "finetune")
            out["pretrained_vs_scratch"] = {
                str(k): {"finetuned": tuned[k], "scratch": scratch[k], "pretrained_higher": bool(tuned[k] > scratch[k])}
                for k in ints}
    return out


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
    finetune: bool = False,
    scratch: bool = False,
    finetune_repeats: int | None = None,
    unfreeze: str | None = None,
    epochs: int | None = None,
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
    progress : progress bars on stderr (None: when it is a terminal); the fine-tuning curves'
        one-line reports (runs done, ETA) are printed unless ``progress=False``
    finetune : add a curve of ``backbone`` fine-tuned (``"finetuned"`` rows, classifier
        ``"finetune"``): each point is a training run (:func:`~featurebank.finetune.curve.finetune_point`)
        on the same draw and scored on the same test split as the probe. Needs ``backbone``
        (a torch network), not ``model``; shot counts at most 100; ``"all"`` is not trained
        (its row says so); ``decode_mode`` ``"fast"`` (the fine-tuning job's); runs on the CPU
        with torch, whatever ``device``.
    scratch : add a curve of the same network trained from seeded random weights, every
        layer, with the same recipe (``"scratch"`` rows)
    finetune_repeats : draws per shot count for the curves (the first of the probe's draws),
        1 to 3; default ``min(repeats, 3)``
    unfreeze : the first layer the fine-tuned curve trains (default the last stage)
    epochs : the most epochs of each training run (default 10)

    Returns
    -------
    FewshotResult

    Notes
    -----
    With one image per class the probe's C cannot be chosen on held-out data, so the
    linear probe is not trained at ``k=1`` (its row says so); the prototype classifier is,
    and so are the fine-tuning curves, whose head then starts from a logistic regression with
    C fixed at 1.
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
    curves = [f for f, on in zip(CURVES, (finetune, scratch)) if on]
    ft_repeats, epochs = _check_curve_args(curves, model, shot_list, repeats, finetune_repeats, unfreeze, epochs)
    nets = {}
    if curves:  # built before any embedding: a bad backbone, weights or unfreeze fails at once
        from featurebank.finetune.curve import DECODE_MODE, curve_network

        if decode_mode != DECODE_MODE:  # the probe and the curves must see the same pixels
            raise ValueError(f"fine-tuning curves decode images in {DECODE_MODE!r} mode, as `featurebank finetune` "
                             f"does; got decode_mode={decode_mode!r}: drop it (--decode-mode) or the curves")
        if finetune:
            nets["finetuned"] = curve_network(backbone or "efficientnet_lite0", weights=weights, unfreeze=unfreeze,
                                              seed=seed)
        if scratch:
            nets["scratch"] = curve_network(backbone or "efficientnet_lite0", scratch=True, seed=seed)

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

    ft = None
    if curves:
        ft = _run_curves(nets, epochs=epochs, repeats=ft_repeats, shots=shot_list, draws=draws, pool_paths=pool_paths,
                         y_pool=y_pool, test_paths=test_paths, y_test=y_test, classes=classes, seed=seed,
                         progress=progress)

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
        for f in curves:
            rows.append({"features": f, "classifier": "finetune", "shots": k, "shots_per_class": per_class[k],
                         **ft["points"][(f, k)]})
    if ft is not None:
        ft = _compare_curves(ft, rows, shot_list)

    result = FewshotResult(
        model={"path": str(model), "backbone": card.backbone, "layer": out.layer, "pool": out.pooling, "dim": int(out.dim),
               "weights_source": card.weights_source, "decode_mode": decode_mode},
        rows=rows, shots=shot_list, repeats=int(repeats), seed=int(seed), classes=[str(c) for c in classes],
        n_pool=int(len(y_pool)), n_test=int(len(y_test)), test_protocol=protocol,
        pixels={"mode": pixels, "size": int(pixel_size), "standardised": "per image (zero mean, unit variance)"},
        draws=draws, pool_keys=pool_keys, test_keys=list(test_keys), pool_paths=pool_paths, test_paths=list(test_paths),
        transfer_beats_pixels_from={c: _crossover(_means(rows, "transfer", c), _means(rows, "pixels", c), shot_list)
                                    for c in CLASSIFIERS},
        transfer_wins_at={c: _wins(_means(rows, "transfer", c), _means(rows, "pixels", c), shot_list) for c in CLASSIFIERS},
        timings={"embed": t_embed, "pixels": t_pixels, "fit": t_fit,
                 **({"finetune": ft["seconds"]} if ft is not None else {}), "total": time.perf_counter() - t_start},
        convergence_warnings=n_warn, environment=environment(), finetune=ft,
    )
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        result.files = {"json": str(out_path / "fewshot.json"), "png": str(out_path / "fewshot.png")}
        write_figure(out_path / "fewshot.png", _plot(result))
        write_json(out_path / "fewshot.json", result.to_dict())
    return result
