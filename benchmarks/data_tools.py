"""The data tools on Fashion-MNIST (issue #15's "Must show"): label errors found by
``featurebank audit``'s confident learning vs a simple baseline and cleanlab, active-learning
curves of ``featurebank select``'s strategies vs random, and the time of audit and map on
10,000 cached vectors.

Data, real and offline: Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist),
1000 training images per class (seeded, official *train* split) and the official 10,000-image
*test* split, written once as RGB PNGs into ``--cache-dir`` (benchmarks/finetune.py's
helpers), embedded with efficientnet_lite0 (real weights, uint8 input, fast decode) into
``--store`` (a re-run reads the vectors from it).

* **label errors** (``--seeds`` seeds): 5% of the training labels flipped to another class at
  random; out-of-fold probabilities (5-fold, the linear probe, as ``audit`` computes them);
  precision / recall / F1 of the flagged set against the flipped set for confident learning
  (:func:`featurebank.curation.find_label_issues`), the simple baseline (given-label
  probability under one global threshold, 0.5) and, where it imports (``pip install --target
  /tmp/cl cleanlab``; ``--cleanlab-path``), cleanlab's ``find_label_issues`` on the same
  probabilities. cleanlab is AGPL: a peer here, never a dependency.
* **active learning**: 2 labels per class to start (seeded), 8 rounds of 50 labels from the
  rest of the 10,000 training images, linear-probe accuracy on the official test split after
  each round, for uncertainty, diversity, combined and random, over ``--seeds`` seeds.
* **time** of ``audit_vectors`` (label issues + outliers + conflicts + leakage against the test
  split) and of ``project_2d`` + ``write_map`` (PNG and HTML) on the 10,000 training vectors.

Pictures in ``--results-dir``: ``al_curves.png``, ``label_errors.png``, ``audit_sheet.png`` (the
top suspects of the real, unflipped training set), ``map.png``; numbers in ``results.json``.

    nice -n 10 python benchmarks/data_tools.py                       # ~15 min on 2 cores
    python benchmarks/data_tools.py --per-class 100 --test-size 1000 --seeds 2 --results-dir /tmp/dt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info  # noqa: E402
from finetune import fmnist_test, fmnist_train  # noqa: E402

STRATEGIES = ("uncertainty", "diversity", "combined", "random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prf(flagged: np.ndarray, truth: np.ndarray) -> dict:
    f, t = set(np.asarray(flagged).tolist()), set(np.asarray(truth).tolist())
    tp = len(f & t)
    p = tp / len(f) if f else 0.0
    r = tp / len(t) if t else 0.0
    return {"flagged": len(f), "precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def label_errors(X: np.ndarray, y: np.ndarray, seeds: int, rate: float, cleanlab) -> list[dict]:
    from featurebank.curation import baseline_label_issues, find_label_issues, out_of_fold_proba

    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        noisy = y.copy()
        flip = rng.choice(len(y), int(round(rate * len(y))), replace=False)
        noisy[flip] = (y[flip] + rng.integers(1, 10, len(flip))) % 10
        t0 = time.perf_counter()
        proba, classes = out_of_fold_proba(X, noisy.astype(str), cv=5, random_state=seed)
        t_oof = time.perf_counter() - t0
        codes = np.array([classes.index(str(v)) for v in noisy])
        row = {"seed": seed, "n_flipped": len(flip), "oof_seconds": round(t_oof, 2),
               "oof_accuracy_vs_given": round(float(np.mean(proba.argmax(1) == codes)), 4),
               "confident_learning": prf(find_label_issues(codes, proba), flip),
               "baseline_0.5": prf(baseline_label_issues(codes, proba, 0.5), flip)}
        if cleanlab is not None:
            row["cleanlab"] = prf(np.flatnonzero(cleanlab(labels=codes, pred_probs=proba)), flip)
        rows.append(row)
        log(f"label errors seed {seed}: " + ", ".join(f"{k} F1 {v['f1']:.3f} (P {v['precision']:.3f} R {v['recall']:.3f})"
                                                     for k, v in row.items() if isinstance(v, dict)))
    return rows


def _probe(X, y, seed):
    from featurebank.classifiers import LinearProbe

    counts = np.unique(y, return_counts=True)[1]
    return LinearProbe(cv=0.5 if counts.min() < 5 else 0.2, random_state=seed).fit(X, y)


def active_learning(X, y, X_test, y_test, seeds: int, start: int, rounds: int, step: int) -> dict:
    from featurebank.curation import select_vectors

    curves = {s: [] for s in STRATEGIES}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        first = np.concatenate([rng.choice(np.flatnonzero(y == c), start, replace=False) for c in range(10)])
        for strategy in STRATEGIES:
            labelled = list(first)
            accs = []
            for r in range(rounds + 1):
                clf = _probe(X[labelled], y[labelled], seed)
                accs.append(float(clf.score(X_test, y_test)))
                if r == rounds:
                    break
                pool = np.setdiff1d(np.arange(len(y)), labelled)
                pick = select_vectors(X[pool], step, strategy=strategy, X_labelled=X[labelled], y_labelled=y[labelled],
                                      random_state=seed * 100 + r)["indices"]
                labelled += pool[pick].tolist()
            curves[strategy].append(accs)
            log(f"active learning seed {seed} {strategy}: " + " ".join(f"{a:.3f}" for a in accs))
    return {s: np.asarray(v).tolist() for s, v in curves.items()}


def plot_curves(curves: dict, start: int, step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for s, v in curves.items():
        a = np.asarray(v)
        x = 10 * start + step * np.arange(a.shape[1])
        ax.plot(x, a.mean(0), marker="o", ms=3, label=s)
        ax.fill_between(x, a.min(0), a.max(0), alpha=0.15)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("linear-probe test accuracy (10,000 images)")
    ax.set_title(f"Fashion-MNIST, efficientnet_lite0: select strategies (mean, min-max over {len(a)} seeds)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_label_errors(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        for i, metric in enumerate(("precision", "recall", "f1")):
            vals = [r[m][metric] for r in rows]
            ax.bar(i + j * w, np.mean(vals), w, yerr=[[np.mean(vals) - min(vals)], [max(vals) - np.mean(vals)]],
                   color=f"C{j}", label=m if i == 0 else None, capsize=3)
    ax.set_xticks(np.arange(3) + w * (len(methods) - 1) / 2, ["precision", "recall", "F1"])
    ax.set_ylim(0, 1)
    ax.set_title(f"Flipped labels found (5% flipped, {len(rows)} seeds, mean and min-max)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(path: Path) -> str:
    """RESULTS.md's tables from ``results.json``."""
    r = json.loads(path.read_text())
    out = []
    if "label_errors" in r:
        rows = r["label_errors"]
        methods = [k for k in rows[0] if isinstance(rows[0][k], dict)]
        out += ["| seed | " + " | ".join(f"{m} P / R / F1" for m in methods) + " |",
                "|---|" + "---|" * len(methods)]
        for row in rows:
            out.append(f"| {row['seed']} | " + " | ".join(
                f"{row[m]['precision']:.3f} / {row[m]['recall']:.3f} / **{row[m]['f1']:.3f}** ({row[m]['flagged']})"
                for m in methods) + " |")
        out.append("| mean | " + " | ".join(
            " / ".join(f"{np.mean([x[m][k] for x in rows]):.3f}" for k in ("precision", "recall", "f1"))
            for m in methods) + " |")
        out.append("")
    if "active_learning" in r:
        al = r["active_learning"]
        curves = al["curves"]
        n0 = 10 * al["start_per_class"]
        xs = [n0 + al["step"] * i for i in range(al["rounds"] + 1)]
        out += ["| strategy | " + " | ".join(str(x) for x in xs) + " |", "|---|" + "---|" * len(xs)]
        for s, v in curves.items():
            a = np.asarray(v)
            out.append(f"| {s} | " + " | ".join(f"{m:.3f} ± {d:.3f}" for m, d in zip(a.mean(0), a.std(0))) + " |")
        out.append("")
    if "time" in r:
        t = r["time"]
        out.append(f"audit of {t['n_vectors']} cached vectors: {t['audit_seconds']} s; map PNG {t['map_png_seconds']} s, "
                   f"HTML {t['map_html_seconds']} s ({t['html_bytes'] / 1e6:.1f} MB)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--flip-rate", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--step", type=int, default=50)
    ap.add_argument("--start", type=int, default=2, help="labels per class to start from")
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/ft-cache"))
    ap.add_argument("--store", type=Path, default=Path("/work/dt/store"))
    ap.add_argument("--cleanlab-path", default="/tmp/cl", help="a folder cleanlab was installed into with --target")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results" / "data_tools")
    ap.add_argument("--parts", nargs="+", default=["errors", "al", "time"], choices=["errors", "al", "time"])
    ap.add_argument("--report", action="store_true", help="print the tables of --results-dir/results.json and stop")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.results_dir / "results.json"))
        return 0
    args.results_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    log(f"machine: load average at start {info.get('load_avg_at_start')}")

    from featurebank.curation import audit_vectors, project_2d, write_contact_sheet, write_map
    from featurebank.embed_into_store import load_embeddings
    from featurebank.embedder.session import open_model
    from featurebank.export.cache import cached_export

    train_p, train_y = fmnist_train(args.cache_dir, args.per_class, 0)
    test_p, test_y = fmnist_test(args.cache_dir, args.test_size, 0)
    runner = open_model(cached_export("efficientnet_lite0", input_format="uint8"), threads=2)
    t0 = time.perf_counter()
    X, keys, _, paths = load_embeddings(train_p, runner, args.store, decode_mode="fast", progress=True)
    X_test, test_keys, _, tpaths = load_embeddings(test_p, runner, args.store, decode_mode="fast", progress=True)
    log(f"vectors: {X.shape} train, {X_test.shape} test ({time.perf_counter() - t0:.1f}s, embedded what the store lacked)")
    assert paths == train_p and tpaths == test_p
    from studies import FMNIST_CLASSES

    names = np.array(FMNIST_CLASSES)
    out_path = args.results_dir / "results.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"machine": info, "data": {"train": len(paths), "test": len(tpaths), "per_class": args.per_class,
                                              "model": "efficientnet_lite0 (timm weights, uint8 input, fast decode)"}})

    if "time" in args.parts:
        t = time.perf_counter()
        audited = audit_vectors(X, names[train_y], paths, keys, X_test=X_test, test_paths=tpaths, test_keys=test_keys,
                               test_labels=list(names[test_y]))
        t_audit = time.perf_counter() - t
        t = time.perf_counter()
        coords = project_2d(X, method="pca")
        write_map(coords, list(names[train_y]), paths, args.results_dir / "map.png",
                  title=f"Fashion-MNIST, {len(paths)} images, efficientnet_lite0, PCA")
        t_map_png = time.perf_counter() - t
        t = time.perf_counter()
        write_map(project_2d(X, method="pca"), list(names[train_y]), paths, Path("/tmp/fmnist_map.html"))
        t_map_html = time.perf_counter() - t
        sus = [r for r in audited["suspects"] if r["issue"] == "label"][:40]
        write_contact_sheet([{"path": r["path"], "colour": "#c62828",
                              "lines": [f"#{r['rank']} given: {r['given']}", f"suggested: {r['suggested']}",
                                        f"p(given) {r['self_confidence']:.3f}"]} for r in sus],
                            args.results_dir / "audit_sheet.png", columns=8, size=96,
                            title="featurebank audit on 10,000 Fashion-MNIST training images (labels as given): "
                                  "top label suspects")
        outl = [r for r in audited["suspects"] if r["issue"] == "outlier"][:16]
        if outl:
            write_contact_sheet([{"path": r["path"], "colour": "#1565c0",
                                  "lines": [f"#{r['rank']} {r['given']}", f"z {r['score']:.1f}"]} for r in outl],
                                args.results_dir / "outlier_sheet.png", columns=8, size=96,
                                title="featurebank audit: top k-NN outliers")
        results["time"] = {"audit_seconds": round(t_audit, 2), "map_png_seconds": round(t_map_png, 2),
                           "map_html_seconds": round(t_map_html, 2), "html_bytes": os.path.getsize("/tmp/fmnist_map.html"),
                           "n_vectors": len(X), "audit_counts": audited["summary"]["counts"],
                           "out_of_fold_accuracy": audited["summary"]["out_of_fold_accuracy"],
                           "umap_installed": False}
        log(f"time: audit {t_audit:.1f}s ({audited['summary']['counts']}), map png {t_map_png:.1f}s, "
            f"html {t_map_html:.1f}s")
        out_path.write_text(json.dumps(results, indent=2))

    if "errors" in args.parts:
        cleanlab = None
        if args.cleanlab_path and os.path.isdir(args.cleanlab_path):
            sys.path.insert(0, args.cleanlab_path)
        try:
            import cleanlab as cl_pkg
            from cleanlab.filter import find_label_issues as cleanlab

            results["cleanlab_version"] = cl_pkg.__version__
        except ImportError as exc:
            log(f"cleanlab not importable ({exc}); compared with the baseline only")
        rows = label_errors(X, train_y, args.seeds, args.flip_rate, cleanlab)
        results["label_errors"] = rows
        plot_label_errors(rows, args.results_dir / "label_errors.png")
        out_path.write_text(json.dumps(results, indent=2))

    if "al" in args.parts:
        curves = active_learning(X, train_y, X_test, test_y, args.seeds, args.start, args.rounds, args.step)
        results["active_learning"] = {"start_per_class": args.start, "rounds": args.rounds, "step": args.step,
                                      "curves": curves}
        plot_curves(curves, args.start, args.step, args.results_dir / "al_curves.png")
        out_path.write_text(json.dumps(results, indent=2))
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
