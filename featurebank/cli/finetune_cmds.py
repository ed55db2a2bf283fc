"""`featurebank finetune`: a thin shell over featurebank.finetune.job.finetune."""

from __future__ import annotations

import argparse
import sys


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1; got {value!r}") from None
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive); got {value!r}")
    return f


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune the top of a backbone with a new head (LP-FT) into one ONNX model",
        formatter_class=formatter_class,
        description="Train the layers from --unfreeze upward together with a new linear head, started from a "
        "linear probe on the frozen features (LP-FT), at a low learning rate, with early stopping on a "
        "validation split. The frozen layers run once per image. Writes one ONNX model that embeds "
        "(output features) and classifies (probabilities, label: `featurebank predict IMAGES --model "
        "model.onnx`), its learning curves next to it (<name>.curves.png) and per-epoch checkpoints "
        "(<model>.ckpt/; running again resumes). Prints the probe's cross-validated accuracy before and the "
        "fine-tuned validation accuracy after; says so when fine-tuning did not beat the probe.",
        epilog="example:\n  featurebank finetune photos/ --backbone efficientnet_lite0 --unfreeze blocks.6 -o model.onnx",
    )
    p.add_argument("source", metavar="SOURCE", help="labelled images: class subfolders, or a list file with labels")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--val", default=None, metavar="SOURCE",
                   help="labelled validation images (default: a --val-split share of SOURCE)")
    g.add_argument("--val-split", type=_fraction, default=0.2, metavar="F",
                   help="share of SOURCE held out for validation, seeded and stratified (default: 0.2)")
    p.add_argument("--backbone", default="efficientnet_lite0", metavar="NAME", help="default: efficientnet_lite0")
    p.add_argument("--weights", default=None, metavar="PATH|hub|random", help="weights source (default: the registry's)")
    p.add_argument("--unfreeze", default=None, metavar="LAYER",
                   help="first layer that trains, e.g. blocks.5 (default: by the number of training images: the "
                   "last stage (blocks.6 for efficientnet_lite0), the second-last from 2,000 images, the third-last "
                   "(blocks.4) from 5,000)")
    p.add_argument("--epochs", type=int, default=10, help="most epochs; early stopping after 3 without gain (default: 10)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate of the head; the unfrozen layers use lr/10 (default: 0.001)")
    p.add_argument("--train-bn", action="store_true",
                   help="batch norm of the unfrozen layers in train mode (default: off, inference mode)")
    p.add_argument("--augment", choices=("none", "light"), default="none",
                   help="light: each training image also gets --views augmented views (random resized crop, "
                   "flip), each run once through the frozen layers and cached; each epoch trains on one view "
                   "per image (default: none)")
    p.add_argument("--views", type=int, default=None, metavar="K",
                   help="augmented views per training image with --augment light (default: 4)")
    p.add_argument("--label-smoothing", type=float, default=None, metavar="E",
                   help="label smoothing of the loss (default: 0.1)")
    p.add_argument("--drop-rate", type=float, default=None, metavar="P",
                   help="dropout on the pooled features before the head (default: 0.2)")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="cache the frozen layers' activation maps in this store (exported once as ONNX with no "
                   "pooling), so a re-run or a new image computes only what is new (default: none, computed in "
                   "memory each run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, shuffles and parity inputs (default: 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: bars on stderr when it is a terminal)")
    p.add_argument("-o", "--out", required=True, metavar="MODEL.onnx", help="the ONNX model to write (required)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from featurebank.finetune.job import finetune

    def say(line: str) -> None:
        print(line, flush=True)

    r = finetune(
        args.source, out=args.out, backbone=args.backbone, weights=args.weights, unfreeze=args.unfreeze,
        epochs=args.epochs, lr=args.lr, val_split=args.val_split, val=args.val, seed=args.seed,
        train_bn=args.train_bn, store=args.store, augment=args.augment, views=args.views,
        log=say, **{k: v for k in ("label_smoothing", "drop_rate") if (v := getattr(args, k)) is not None},
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    say(f"fine-tuned: validation accuracy {r.val_accuracy:.4f} (best epoch {r.best_epoch} of {len(r.history) - 1})")
    if not r.beat_probe:
        say("fine-tuning did not beat the linear probe on the validation split; the model is written, but use the "
            f"probe: featurebank train {args.source} --store {args.store or 'DIR'} --classifier probe -o probe.fbclf")
    say(f"wrote {r.model_path} and {r.curves_path} (checkpoints: {r.checkpoint_dir})")
    return 0
