"""`featurebank embed | doctor`: thin shells over featurebank.embedder."""

from __future__ import annotations

import argparse
import json
import sys

from featurebank.artifact import CARD_PRECISIONS, DECODE_MODES, POOLINGS
from featurebank.cli.export_cmds import add_int8_options, int8_options
from featurebank.cli.ray_options import embed_on_ray, register_ray_options, uses_ray
from featurebank.embedder.devices import DEFAULT_DEVICE, DEVICES


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model / --backbone (+ export options): shared by every command that embeds."""
    g = p.add_argument_group("model (one of)")
    g.add_argument("--model", metavar="MODEL.onnx", help="a featurebank ONNX model (from `featurebank export` or `cut`)")
    g.add_argument("--backbone", metavar="NAME",
                   help="export NAME on first use into the model cache, reuse it after (default: efficientnet_lite0)")
    g.add_argument("--layer", dest="layers", action="append", metavar="NAME", help="with --backbone: layer(s) to cut at")
    g.add_argument("--pool", choices=POOLINGS, help="with --backbone: pooling head")
    g.add_argument("--normalize", action="store_true", default=None, help="with --backbone: L2-normalise in the graph")
    g.add_argument("--precision", choices=CARD_PRECISIONS, help="with --backbone (int8 needs --calibrate)")
    g.add_argument("--weights", metavar="PATH|hub|random", help="with --backbone: weights source")
    add_int8_options(p)
    p.add_argument("--decode-mode", choices=DECODE_MODES, default=None,
                   help="fast: reduced-size JPEG decoding (default; see README); exact: the torch reference preprocessing")
    p.add_argument("--device", choices=DEVICES, default=DEFAULT_DEVICE,
                   help="auto: CUDA if it runs, else CPU (said on stderr); cuda: fail if CUDA does not run")


def resolve_model(args: argparse.Namespace) -> str:
    """The ONNX path named by --model, or the cached export of --backbone."""
    if args.model and args.backbone:
        raise ValueError("give --model or --backbone, not both")
    quantize = int8_options(args)
    if args.model:
        if quantize:
            raise ValueError("--precision int8 and --calibrate apply to --backbone (an export); --model is used as it "
                             "is: quantize it with `featurebank export --precision int8` first")
        return args.model
    uint8 = {"input_format": "uint8"}  # a quarter of the bytes to move per image; same vectors
    from featurebank.export.cache import cached_export

    return str(cached_export(args.backbone or "efficientnet_lite0", layers=args.layers, pool=args.pool,
                             normalize=args.normalize, precision=args.precision, weights=args.weights, **uint8,
                             **quantize))


def open_runner(args: argparse.Namespace):
    from featurebank.embedder.session import open_model

    runner = open_model(resolve_model(args), device=args.device)
    print(f"model {runner.card.backbone} ({', '.join(o.layer for o in runner.card.outputs)}) on {runner.provider}",
          file=sys.stderr)
    return runner


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    p = sub.add_parser(
        "embed", help="embed folders / lists of images into a store", formatter_class=formatter_class,
        description="Embed images into a content-addressed store. SOURCE is a folder (recursive; class "
        "subfolders give labels), a .txt/.csv/.parquet list of paths (optional label column), or several. "
        "Images already in the store for this model and decode mode are not embedded again; a killed run "
        "resumes where it stopped.",
        epilog="examples:\n  featurebank embed photos/ --store store/\n"
        "  featurebank embed train.csv val.csv --model lite0.onnx --store store/ --decode-mode exact",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder of images, a .txt/.csv/.parquet list of paths, or several")
    p.add_argument("--store", required=True, metavar="DIR", help="store directory (created if missing)")
    add_model_options(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch and per store shard (default: measured once for this machine and model, "
                   "by the first run of at least 256 images, and cached beside the model; 16 before that and on Ray)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode threads (default: measured with the batch size; all cores before that)")
    p.add_argument("--retry-failed", action="store_true", help="try again the images that failed before")
    p.add_argument("--store-dtype", choices=("float32", "float16"), default=None,
                   help="on-disk precision of a new space (float16: half the disk; loads as float32)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: one on stderr when it is a terminal)")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON")
    register_ray_options(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("doctor", help="check onnxruntime providers and tell what to fix", formatter_class=formatter_class,
                       description="Report the installed onnxruntime, its execution providers, run a tiny inference "
                       "on each, and say what to fix.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_doctor)


def _embed(args: argparse.Namespace) -> int:
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.embed_into_store import embed_images

    if uses_ray(args):  # the same run on a Ray cluster, into the same store
        from featurebank.distributed.locations import list_sources

        images = args.sources = list_sources(args.sources)  # listed once, here, to report what was skipped
        _say_skipped(images)
        r = embed_on_ray(args, resolve_model(args))
    else:
        from featurebank.embedder.sources import list_images

        images = list_images(args.sources)
        _say_skipped(images)
        runner = open_runner(args)
        emb = embed_images(
            images, runner, store=args.store, decode_mode=args.decode_mode or DEFAULT_DECODE_MODE,
            batch_size=args.batch_size, workers=args.workers, retry_failed=args.retry_failed,
            return_vectors=False, progress=args.progress, store_dtype=args.store_dtype,
        )
        r = emb.report
    if args.json:
        print(json.dumps({"total": r.total, "embedded": r.embedded, "cached": r.cached, "failed": r.failed,
                          "skipped_failed": r.skipped_failed, "duplicates": r.duplicates, "elapsed_s": r.elapsed,
                          "images_per_s": r.images_per_s, "timings_s": r.timings, "skipped_files": images.skipped,
                          "failures": [{"path": p, "reason": why} for p, why in r.failures]}, indent=2))
    else:
        for path, why in r.failures[:20]:
            print(f"failed: {why}" if path in why else f"failed: {path}: {why}", file=sys.stderr)
        if len(r.failures) > 20:
            print(f"... and {len(r.failures) - 20} more (featurebank store failures {args.store})", file=sys.stderr)
        print(r.summary())
    return 0


def _say_skipped(images) -> None:
    """Files a folder walk left out (not an accepted image format), by extension, on stderr."""
    if images.skipped:
        print(images.skipped_summary(), file=sys.stderr)


def _doctor(args: argparse.Namespace) -> int:
    from featurebank.embedder.doctor import run_doctor

    report = run_doctor()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["text"])
    return 0 if report["ok"] else 1
