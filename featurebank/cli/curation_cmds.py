"""`featurebank audit | select | map`: thin shells over featurebank.curation."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from featurebank.cli.classify_cmds import _classifier_options, _params
from featurebank.cli.embed_cmds import add_model_options, open_runner

_AUDIT_COLUMNS = ("rank", "issue", "path", "given", "suggested", "self_confidence", "margin", "score", "related")
_SELECT_COLUMNS = ("rank", "path", "key", "predicted", "margin")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="DIR",
                   help="store directory: images not in it yet are embedded into it first (created if missing)")
    add_model_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, samples and random picks")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: one on stderr when it is a terminal)")


def _outputs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help=f"table on the terminal, or the {what} as JSON / CSV (each row with its path)")
    p.add_argument("-o", "--output", default=None, help="write the JSON / CSV here instead of stdout")
    p.add_argument("--sheet", default=None, metavar="FILE.png|FILE.html",
                   help=f"also write a contact sheet of the top {what} (thumbnail, labels)")
    p.add_argument("--sheet-size", type=int, default=48, metavar="N", help="tiles on the contact sheet")


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    p = sub.add_parser("audit", help="label errors, outliers, duplicates and leakage", formatter_class=formatter_class,
                       description="Audit labelled images on their vectors: likely label errors (confident learning on "
                       "out-of-fold probabilities, per-class thresholds), outliers (k-NN distance against the "
                       "dataset's own distribution; images far from every class), identical or near-identical images "
                       "with different labels, and with --test, images of the test set that are in the training "
                       "set (leakage). Images not yet in the store are embedded first.",
                       epilog="examples:\n  featurebank audit photos/ --store store/\n"
                       "  featurebank audit train/ --test test/ --store store/ --format csv -o suspects.csv "
                       "--sheet suspects.html")
    p.add_argument("source", metavar="SOURCE", help="labelled images: class subfolders or a list with a label column")
    p.add_argument("--test", default=None, metavar="SOURCE",
                   help="the test set: its images found in SOURCE are leakage")
    _common(p)
    _classifier_options(p)
    p.add_argument("--cv", type=int, default=5, metavar="K", help="folds of the out-of-fold probabilities")
    p.add_argument("--k", type=int, default=10, help="neighbours of the k-NN outlier distance")
    p.add_argument("--outlier-z", type=float, default=3.5,
                   help="robust z-score (MADs above the median distance) from which an image is an outlier")
    p.add_argument("--duplicate-threshold", type=float, default=0.98,
                   help="cosine similarity from which two images count as the same picture")
    _outputs(p, "suspects")
    p.set_defaults(func=_audit)

    p = sub.add_parser("select", help="which unlabelled images to label next (active learning)",
                       formatter_class=formatter_class,
                       description="Choose the BUDGET images of UNLABELLED to label next: uncertainty (smallest margin "
                       "of a classifier trained on --labelled), diversity (k-center greedy: a coreset of the vector "
                       "space; works with nothing labelled), combined (the most uncertain, then spread out) or random. "
                       "An image whose content is labelled already, renamed or not, is never proposed.",
                       epilog="examples:\n  featurebank select pool/ --budget 50 --store store/ --strategy diversity\n"
                       "  featurebank select pool/ --labelled labelled/ --budget 50 --store store/ --sheet next.png")
    p.add_argument("unlabelled", metavar="UNLABELLED", help="the pool: image files, folders or lists")
    p.add_argument("--labelled", default=None, metavar="SOURCE", help="the images labelled so far (class subfolders)")
    p.add_argument("--budget", type=int, required=True, metavar="N", help="how many images to propose")
    p.add_argument("--strategy", choices=("uncertainty", "diversity", "combined", "random"), default=None,
                   help="default: combined with --labelled, diversity without")
    _common(p)
    _classifier_options(p)
    _outputs(p, "picks")
    p.set_defaults(func=_select)

    p = sub.add_parser("map", help="a 2-D map of the vectors (PNG, or HTML with thumbnails on hover)",
                       formatter_class=formatter_class,
                       description="Draw the images' vectors on a 2-D map coloured by label: PCA, or UMAP when "
                       "umap-learn is installed (pip install 'featurebank[umap]'), fitted on a sample and applied "
                       "to all. The HTML page shows each point's thumbnail on hover.",
                       epilog="example:\n  featurebank map photos/ --store store/ -o map.html")
    p.add_argument("source", metavar="SOURCE", help="image files, folders or lists (class subfolders colour the map)")
    _common(p)
    p.add_argument("--method", choices=("pca", "umap"), default="pca", help="the projection")
    p.add_argument("--fit-size", type=int, default=5000, metavar="N", help="vectors the projection is fitted on")
    p.add_argument("--max-thumbnails", type=int, default=5000, metavar="N", help="HTML: points with a thumbnail")
    p.add_argument("-o", "--output", required=True, metavar="MAP.png|MAP.html", help="the picture to write")
    p.set_defaults(func=_map)


def _model_kw(args: argparse.Namespace) -> dict:
    from featurebank.artifact import DEFAULT_DECODE_MODE

    return {"decode_mode": args.decode_mode or DEFAULT_DECODE_MODE, "progress": args.progress}


def _check_sheet(path: str | None) -> None:
    if path is not None and os.path.splitext(path)[1].lower() not in (".png", ".html"):
        raise ValueError(f"--sheet is written as .png or .html; got {path!r}")


def _write_rows(rows: list[dict], columns: tuple[str, ...], args: argparse.Namespace, payload: dict) -> None:
    from featurebank.store import printable

    fh = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "json":
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        else:
            w = csv.writer(fh)
            w.writerow(columns)
            for r in rows:
                w.writerow(["" if r.get(c) is None
                            else printable(";".join(r[c]) if isinstance(r[c], list) else str(r[c])) for c in columns])
    finally:
        if args.output:
            fh.close()


def _table(rows: list[dict], columns: tuple[str, ...], limit: int = 25) -> None:
    from featurebank.store import printable

    def cell(r: dict, c: str) -> str:
        v = r.get(c)
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        if c == "path":  # relative to the working folder when shorter; a long one keeps its end
            rel = os.path.relpath(v) if os.path.isabs(v) else v
            shown = printable(rel if len(rel) < len(v) else v)
            return shown if len(shown) <= 60 else "…" + shown[-59:]
        return printable(str(v))

    cells = [[cell(r, c) for c in columns] for r in rows[:limit]]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if len(rows) > limit:
        print(f"... {len(rows) - limit} more (--format json|csv -o FILE for all)")


def _audit(args: argparse.Namespace) -> int:
    from featurebank.curation import audit_images, write_contact_sheet

    _check_sheet(args.sheet)
    report = audit_images(args.source, open_runner(args), store=args.store, test=args.test,
                          classifier=args.classifier, params=_params(args.param), cv=args.cv, random_state=args.seed,
                          k=args.k, outlier_z=args.outlier_z, duplicate_threshold=args.duplicate_threshold,
                          **_model_kw(args))
    rows, s = report["suspects"], report["summary"]
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in s["counts"].items())
    line = (f"audit of {s['n_images']} images, {len(s['classes'])} classes ({args.classifier}, {args.cv}-fold "
            f"out-of-fold accuracy {s['out_of_fold_accuracy']:.3f}): {counts}")
    if args.format == "table":
        print(line)
        if rows:
            _table(rows, ("rank", "issue", "given", "suggested", "self_confidence", "score", "path"))
    else:
        print(line, file=sys.stderr)
        _write_rows(rows, _AUDIT_COLUMNS, args, report)
    if args.sheet:
        tiles = [{"path": r["path"], "colour": _ISSUE_COLOURS[r["issue"]],
                  "lines": [f"#{r['rank']} {r['issue'].replace('_', ' ')}", f"given: {r['given']}",
                            f"suggested: {r['suggested']} ({r['self_confidence']:.2f})", os.path.basename(r["path"])]}
                 for r in rows[: args.sheet_size]]
        write_contact_sheet(tiles, args.sheet, title=line)
        print(f"wrote {args.sheet} ({len(tiles)} suspects)", file=sys.stderr)
    return 0


_ISSUE_COLOURS = {"leakage": "#7b1fa2", "conflict": "#e65100", "label": "#c62828", "outlier": "#1565c0",
                  "far_from_classes": "#2e7d32"}


def _select(args: argparse.Namespace) -> int:
    from featurebank.curation import select_images, write_contact_sheet

    _check_sheet(args.sheet)
    strategy = args.strategy or ("combined" if args.labelled else "diversity")
    result = select_images(args.unlabelled, open_runner(args), store=args.store, budget=args.budget,
                           labelled=args.labelled, strategy=strategy, classifier=args.classifier,
                           params=_params(args.param), random_state=args.seed, **_model_kw(args))
    rows, s = result["picks"], result["summary"]
    left_out = f", {s['already_labelled']} files left out as labelled already" if s["already_labelled"] else ""
    line = f"{len(rows)} of {s['pool']} unlabelled images to label next ({strategy}{left_out})"
    if args.format == "table":
        print(line)
        _table(rows, ("rank", "predicted", "margin", "path"), limit=max(25, len(rows)))
    else:
        print(line, file=sys.stderr)
        _write_rows(rows, _SELECT_COLUMNS, args, result)
    if args.sheet:
        tiles = [{"path": r["path"], "lines": [f"#{r['rank']}", os.path.basename(r["path"])]
                  + ([f"guess: {r['predicted']} (margin {r['margin']:.2f})"] if r["predicted"] is not None else [])}
                 for r in rows[: args.sheet_size]]
        write_contact_sheet(tiles, args.sheet, title=line)
        print(f"wrote {args.sheet} ({len(tiles)} picks)", file=sys.stderr)
    return 0


def _map(args: argparse.Namespace) -> int:
    from featurebank.curation import map_images
    from featurebank.curation.map import check_map_method, check_map_output

    check_map_method(args.method)  # before the model is opened or anything is embedded
    check_map_output(args.output)
    r = map_images(args.source, open_runner(args), args.output, store=args.store, method=args.method,
                   fit_size=args.fit_size, random_state=args.seed, max_thumbnails=args.max_thumbnails,
                   **_model_kw(args))
    print(f"wrote {r['path']}: {r['n_images']} images, {len(r['classes'])} classes, {r['method']}")
    return 0
