"""`featurebank sweep | fewshot`: thin shells over featurebank.studies."""

from __future__ import annotations

import argparse
import json

from featurebank.artifact import DECODE_MODES
from featurebank.embedder.devices import DEFAULT_DEVICE, DEVICES


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list; got {value!r}")
    return items


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    from featurebank.cli.embed_cmds import add_model_options

    p = sub.add_parser(
        "sweep", help="which layer to cut at: linear-probe accuracy per layer", formatter_class=formatter_class,
        description="Export BACKBONE with one output per layer, embed the labelled images of SOURCE once, and "
        "score a linear probe on each layer over the same seeded stratified folds (standardisation and C "
        "chosen inside each training fold). Prints a table, the recommended layer and the export command "
        "for it; --out writes sweep.json and sweep.png.",
        epilog="examples:\n  featurebank sweep photos/ --backbone efficientnet_lite0 --all-stages --store store/ --out sweep/\n"
        "  featurebank sweep train.csv --layers blocks.4,blocks.5,features --pool avg,gem --store store/",
    )
    p.add_argument("source", metavar="SOURCE", help="labelled images: class subfolders, or a list file with labels")
    p.add_argument("--backbone", default="efficientnet_lite0", metavar="NAME", help="default: efficientnet_lite0")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=_csv, metavar="A,B,C", help="layers to compare (`featurebank layers NAME`)")
    g.add_argument("--all-stages", action="store_true", help="every stage output and features (the default)")
    p.add_argument("--pool", type=_csv, default=["avg"], metavar="P[,Q]", help="pooling(s): avg, max, gem, token (default: avg)")
    p.add_argument("--weights", default=None, metavar="PATH|hub|random", help="weights source (default: the registry's)")
    p.add_argument("--store", required=True, metavar="DIR", help="store directory (created if missing; vectors are reused)")
    p.add_argument("--folds", type=int, default=5, help="stratified folds (default: 5)")
    p.add_argument("--inner-cv", type=float, default=5, metavar="K|FRACTION",
                   help="the probe's own C selection inside each training fold: k folds or a validation fraction (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds")
    p.add_argument("--out", default=None, metavar="DIR", help="write sweep.json and sweep.png there")
    p.add_argument("--decode-mode", choices=DECODE_MODES, default=None,
                   help="fast: reduced-size JPEG decoding (default); exact: the torch reference preprocessing")
    p.add_argument("--device", choices=DEVICES, default=DEFAULT_DEVICE,
                   help="auto: CUDA if it runs, else CPU (said on stderr); cuda: fail if CUDA does not run")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: one on stderr when it is a terminal)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_sweep)

    p = sub.add_parser(
        "fewshot", help="how many labels: accuracy vs labelled images per class, transfer vs raw pixels",
        formatter_class=formatter_class,
        description="Hold out a fixed stratified test split of SOURCE (or use --test-source), then for each shot "
        "count draw k labelled images per class from the rest (--repeats seeded draws) and train a linear probe "
        "and a prototype classifier on the model's vectors and on raw downscaled pixels (no transfer). Prints a "
        "table and from how many labels per class transfer wins; --out writes fewshot.json and fewshot.png. "
        "--finetune adds a curve of the backbone fine-tuned on the same draws, scored on the same test split (from "
        "how many labels per class it overtakes the probe), --scratch the same network trained from random weights; "
        "each of their points is a training run, so they are opt-in, take at most 100 labels per class and 1-3 "
        "draws, and print an ETA.",
        epilog="examples:\n  featurebank fewshot photos/ --store store/ --shots 1,2,5,10,20,all --out fewshot/\n"
        "  featurebank fewshot train/ --test-source test/ --model lite0.onnx --store store/ --pixels rgb\n"
        "  featurebank fewshot photos/ --store store/ --shots 1,5,10,50 --finetune --scratch --out fewshot/",
    )
    p.add_argument("source", metavar="SOURCE", help="labelled images: class subfolders, or a list file with labels")
    p.add_argument("--store", required=True, metavar="DIR", help="store directory (created if missing; vectors are reused)")
    add_model_options(p)
    p.add_argument("--shots", default="1,2,5,10,20,all", metavar="1,2,5,...,all", help="default: 1,2,5,10,20,all")
    p.add_argument("--repeats", type=int, default=5, help="seeded draws per shot count (default: 5)")
    p.add_argument("--test-size", type=float, default=0.25, metavar="FRACTION|COUNT",
                   help="held-out test split: a fraction, or a count >= 1 (default: 0.25)")
    p.add_argument("--test-source", default=None, metavar="SOURCE", help="a separate labelled test set instead")
    p.add_argument("--pixels", choices=("gray", "rgb"), default="gray", help="the raw-pixel baseline's colour (default: gray)")
    p.add_argument("--pixel-size", type=int, default=32, help="the raw-pixel baseline's side in pixels (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test split and of the draws")
    p.add_argument("--out", default=None, metavar="DIR", help="write fewshot.json and fewshot.png there")
    g = p.add_argument_group("fine-tuning curves (opt-in: each point is a training run)")
    g.add_argument("--finetune", action="store_true",
                   help="add a curve of the --backbone (default efficientnet_lite0; not --model, an ONNX file cannot "
                   "train) fine-tuned on each draw; shot counts at most 100; 'all' is not trained")
    g.add_argument("--scratch", action="store_true",
                   help="add a curve of the same network trained from random weights, every layer, same recipe")
    g.add_argument("--finetune-repeats", type=int, default=None, metavar="N",
                   help="draws per shot count for these curves, 1-3 (the probe's first N; default: min(--repeats, 3))")
    g.add_argument("--unfreeze", default=None, metavar="LAYER",
                   help="with --finetune: the first layer that trains (default: the last stage)")
    g.add_argument("--epochs", type=int, default=None, metavar="N", help="the most epochs of each run (default: 10)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar and, with --finetune/--scratch, no run/ETA lines (default: bars on stderr "
                   "when it is a terminal, run/ETA lines always)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_fewshot)


def _int_or_float(x: float) -> int | float:
    return int(x) if float(x).is_integer() and x >= 1 else float(x)


def _sweep(args: argparse.Namespace) -> int:
    from featurebank.studies import sweep_layers

    result = sweep_layers(
        args.source, backbone=args.backbone, layers=args.layers, all_stages=args.all_stages,
        pool=args.pool if len(args.pool) > 1 else args.pool[0], store=args.store, folds=args.folds, seed=args.seed,
        out_dir=args.out, weights=args.weights, inner_cv=_int_or_float(args.inner_cv), decode_mode=args.decode_mode,
        device=args.device, progress=args.progress,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def _fewshot(args: argparse.Namespace) -> int:
    from featurebank.cli.embed_cmds import resolve_model
    from featurebank.studies import fewshot_study

    curves = {"finetune": args.finetune, "scratch": args.scratch, "finetune_repeats": args.finetune_repeats,
              "unfreeze": args.unfreeze, "epochs": args.epochs}
    if args.finetune or args.scratch:
        # the training runs need the torch network, so the study gets the backbone, not an ONNX path
        if args.normalize or args.precision:
            raise ValueError("--normalize and --precision change only an ONNX export; with --finetune/--scratch "
                             "give --backbone NAME (with --layer, --pool, --weights) without them")
        from featurebank.cli.export_cmds import int8_options

        int8_options(args)  # --calibrate and the other int8 flags refused, not silently ignored
        if args.layers and len(args.layers) > 1:
            raise ValueError(f"a few-shot study needs one layer; got --layer {', '.join(args.layers)}: give --layer once")
        model = {"model": args.model, "backbone": args.backbone, "layer": args.layers[0] if args.layers else None,
                 "pool": args.pool, "weights": args.weights}
    else:
        model = {"model": resolve_model(args)}
    result = fewshot_study(
        args.source, store=args.store, **model, shots=args.shots, repeats=args.repeats,
        test_size=_int_or_float(args.test_size), test_source=args.test_source, pixels=args.pixels,
        pixel_size=args.pixel_size, seed=args.seed, out_dir=args.out, decode_mode=args.decode_mode,
        device=args.device, progress=args.progress, **curves,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0
