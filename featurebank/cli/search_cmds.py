"""`featurebank index build | info`, `featurebank search`, `featurebank dedup`: thin shells over featurebank.search."""

from __future__ import annotations

import argparse
import json
import os
import sys

from featurebank.cli.embed_cmds import add_model_options, open_runner


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    index = sub.add_parser(
        "index", help="build or grow a FAISS similarity index over a store space", formatter_class=formatter_class,
        description="Similarity indexes over the vectors of one store space, saved in a directory "
        "(index.faiss, ids.npy, index.json).",
    )
    ii = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    p = ii.add_parser(
        "build", help="index a space (only vectors not yet indexed when INDEX exists)", formatter_class=formatter_class,
        description="Build the index of store space FP in directory INDEX, or, when INDEX already holds an "
        "index of that space, add only the vectors it lacks (no retraining). Saved atomically.",
        epilog="examples:\n  featurebank index build --store cache --space 3f9a...e1 --index cache.idx\n"
        "  featurebank index build --store cache --space 3f9a...e1 --index big.idx --factory IVF4096,Flat --nprobe 32",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="images to embed into the store first (optional)")
    p.add_argument("--store", required=True, metavar="DIR", help="embedding store directory")
    p.add_argument("--space", default=None, metavar="FP",
                   help="space fingerprint (see `featurebank store info DIR`); default: the one --model writes, "
                   "or the store's only space")
    add_model_options(p)
    p.add_argument("--index", dest="index_dir", required=True, metavar="DIR", help="index directory to create or update")
    p.add_argument("--factory", default="auto", metavar="STR",
                   help="'auto' (Flat below 50k vectors, else IVF with ~4*sqrt(n) lists), 'Flat', or a FAISS "
                   "factory string such as 'IVF1024,Flat' or 'IVF256,PQ32' (default: auto)")
    p.add_argument("--metric", choices=("cosine", "l2"), default="cosine", help="similarity the index ranks by")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default: nlist/64, at least 8)")
    p.add_argument("--rebuild", action="store_true", help="rebuild from scratch even if INDEX exists")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of an 'auto' index, e.g. 4GB (default 4GB): past it, or from 1M vectors, "
                   "auto picks a compressed IVF-PQ/IVF-SQ8 index with exact re-rank from the store")
    p.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="re-rank N*k candidates exactly from the store's vectors (default: 10 for compressed "
                   "indexes, 0 otherwise)")
    p.set_defaults(func=_build)

    p = ii.add_parser("info", help="show an index's factory, metric, dim, count and space", formatter_class=formatter_class,
                      description="Show what a saved index holds.")
    p.add_argument("index_dir", metavar="INDEX", help="an index directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "search", help="nearest neighbours of indexed ids or query vectors", formatter_class=formatter_class,
        description="Find the K nearest indexed vectors of each query. Queries are ids already in the index "
        "(--id, repeatable) or vectors in a .npy file of shape (dim,) or (n_queries, dim). Paths are shown "
        "when the index was built from a store that recorded them.",
        epilog="examples:\n  featurebank search --index cache.idx --id 9c1e...04 -k 5\n"
        "  featurebank search --index cache.idx --vector-file q.npy -k 10 --json",
    )
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query image files (embedded with --model/--backbone)")
    p.add_argument("--index", dest="index_dir", required=True, metavar="DIR",
                   help="an index directory from `featurebank index build`")
    add_model_options(p)
    which = p.add_mutually_exclusive_group(required=False)
    which.add_argument("--id", dest="ids", action="append", metavar="KEY", help="an indexed id (content key)")
    which.add_argument("--vector-file", metavar="Q.npy", help="query vectors, float .npy")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--clip", action="store_true", help="allow k larger than the index (returns all vectors)")
    p.add_argument("--space", metavar="FP", default=None, help="with --vector-file: the space the vectors come from (checked)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "dedup", help="groups of near-duplicate images", formatter_class=formatter_class,
        description="Group near-duplicates: connected components of 'similarity >= THRESHOLD' (cosine), or "
        "'squared L2 distance <= THRESHOLD' (l2). Works on a saved index (--index) or directly on a store "
        "space (--store, --space; exact search). Writes one record per member: group, id, path, score.",
        epilog="examples:\n  featurebank dedup --index cache.idx --threshold 0.97 -o dups.csv --format csv\n"
        "  featurebank dedup --store cache --space 3f9a...e1 --threshold 0.95",
    )
    p.add_argument("--index", dest="index_dir", metavar="DIR", default=None, help="a saved index")
    p.add_argument("--store", metavar="DIR", default=None, help="a store (with --space)")
    p.add_argument("--space", metavar="FP", default=None, help="space fingerprint (with --store)")
    p.add_argument("--threshold", type=float, default=0.95, help="link threshold (default: 0.95 cosine similarity)")
    p.add_argument("--metric", choices=("cosine", "l2"), default="cosine", help="with --store (an index has its own)")
    p.add_argument("--format", choices=("json", "csv"), default="json", help="output format")
    p.add_argument("-o", "--output", default=None, metavar="OUT", help="file to write (default: stdout)")
    p.set_defaults(func=_dedup)


def _build(args: argparse.Namespace) -> int:
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.search import index_store
    from featurebank.workflow import resolve_space

    runner = None
    if args.sources or args.model or args.backbone:
        runner = open_runner(args)
    if args.sources:
        from featurebank.embed_into_store import embed_images

        decode_mode = args.decode_mode or DEFAULT_DECODE_MODE  # what the store now holds for sure
        report = embed_images(args.sources, runner, store=args.store, decode_mode=decode_mode,
                              return_vectors=False).report
        print(report.summary(), file=sys.stderr)
    else:
        decode_mode = args.decode_mode  # None: the one the store holds
    space = resolve_space(args.store, space=args.space, model=runner, decode_mode=decode_mode)
    index, n_added = index_store(args.store, space, args.index_dir, factory=args.factory, metric=args.metric,
                                 nprobe=args.nprobe, rebuild=args.rebuild, progress=sys.stderr.isatty(),
                                 max_memory=args.max_memory, rerank=args.rerank)
    print(f"{args.index_dir}: {index.factory} ({index.metric}), {index.count} vectors of dim {index.dim}, "
          f"{n_added} added" + (f", nprobe {index.nprobe}" if index.nprobe else "")
          + (f", re-rank x{index.rerank} from the store" if index.rerank else "")
          + f", {index.nbytes / max(index.count, 1):.1f} index bytes/vector")
    return 0


def _info(args: argparse.Namespace) -> int:
    from featurebank.search import open_index

    index = open_index(args.index_dir)
    info = {**index.info(), "path": args.index_dir}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "factory", "metric", "dim", "count", "nprobe", "rerank", "space", "source", "index_bytes",
                "index_bytes_per_vector", "featurebank_version", "faiss_version"):
        print(f"{key:>20}: {info[key] if not isinstance(info[key], dict) else json.dumps(info[key])}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from featurebank.search import open_index, query_index

    index = open_index(args.index_dir, mmap=True)  # opens in ~no time whatever its size; read-only
    failures: list[tuple[str, str]] = []
    if args.queries:
        if args.ids or args.vector_file:
            raise ValueError("give query images, or --id, or --vector-file; not several")
        from featurebank.workflow import search_images

        labels, hits, failures = search_images(args.queries, index, open_runner(args), k=args.k,
                                               clip=args.clip)
        for path, why in failures:  # one bad query does not cost the others
            print(f"failed: {why}" if path in why else f"failed: {path}: {why}", file=sys.stderr)
    elif args.vector_file:
        import numpy as np

        Q = np.load(args.vector_file, allow_pickle=False)
        if Q.ndim == 1:  # one query vector saved as (dim,)
            Q = Q[None, :]
        hits = query_index(index, Q, k=args.k, clip=args.clip, space=args.space)
        labels = [f"{args.vector_file}[{i}]" for i in range(len(hits))]
    elif args.ids:
        hits = query_index(index, ids=args.ids, k=args.k, clip=args.clip)
        labels = list(args.ids)
    else:
        raise ValueError("give query image files, --id KEY or --vector-file Q.npy")
    if args.json:
        print(json.dumps([{"query": q, "neighbours": [h.__dict__ for h in row]} for q, row in zip(labels, hits)]
                         + [{"query": q, "error": why} for q, why in failures], indent=2))
        return 0
    from featurebank.store import printable  # file names that are not UTF-8 print as \xNN

    for q, row in zip(labels, hits):
        print(f"query {printable(str(q))}")
        for h in row:
            print(f"  {h.rank + 1:>3}  {h.score:9.4f}  {printable(h.path or h.id)}" + (f"  ({h.id[:12]}…)" if h.path else ""))
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from featurebank.search import find_index_duplicates, find_store_duplicates, open_index, store_paths, write_duplicates

    if (args.index_dir is None) == (args.store is None):
        raise ValueError("give either --index DIR, or --store DIR with --space FP")
    store_dir = args.store
    if args.index_dir is not None:
        if args.space:
            raise ValueError("--space goes with --store; an index knows its own space")
        index = open_index(args.index_dir, mmap=True)
        groups, scores = find_index_duplicates(index, threshold=args.threshold, return_scores=True)
        store_dir = (index.source or {}).get("store")
    else:
        if not args.space:
            raise ValueError("--store needs --space FP (see `featurebank store info DIR`)")
        groups, scores = find_store_duplicates(args.store, args.space, threshold=args.threshold,
                                               metric=args.metric, return_scores=True)
    known = store_dir is not None and os.path.isdir(store_dir) and groups
    paths = store_paths(store_dir, {k for g in groups for k in g}) if known else {}
    write_duplicates(groups, args.output or sys.stdout, format=args.format, scores=scores, paths=paths)
    if args.output:
        print(f"{len(groups)} groups ({sum(map(len, groups))} items) written to {args.output}", file=sys.stderr)
    return 0
