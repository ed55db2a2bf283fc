"""`featurebank backbones | layers | export | cut`: thin shells over featurebank.export."""

from __future__ import annotations

import argparse
import json

from featurebank.artifact import CARD_PRECISIONS, INPUT_FORMATS, POOLINGS, PRECISIONS

# The int8 options default to None and only the ones given are passed on, so the defaults live
# once, in featurebank.export.quantize (imported lazily: it costs 0.3 s of `--help`); the help
# texts quote them and tests/export/test_quantize.py pins the quotes.


def add_int8_options(p: argparse.ArgumentParser) -> None:
    """The --calibrate group: shared by `export` and every command that takes --backbone."""
    q = p.add_argument_group("int8", "static quantization calibrated on your images, refused unless the gates pass")
    q.add_argument("--calibrate", action="append", metavar="SOURCE",
                   help="images of your data (folder or .txt/.csv/.parquet list; repeatable): some calibrate, the "
                   "rest (at least 100) are held out for the gates")
    q.add_argument("--calibration-size", type=int, default=None, metavar="N",
                   help="images to calibrate on (default: 64)")
    q.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default=None,
                   help="how activation ranges are found (default: percentile)")
    q.add_argument("--exclude-node", dest="nodes_to_exclude", action="append", default=[], metavar="NODE",
                   help="graph node to keep in fp32 (repeatable; names from an ONNX viewer)")
    q.add_argument("--search-budget", dest="search_budget_s", type=float, default=None, metavar="SECONDS",
                   help="first measure which network stages lose most and keep them in fp32, within about this "
                   "many seconds; 0: no search (default: 300.0)")
    q.add_argument("--min-cosine", type=float, default=None,
                   help="gate: median cosine of int8 to fp32 vectors on the held-out images (default: 0.99)")
    q.add_argument("--min-knn-agreement", type=float, default=None,
                   help="gate: share of each held-out image's top-10 neighbours that int8 and fp32 agree on "
                   "(default: 0.9)")
    q.add_argument("--min-speedup", type=float, default=None,
                   help="gate: int8 / fp32 model-only images/s on this CPU; 0 records it without gating (default: 1.0)")


def int8_options(args: argparse.Namespace) -> dict:
    """The quantization keyword arguments the --calibrate group gave (``calibrate``: the listed
    image paths), {} for a float precision; refuses int8 without --calibrate and the int8 flags
    without --precision int8."""
    given = dict(calibration_size=args.calibration_size, calibration_method=args.calibration_method,
                 min_cosine=args.min_cosine, min_knn_agreement=args.min_knn_agreement, min_speedup=args.min_speedup,
                 search_budget_s=args.search_budget_s)
    quantize = {k: v for k, v in given.items() if v is not None}
    if args.nodes_to_exclude:
        quantize["nodes_to_exclude"] = args.nodes_to_exclude
    if args.precision == "int8":
        if not args.calibrate:
            raise ValueError("--precision int8 needs --calibrate SOURCE: images of your data to calibrate on and to "
                             "gate the int8 model with")
        from featurebank.embedder.sources import list_images

        quantize["calibrate"] = list_images(args.calibrate).paths
    elif args.calibrate or quantize:
        flags = ["--calibrate"] * bool(args.calibrate) + ["--" + k.replace("_", "-") for k in quantize]
        raise ValueError(f"{', '.join(flags).replace('--nodes-to-exclude', '--exclude-node')} only apply to "
                         "--precision int8")
    return quantize


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    p = sub.add_parser("backbones", help="list the registered backbones", formatter_class=formatter_class,
                       description="List the registered backbones with their preprocessing, default layer, "
                       "weights source and license. Any timm model name and torchvision/<model> also work.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_backbones)

    p = sub.add_parser("layers", help="list the layers a backbone can be cut at", formatter_class=formatter_class,
                       description="List the layers BACKBONE can be cut at, with output shape and stride.")
    p.add_argument("backbone", metavar="BACKBONE", help="a backbone name (`featurebank backbones` lists them)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_layers)

    p = sub.add_parser(
        "export", help="export a backbone cut at a layer to one ONNX file", formatter_class=formatter_class,
        description="Cut BACKBONE at one or more layers, add a pooling head, and write one self-describing "
        "ONNX file (preprocessing, layer, pooling, dim and weights hash in its metadata), verified against "
        "the source model.",
        epilog="examples:\n  featurebank export efficientnet_lite0 --layer blocks.5 --pool gem --normalize -o lite0-b5.onnx\n"
        "  featurebank export efficientnet_lite0 --input uint8 --precision int8 --calibrate photos/ -o lite0-int8.onnx",
    )
    p.add_argument("backbone", metavar="BACKBONE", nargs="?", default="efficientnet_lite0",
                   help="registry, timm or torchvision/<name> backbone (default: efficientnet_lite0)")
    p.add_argument("--layer", dest="layers", action="append", metavar="NAME",
                   help="layer to cut at (repeat for one output per layer; default: the backbone's default layer)")
    p.add_argument("--pool", choices=POOLINGS, default=None, help="pooling head (default: avg, token for ViTs, none for logits)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors inside the graph")
    p.add_argument("--precision", choices=CARD_PRECISIONS, default="fp32",
                   help="weights and activations of the graph (int8 needs --calibrate)")
    p.add_argument("--input", dest="input_format", choices=INPUT_FORMATS, default="float",
                   help="float: NCHW normalised float32; uint8: NHWC uint8 pixels, the graph normalises")
    p.add_argument("--weights", default=None, metavar="PATH|hub|random",
                   help="weights file (.pth/.safetensors), 'hub' to download, 'random' (default: the registry's source)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    add_int8_options(p)
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "cut", help="cut any ONNX model at an intermediate tensor", formatter_class=formatter_class,
        description="Cut an existing ONNX model (one featurebank did not write) at intermediate tensors, add "
        "pooling, and stamp the featurebank metadata. Preprocessing is given by flags.",
        epilog="examples:\n  featurebank cut resnet50.onnx --list\n"
        "  featurebank cut resnet50.onnx --at /layer3/layer3.5/relu_2/Relu_output_0 --pool avg -o r50-l3.onnx",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to cut")
    p.add_argument("--list", action="store_true", help="list candidate tensors with shapes and exit")
    p.add_argument("--at", action="append", metavar="TENSOR", help="tensor to cut at (repeat for several outputs)")
    p.add_argument("--pool", choices=POOLINGS, default="avg", help="pooling head over the cut tensor")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors inside the graph")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weights and activations of the graph")
    p.add_argument("--input", dest="input_format", choices=INPUT_FORMATS, default="float",
                   help="the model's input: float (NCHW, already normalised) or uint8 (NHWC pixels)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="model input height and width (default: read from the graph)")
    p.add_argument("--interpolation", default="bilinear", help="resize filter of the model's preprocessing")
    p.add_argument("--crop-pct", type=float, default=0.875,
                   help="centre crop: the short side is resized to input size / crop-pct, then cropped")
    p.add_argument("--mean", type=float, nargs=3, default=(0.485, 0.456, 0.406), help="per-channel RGB mean (0-1 scale)")
    p.add_argument("--std", type=float, nargs=3, default=(0.229, 0.224, 0.225), help="per-channel RGB std (0-1 scale)")
    p.add_argument("--name", default=None, help="backbone name stored in the card (default: the file stem)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="the ONNX file to write (needed unless --list)")
    p.set_defaults(func=_cut)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _backbones(args: argparse.Namespace) -> int:
    from featurebank.export.registry import DEFAULT_BACKBONE, list_backbones

    specs = list_backbones()
    if args.json:
        print(json.dumps([{**s.__dict__, "preprocessing": s.preprocessing.to_dict()} for s in specs], indent=2, default=list))
        return 0
    rows = [
        [s.name + (" *" if s.name == DEFAULT_BACKBONE else ""), "x".join(map(str, s.input_size[1:])), s.interpolation,
         f"{s.crop_pct:g}", s.default_layer, s.weights, s.license]
        for s in specs
    ]
    print(_table(rows, ["backbone", "input", "interp", "crop", "default layer", "weights", "license"]))
    print("\n* the default. Any timm model name (weights via --weights PATH or the hub) and torchvision/<model> also work.")
    return 0


def _layers(args: argparse.Namespace) -> int:
    from featurebank.export.layers import list_layers

    infos = list_layers(args.backbone)
    if args.json:
        print(json.dumps([{"name": i.name, "shape": i.shape, "stride": i.stride, "alias_of": i.alias_of} for i in infos], indent=2))
        return 0
    rows = [[i.name, "x".join(map(str, i.shape)), i.stride or "-", f"= {i.alias_of}" if i.alias_of else ""] for i in infos]
    print(_table(rows, ["layer", "output shape", "stride", ""]))
    return 0


def _describe(card, path: str) -> None:
    print(f"wrote {path}")
    for o in card.outputs:
        fig = card.verification.get("outputs", {}).get(o.name, {})
        check = f"  parity: min cosine {fig['min_cosine']:.6f}, max abs diff {fig['max_abs_diff']:.2e}" if fig else ""
        print(f"  output {o.name}: layer {o.layer}, pool {o.pooling}{', L2' if o.normalize else ''}, dim {o.dim}{check}")
    print(f"  input {card.input_name}: {card.input_format}, preprocessing {json.dumps(card.preprocessing.to_dict())}")
    print(f"  weights {card.weights_source} sha256 {card.weights_sha256[:16]}..., precision {card.precision}")
    if card.quantization:
        q, gates = card.quantization, card.verification.get("gates", {})
        st = q["settings"]
        print(f"  int8 for kernel class {q['kernel_class']}: {st['activation_type']} x {st['weight_type']}, "
              f"{'per-channel' if st['per_channel'] else 'per-tensor'}, reduce_range {st['reduce_range']}; "
              f"{q['calibration_method']} calibration on {q['calibration_size']} images"
              + (f"; fp32 nodes {', '.join(q['nodes_to_exclude'])}" if q["nodes_to_exclude"] else ""))
        for name, fig in gates.get("outputs", {}).items():
            print(f"  gates {name} on {fig['n']} held-out images: cosine to fp32 median {fig['median_cosine']:.4f}, "
                  f"p1 {fig['p1_cosine']:.4f}, min {fig['min_cosine']:.4f}; top-{fig['k']} neighbour agreement "
                  f"{fig['knn_agreement']:.3f}")
        if "speed" in gates:
            sp = gates["speed"]
            print(f"  speed: {sp['int8_images_per_cpu_s']:.1f} images per CPU second int8 vs "
                  f"{sp['fp32_images_per_cpu_s']:.1f} fp32 ({sp['speedup']:.2f}x, model only; by wall time "
                  f"{sp['wall_speedup']:.2f}x)")
    print(f"  fingerprint {card.fingerprint}")


def _export(args: argparse.Namespace) -> int:
    from featurebank.export.onnx_export import export_backbone

    quantize = int8_options(args)
    card = export_backbone(
        args.backbone, args.output, layers=args.layers, pool=args.pool, normalize=args.normalize,
        precision=args.precision, input_format=args.input_format, weights=args.weights, **quantize,
    )
    _describe(card, args.output)
    return 0


def _cut(args: argparse.Namespace) -> int:
    from featurebank.export.onnx_cut import cut_onnx, list_onnx_tensors

    if args.list:
        rows = [[t.name, "x".join(str(s) for s in t.shape) if t.shape else "?", t.op_type] for t in list_onnx_tensors(args.model)]
        print(_table(rows, ["tensor", "shape", "op"]))
        return 0
    if not args.at or not args.output:
        from featurebank.errors import UnknownTensorError

        raise UnknownTensorError("give --at TENSOR and -o OUT.onnx (or --list to see the tensors)")
    from featurebank.artifact import Preprocessing
    from featurebank.export.onnx_cut import graph_input_size

    size = tuple(args.input_size) if args.input_size else graph_input_size(args.model)
    pre = Preprocessing(input_size=(3, *size), interpolation=args.interpolation, crop_pct=args.crop_pct,
                        mean=tuple(args.mean), std=tuple(args.std))
    card = cut_onnx(args.model, args.at, args.output, pool=args.pool, normalize=args.normalize, preprocessing=pre,
                    input_format=args.input_format, precision=args.precision, backbone=args.name)
    _describe(card, args.output)
    return 0
