"""LinearProbe training time against scikit-learn's LogisticRegressionCV, same data, same grid.

Synthetic embeddings with real class structure: each class has a Gaussian mean, plus
isotropic noise, so the validation accuracy depends on C and the grid search matters. Both sides choose C from the same 9-point log grid on the
same stratified splits, refit on all data, and are scored on the same held-out test set.

    python benchmarks/probe_train.py                 # 50,000 x 1280, 10 classes
    python benchmarks/probe_train.py --n-samples 5000 --quick

Prints one JSON object: machine, versions, settings, seconds per contender, ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np


def make_embeddings(n_samples: int, n_features: int, n_classes: int, seed: int):
    """(X float32 (n_samples, n_features), y int64): Gaussian class means spread over all
    features, unit noise, then a ReLU (non-negative like pooled CNN features). The class
    signal is weak per feature, so C matters (at the default size the strongest
    regularisation on the grid, C=1e-4, wins: this data favours patience)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, n_features)).astype(np.float32) * 0.07
    y = rng.integers(0, n_classes, n_samples)
    X = means[y] + rng.standard_normal((n_samples, n_features), dtype=np.float32)
    return np.maximum(X, 0.0) + 0.1, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=50_000)
    parser.add_argument("--n-features", type=int, default=1280)
    parser.add_argument("--n-classes", type=int, default=10)
    parser.add_argument("--cv", type=float, default=0.2,
                        help="int k >= 2: stratified k-fold; float in (0, 1): one stratified validation split "
                             "of that fraction (the Kornblith/CLIP protocol); both sides use the same splits")
    parser.add_argument("--max-iter", type=int, default=100, help="lbfgs iterations per fit, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="skip the full-grid LinearProbe run")
    args = parser.parse_args()

    import scipy
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_info

    import featurebank
    from featurebank.classifiers import LinearProbe

    X, y = make_embeddings(args.n_samples + 10_000, args.n_features, args.n_classes, args.seed)
    X, X_test, y, y_test = train_test_split(X, y, test_size=10_000, stratify=y, random_state=args.seed)
    Cs = np.logspace(-4, 4, 9)
    if args.cv >= 2:
        cv = int(args.cv)
        folds = list(StratifiedKFold(cv, shuffle=True, random_state=args.seed).split(X, y))
    else:  # LinearProbe(cv=float) draws this very split: same class, same seed, same size
        cv = args.cv
        folds = list(StratifiedShuffleSplit(1, test_size=int(np.ceil(cv * len(y))), random_state=args.seed).split(X, y))

    contenders = {
        "LinearProbe(patience=2)": lambda: LinearProbe(Cs=Cs, cv=cv, max_iter=args.max_iter, random_state=args.seed),
        "LinearProbe(patience=None)": lambda: LinearProbe(
            Cs=Cs, cv=cv, patience=None, max_iter=args.max_iter, random_state=args.seed
        ),
        # the peer: scaler + LogisticRegressionCV (lbfgs, warm starts along the C path)
        "StandardScaler+LogisticRegressionCV": lambda: make_pipeline(
            StandardScaler(), LogisticRegressionCV(Cs=Cs, cv=folds, max_iter=args.max_iter, tol=1e-4, scoring="accuracy")
        ),
    }
    if args.quick:
        del contenders["LinearProbe(patience=None)"]
    results = {}
    for name, build in contenders.items():
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9's LogisticRegressionCV transition notes
            t0 = time.perf_counter()
            model.fit(X, y)
            seconds = time.perf_counter() - t0
        C = model.C_ if hasattr(model, "C_") else float(model[-1].C_[0])
        results[name] = {"seconds": round(seconds, 2), "C": C, "test_accuracy": round(float(model.score(X_test, y_test)), 4)}
        print(f"{name}: {seconds:.1f} s, C={C:g}, test accuracy {results[name]['test_accuracy']}", flush=True)

    peer = results["StandardScaler+LogisticRegressionCV"]["seconds"]
    report = {
        "benchmark": "probe_train",
        "settings": {**vars(args), "Cs": Cs.tolist(), "dtype": "float32", "n_test": 10_000},
        "results": results,
        "speedup_vs_LogisticRegressionCV": {
            name: round(peer / r["seconds"], 2) for name, r in results.items() if name.startswith("LinearProbe")
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_1min_at_end": os.getloadavg()[0],
            "blas": [{k: i.get(k) for k in ("internal_api", "num_threads", "architecture")} for i in threadpool_info()],
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__,
            "featurebank": featurebank.__version__,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
