"""k-NN search on 1M x 256 clustered vectors: featurebank's FAISS indexes vs numpy and scikit-learn.

Seeded data: 1000 Gaussian cluster centres ~ N(0, I), points = centre + spread * N(0, I)
(--spread, default 0.5), L2-normalised (metric="cosine": inner product ranks like cosine
and like euclidean).
Queries are fresh points from the same clusters, not database members. Ground truth is exact
float32 brute force (numpy chunked matmul + argpartition); recall@k = |found & true| / k.

Methods, all in one run, all with every core FAISS / BLAS can use:
  numpy-brute   chunked Q @ X.T + argpartition (exact, the ground truth; timed)
  fb-Flat       build_index(factory="Flat")   exact FAISS scan
  fb-auto       build_index(factory="auto")   -> "IVF4096,Flat", nprobe 64 at n=1M
  fb-IVF nprobe=16 the same trained index with nprobe 16 (the brief's "IVF4096,Flat" nprobe 16)
  fb-Flat bs=4096 the Flat index with a bigger FAISS BLAS database block (process-global knob)
  sk-brute      sklearn NearestNeighbors(algorithm="brute") (euclidean on unit vectors)
  sk-ball_tree  NearestNeighbors(algorithm="ball_tree"), on a query subsample (slow at 256-d)

Usage::

    python benchmarks/search_knn.py                      # full size (~1 GiB of vectors)
    python benchmarks/search_knn.py --n 100000 --json-out bench.json

Prints a table, then one JSON object with machine info, versions and settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import sklearn
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import featurebank  # noqa: E402
from featurebank.search import build_index  # noqa: E402

def make_data(n: int, n_queries: int, dim: int, n_clusters: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for s in range(0, m, 100_000):  # chunks keep the float temporaries small
            e = min(m, s + 100_000)
            out[s:e] = centres[rng.integers(0, n_clusters, e - s)]
            out[s:e] += spread * rng.standard_normal((e - s, dim), dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def numpy_knn(X: np.ndarray, Q: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Exact top-k by inner product: per database chunk, argpartition, then merge."""
    best_s = np.full((len(Q), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(Q), k), dtype=np.int64)
    for s in range(0, len(X), chunk):
        S = Q @ X[s : s + chunk].T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(S, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + s], axis=1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, axis=1), np.take_along_axis(cand_i, top, axis=1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--ivf-nprobe", type=int, default=16, help="second nprobe measured on the auto IVF index")
    ap.add_argument("--sklearn-queries", type=int, default=1000, help="queries for sklearn brute (subsample)")
    ap.add_argument("--ball-tree-queries", type=int, default=20, help="queries for sklearn ball_tree; 0 skips it")
    ap.add_argument("--flat-blas-bs", type=int, default=4096,
                    help="also time Flat with this FAISS BLAS database block size; 0 skips it")
    ap.add_argument("--spread", type=float, default=0.5,
                    help="within-cluster std (centres ~ N(0, I)); 0.5 separates clusters, 1.0 makes them overlap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    k = args.k
    load_before = os.getloadavg()

    (X, Q), t_data = timed(lambda: make_data(args.n, args.queries, args.dim, args.clusters, args.seed, args.spread))
    print(f"data: {args.n} x {args.dim} float32 ({X.nbytes / 2**30:.2f} GiB), {args.queries} queries, "
          f"{args.clusters} clusters, made in {t_data:.1f}s", file=sys.stderr)
    ids = [str(i) for i in range(args.n)]
    rows = []

    def add_row(name, build_s, search_s, n_q, found, note=""):
        r = recall(found, truth[: len(found)])
        rows.append({"method": name, "build_s": None if build_s is None else round(build_s, 2),
                     "search_s": round(search_s, 3), "n_queries": n_q, "qps": round(n_q / search_s, 1),
                     f"recall@{k}": round(r, 4), "note": note})
        print(f"  {name:<22} build {'-' if build_s is None else f'{build_s:7.1f}s'}  search {search_s:8.3f}s "
              f"({n_q} q)  {n_q / search_s:10.1f} q/s  recall@{k} {r:.4f}", file=sys.stderr)

    # ground truth and the numpy peer
    truth, t = timed(lambda: numpy_knn(X, Q, k))
    add_row("numpy brute (exact)", None, t, len(Q), truth, "chunked matmul + argpartition; ground truth")

    def to_rows(found_ids):
        return np.array([[int(x) if x is not None else -1 for x in row] for row in found_ids])

    # featurebank Flat
    index, t_build = timed(lambda: build_index(X, ids, factory="Flat"))
    (_, found), t = timed(lambda: index.search(Q, k))
    add_row("featurebank Flat", t_build, t, len(Q), to_rows(found), "exact FAISS IndexFlatIP")
    if args.flat_blas_bs:
        # FAISS scans the database in BLAS blocks of distance_compute_blas_database_bs rows
        # (1024 by default); bigger blocks mean fewer, larger sgemm calls. Process-global.
        default_bs = faiss.cvar.distance_compute_blas_database_bs
        faiss.cvar.distance_compute_blas_database_bs = args.flat_blas_bs
        (_, found), t = timed(lambda: index.search(Q, k))
        faiss.cvar.distance_compute_blas_database_bs = default_bs
        add_row(f"featurebank Flat bs={args.flat_blas_bs}", None, t, len(Q), to_rows(found),
                f"same index, faiss.cvar.distance_compute_blas_database_bs={args.flat_blas_bs} (default {default_bs})")
    del index
    gc.collect()

    # featurebank auto (IVF at this size), then the same index at another nprobe
    index, t_build = timed(lambda: build_index(X, ids, factory="auto"))
    auto_factory, auto_nprobe = index.factory, index.nprobe
    (_, found), t = timed(lambda: index.search(Q, k))
    add_row("featurebank auto", t_build, t, len(Q), to_rows(found), f"{auto_factory} nprobe={auto_nprobe}")
    if index.nprobe is not None:
        index.nprobe = args.ivf_nprobe
        (_, found), t = timed(lambda: index.search(Q, k))
        add_row(f"featurebank IVF np={args.ivf_nprobe}", None, t, len(Q), to_rows(found),
                f"{auto_factory} nprobe={args.ivf_nprobe} (same trained index)")
    del index
    gc.collect()

    # scikit-learn brute (euclidean on unit vectors ranks like cosine)
    nq = min(args.sklearn_queries, len(Q))
    nn, t_build = timed(lambda: NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(X))
    found, t = timed(lambda: nn.kneighbors(Q[:nq], return_distance=False))
    add_row("sklearn brute", t_build, t, nq, found, "NearestNeighbors(algorithm='brute'), euclidean")
    del nn
    gc.collect()

    if args.ball_tree_queries:
        nq = min(args.ball_tree_queries, len(Q))
        nn, t_build = timed(lambda: NearestNeighbors(n_neighbors=k, algorithm="ball_tree", n_jobs=-1).fit(X))
        found, t = timed(lambda: nn.kneighbors(Q[:nq], return_distance=False))
        add_row("sklearn ball_tree", t_build, t, nq, found, f"query subsample of {nq}: slow at {args.dim}-d")
        del nn
        gc.collect()

    base = next(r for r in rows if r["method"] == "featurebank Flat")["qps"]
    for r in rows:
        r["qps_vs_fb_flat"] = round(r["qps"] / base, 3)

    print(f"\n{'method':<24}{'build s':>9}{'search s':>10}{'queries':>9}{'q/s':>11}{'x Flat':>8}{'recall@' + str(k):>11}  note")
    for r in rows:
        b = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
        print(f"{r['method']:<24}{b:>9}{r['search_s']:>10.3f}{r['n_queries']:>9}{r['qps']:>11.1f}"
              f"{r['qps_vs_fb_flat']:>8.2f}{r[f'recall@{k}']:>11.4f}  {r['note']}")

    report = {
        "benchmark": "search_knn",
        "settings": {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "queries": args.queries,
                     "k": k, "seed": args.seed, "metric": "cosine (unit vectors, inner product)"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "faiss_omp_threads": faiss.omp_get_max_threads(),
                    "platform": platform.platform(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
                     "sklearn": sklearn.__version__, "featurebank": featurebank.__version__},
        "results": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
