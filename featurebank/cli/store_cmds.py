"""`featurebank store info | verify | export | failures | compact`: thin shells over featurebank.store."""

from __future__ import annotations

import argparse
import json
import time

from featurebank.artifact import DECODE_MODES
from featurebank.store.catalog import printable as _p  # file names that are not UTF-8 print as \xNN


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    store = sub.add_parser(
        "store", help="inspect, check, compact and export an embedding store", formatter_class=formatter_class,
        description="Work with an embedding store: the content-addressed cache of vectors that `embed` fills.",
    )
    ss = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    p = ss.add_parser("info", help="spaces, vector counts and sizes", formatter_class=formatter_class,
                      description="Show the store's format version and, per space, dim, dtype, vectors, shards and bytes.")
    p.add_argument("store", metavar="DIR", help="the store directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    p = ss.add_parser("verify", help="check every shard (parse, dims, NaN, checksums)", formatter_class=formatter_class,
                      description="Check every shard parses, matches its space's dim and dtype, holds finite vectors "
                      "and valid keys, and matches its checksums. Exit status 1 if anything is wrong.")
    p.add_argument("store", metavar="DIR", help="the store directory")
    p.add_argument("--quarantine", action="store_true",
                   help="move broken shards to DIR/quarantine/ (their images are embedded again on the next run)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_verify)

    p = ss.add_parser(
        "export", help="write a space's vectors, keys, paths and labels to Parquet or .npy", formatter_class=formatter_class,
        description="Write one space to open formats: a Parquet file (key, path, label, vector) or a directory of "
        ".npy files (vectors.npy, keys.npy, paths.npy, labels.npy).",
        epilog="examples:\n  featurebank store export cache --space 3f9a...e1 -o vectors.parquet\n"
        "  featurebank store export cache --model lite0-b5.onnx -o out_dir --format npy",
    )
    p.add_argument("store", metavar="DIR", help="the store directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--space", metavar="FP", help="space fingerprint (see `featurebank store info DIR`)")
    which.add_argument("--model", metavar="MODEL.onnx", help="the space of this model's output")
    p.add_argument("--output-name", default=None, metavar="NAME",
                   help="with --model: which graph output (name or layer) when the model has several")
    p.add_argument("--decode-mode", default=None, choices=DECODE_MODES,
                   help="with --model: the decode mode the vectors were embedded with (default: the one in the store)")
    p.add_argument("-o", "--out", dest="out_path", required=True, metavar="OUT",
                   help="the Parquet file, or with --format npy the directory, to write")
    p.add_argument("--format", choices=("parquet", "npy"), default="parquet", help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_export)

    p = ss.add_parser("failures", help="list images that could not be embedded", formatter_class=formatter_class,
                      description="List recorded failures (path, space, reason, attempts, time). They are cleared "
                      "when the images are embedded successfully on a later run.")
    p.add_argument("store", metavar="DIR", help="the store directory")
    p.add_argument("--space", metavar="FP", default=None, help="only this space")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_failures)

    p = ss.add_parser("compact", help="merge small shards and drop duplicate rows", formatter_class=formatter_class,
                      description="Merge small shard files into large ones and drop duplicate rows. Safe while "
                      "other processes read or write the store.")
    p.add_argument("store", metavar="DIR", help="the store directory")
    p.add_argument("--space", metavar="FP", default=None, help="only this space")
    p.set_defaults(func=_compact)


def _open(path: str):
    from featurebank.store import open_store

    return open_store(path, create=False)


def _info(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        info = store.info()
    if args.json:
        print(json.dumps({**info, "path": _p(info["path"])}, indent=2))
        return 0
    print(f"store {_p(info['path'])} (format {info['format_version']}), {_mb(info['bytes'])}")
    print(f"  stat cache: {info['n_stat_cache']} files, items: {info['n_items']}, failures: {info['n_failures']}")
    for s in info["spaces"]:
        print(f"  space {s['fingerprint']}")
        print(f"    dim {s['dim']} {s['dtype']}, {s['n_vectors']} vectors in {s['n_shards']} shards, {_mb(s['bytes'])}"
              + (f", {s['n_duplicate_rows']} duplicate rows (run `store compact`)" if s["n_duplicate_rows"] else ""))
        for k, v in sorted(s["info"].items()):
            print(f"    {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    if not info["spaces"]:
        print("  no spaces yet")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        rep = store.verify(quarantine=args.quarantine)
    if args.json:
        d = rep.to_dict()
        print(json.dumps({k: _p(v) if isinstance(v, str) else [_p(x) for x in v] if isinstance(v, list) else v
                          for k, v in d.items()}, indent=2))
        return 0 if rep.ok else 1
    print(f"{'OK' if rep.ok else 'PROBLEMS'}: {rep.n_spaces} spaces, {rep.n_shards} shards, "
          f"{rep.n_vectors} vectors ({rep.n_rows} rows)")
    for p in rep.problems:
        print(f"  problem: {_p(p)}")
    for q in rep.quarantined:
        print(f"  quarantined: {_p(q)}")
    for t in rep.stale_temps:
        print(f"  leftover temporary file of a dead writer (removed on next open): {_p(t)}")
    if rep.problems and not args.quarantine:
        print(f"run `featurebank store verify {_p(args.store)} --quarantine` to move broken shards aside")
    return 0 if rep.ok else 1


def _resolve_space(store, args: argparse.Namespace) -> str:
    """The space fingerprint for --space, or for --model (+ --output-name, --decode-mode)."""
    if args.space:
        return args.space
    from featurebank.artifact import read_model_card, resolve_space

    available = {s.fingerprint: len(s) for s in store.spaces()}
    return resolve_space(read_model_card(args.model), output=args.output_name, decode_mode=args.decode_mode,
                         available=available, model_name=args.model, store_name=str(store.root)).fingerprint


def _export(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        res = store.export(_resolve_space(store, args), args.out_path, format=args.format, overwrite=args.overwrite)
    print(f"wrote {res['n_vectors']} vectors (dim {res['dim']}) to {_p(res['path'])} ({res['format']})")
    return 0


def _failures(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        recs = store.failures(args.space)
    if args.json:
        print(json.dumps([{**r.__dict__, "path": _p(r.path)} for r in recs], indent=2))
        return 0
    if not recs:
        print("no failures recorded")
        return 0
    for r in recs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
        print(f"{_p(r.path)}\n    {_p(r.reason)}  (space {r.space[:12]}…, {r.attempts} attempt{'s' if r.attempts != 1 else ''}, {when})")
    print(f"{len(recs)} failures")
    return 0


def _compact(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        res = store.compact(args.space)
    for s in res["spaces"]:
        merged = (f"{s['shards_merged']} merged into {s['shards_written']}" if s["shards_merged"]
                  else "nothing to merge")
        meanwhile = (f"; {s['shards_added_meanwhile']} new shards from other writers arrived meanwhile"
                     if s["shards_added_meanwhile"] else "")
        print(f"space {s['fingerprint'][:12]}…: {s['shards_before']} -> {s['shards_after']} shards ({merged}), "
              f"{s['rows_dropped']} duplicate rows dropped{meanwhile}")
    if not res["spaces"]:
        print("no spaces to compact")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
