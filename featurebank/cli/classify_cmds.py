"""`featurebank train | evaluate | predict | fuse`: thin shells over featurebank.workflow
and featurebank.classifiers."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from featurebank.cli.embed_cmds import add_model_options, open_runner


def _params(pairs: list[str] | None) -> dict:
    """`--param C=0.1 --param kernel=rbf` -> {"C": 0.1, "kernel": "rbf"} (JSON values where they parse)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param takes NAME=VALUE; got {pair!r}")  # the shell prints it as one line
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _classifier_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", default="probe", metavar="NAME",
                   help="probe (logistic regression, C by CV), knn (FAISS), prototype (nearest class mean), "
                   "or any scikit-learn classifier: SVC, RandomForestClassifier, sklearn.svm.LinearSVC ...")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="classifier parameter (repeatable)")


def _max_classifier_bytes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-classifier-bytes", type=int, default=None, metavar="N",
                   help="refuse a classifier file whose contents inflate past N bytes (default 1 GiB); raise it "
                   "only for files you trust")


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    p = sub.add_parser("train", help="train a classifier on the images' vectors", formatter_class=formatter_class,
                       description="Train a classifier on labelled images (class subfolders or a label column). "
                       "Images not yet in the store are embedded first.",
                       epilog="example:\n  featurebank train photos/textures --store store/ --classifier probe -o textures.fbclf")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="labelled images: a folder with class subfolders, or a list file with a label column")
    p.add_argument("--store", required=True, metavar="DIR",
                   help="store directory: images not in it yet are embedded into it first (created if missing)")
    add_model_options(p)
    _classifier_options(p)
    p.add_argument("-o", "--output", required=True, metavar="CLF.fbclf", help="the classifier file to write")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: one on stderr when it is a terminal)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="held-out or k-fold evaluation, confusion matrix PNG", formatter_class=formatter_class,
                       description="Evaluate a classifier on labelled images: prints accuracy, balanced accuracy and "
                       "per-class precision/recall; with --out, also writes a JSON report and a confusion matrix PNG.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="labelled images: a folder with class subfolders, or a list file with a label column")
    p.add_argument("--store", required=True, metavar="DIR",
                   help="store directory: images not in it yet are embedded into it first (created if missing)")
    add_model_options(p)
    _classifier_options(p)
    p.add_argument("--cv", type=int, default=None, metavar="K", help="k-fold instead of one held-out split")
    p.add_argument("--test-size", type=float, default=0.25, help="without --cv: the fraction of images held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split or the folds")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write report.json and confusion_matrix.png into DIR (default: print the report only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: one on stderr when it is a terminal)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="labels and probabilities for images", formatter_class=formatter_class,
                       description="Predict labels for images with a saved classifier, or with a model that "
                       "classifies by itself (from `featurebank fuse` or `featurebank finetune`); CSV or JSON.")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or lists")
    p.add_argument("--classifier", default=None, metavar="CLF.fbclf",
                   help="a classifier file from `featurebank train` (default: the model's own probabilities / label "
                   "outputs, which a fused or fine-tuned model has)")
    _max_classifier_bytes_option(p)
    add_model_options(p)
    p.add_argument("--store", default=None, metavar="DIR", help="reuse / fill this store (optional)")
    p.add_argument("--top-k", type=int, default=3, help="labels listed per image, most probable first")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="output format")
    p.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: one on stderr when it is a terminal)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("fuse", help="backbone + classifier as one ONNX graph", formatter_class=formatter_class,
                       description="Join a backbone ONNX model and a saved classifier into one ONNX graph: pixels in, "
                       "label and probabilities out, checked equal to the two-step path.")
    p.add_argument("--model", required=True, metavar="MODEL.onnx", help="the backbone model the classifier was trained on")
    p.add_argument("--classifier", required=True, metavar="CLF.fbclf", help="a classifier file from `featurebank train`")
    _max_classifier_bytes_option(p)
    p.add_argument("-o", "--output", required=True, metavar="END2END.onnx", help="the fused ONNX file to write")
    p.set_defaults(func=_fuse)


def _train(args: argparse.Namespace) -> int:
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.workflow import train_classifier

    r = train_classifier(args.sources, open_runner(args), args.output, store=args.store, classifier=args.classifier,
                         params=_params(args.param), decode_mode=args.decode_mode or DEFAULT_DECODE_MODE,
                         progress=args.progress)
    print(f"wrote {r['path']}: {args.classifier} on {r['n_samples']} images, {len(r['classes'])} classes "
          f"({', '.join(map(str, r['classes'][:10]))}{' ...' if len(r['classes']) > 10 else ''}), "
          f"training accuracy {r['train_accuracy']:.3f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.workflow import evaluate_on_images

    r = evaluate_on_images(args.sources, open_runner(args), store=args.store, classifier=args.classifier,
                           params=_params(args.param), cv=args.cv, test_size=args.test_size, random_state=args.seed,
                           out_dir=args.out, decode_mode=args.decode_mode or DEFAULT_DECODE_MODE, progress=args.progress)
    how = f"{args.cv}-fold" if args.cv else f"held-out {args.test_size:g}"
    print(f"{args.classifier}, {how}: accuracy {r['accuracy']:.4f}, balanced accuracy {r['balanced_accuracy']:.4f} "
          f"on {r['n_evaluated']} images")
    width = max(len(str(c)) for c in r["per_class"])
    for cls, m in r["per_class"].items():
        print(f"  {str(cls):{width}s}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  n={m['support']}")
    if args.out is not None:
        print(f"wrote {args.out}/report.json and {args.out}/confusion_matrix.png")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from featurebank.store import printable
    from featurebank.workflow import predict_images

    rows = predict_images(args.images, args.classifier, open_runner(args), store=args.store, top_k=args.top_k,
                          progress=args.progress, max_classifier_bytes=args.max_classifier_bytes,
                          decode_mode=args.decode_mode)
    fh = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if args.format == "json":
            json.dump(rows, fh, indent=2)
            fh.write("\n")
        else:
            w = csv.writer(fh)
            w.writerow(["path", "label", "probability", "top", "error"])
            for r in rows:
                top = ";".join(f"{lab}:{p:.4f}" for lab, p in r.get("top", []))
                # a file name that is not UTF-8 is written with \xNN escapes (a CSV is text)
                w.writerow([printable(r["path"]), printable(str(r.get("label", ""))),
                            f"{r['probability']:.4f}" if "probability" in r else "", printable(top),
                            printable(r.get("error", ""))])
    finally:
        if args.output:
            fh.close()
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from featurebank.artifact import read_model_card, resolve_space
    from featurebank.classifiers import fuse_classifier, load_classifier

    saved = load_classifier(args.classifier, max_bytes=args.max_classifier_bytes)
    # the classifier's space picks the model output it reads, and refuses another model's
    space = resolve_space(read_model_card(args.model), recorded={f"classifier {args.classifier!r}": saved.fingerprint})
    path = fuse_classifier(args.model, saved.estimator, args.output, output=space.output.name)
    print(f"wrote {path}: {saved.meta.get('backbone', 'backbone')} + {saved.estimator_type.rsplit('.', 1)[-1]}, "
          "outputs label and probabilities (checked equal to the two-step path)")
    return 0
