"""Export a pretrained backbone, cut at one or more layers, as one self-describing ONNX file.

The recipe:

1. build the backbone and load its weights (:mod:`featurebank.export.weights`);
2. cut it with FX so the graph holds only what the chosen layers need
   (:func:`featurebank.export.layers.truncate`);
3. ``torch.onnx.export`` the raw feature maps (float NCHW input ``pixels``, dynamic batch);
4. add the pooling / L2 heads and, for ``input_format="uint8"``, the pixel-scaling prefix
   (:mod:`featurebank.export.heads`, shared with ``featurebank cut``); fp16 if asked;
5. stamp the :class:`~featurebank.artifact.ModelCard` into ``metadata_props``;
6. verify: ``onnx.checker`` (full check), then onnxruntime against torch on seeded inputs
   (:func:`featurebank.export.parity.compare_outputs`); a mismatch raises
   :class:`~featurebank.errors.ExportParityError`;
7. write atomically: nothing is left at the output path unless every step passed.

``precision="int8"`` exports fp32 to a temporary file first, then quantizes it with
calibration images and gates (:func:`featurebank.export.quantize.quantize_model`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from featurebank._atomic import write_bytes_atomic
from featurebank.artifact import (
    CARD_PRECISIONS,
    INPUT_FORMATS,
    POOLINGS,
    QUANTIZED_PRECISIONS,
    ModelCard,
    OutputSpec,
    write_model_card,
)
from featurebank.errors import ExportParityError, UnknownLayerError
from featurebank.export.heads import HeadSpec, add_heads, convert_to_fp16
from featurebank.export.layers import LayerInfo, list_layers, resolve_layers, truncate
from featurebank.export.parity import PATCH_POOLINGS, compare_outputs, normalise_pixels, pool_reference, seeded_pixels
from featurebank.export.quantize import DEFAULT_CALIBRATION_SIZE, MIN_HOLDOUT, quantize_model
from featurebank.export.registry import DEFAULT_BACKBONE, get_backbone
from featurebank.export.weights import build_backbone

__all__ = ["export_backbone", "OPSET"]

OPSET = 18


def _default_pool(info: LayerInfo, model: torch.nn.Module) -> str:
    if info.layout == "NC":
        return "none"
    if info.layout == "NLC":
        return "token" if getattr(model, "cls_token", None) is not None else "avg"
    return "avg"


def _output_names(layers: Sequence[LayerInfo]) -> list[str]:
    if len(layers) == 1:
        return ["embedding"]
    return [f"embedding:{info.name}" for info in layers]


def _check_output_path(output: str | os.PathLike[str]) -> Path:
    path = Path(output)
    if path.is_dir():
        raise IsADirectoryError(21, "output path is a directory; give a file name like model.onnx", str(path))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(2, "output folder does not exist; create it first", str(folder))
    if not os.access(folder, os.W_OK):
        raise PermissionError(13, "output folder is not writable", str(folder))
    return path


def export_backbone(
    backbone: str = DEFAULT_BACKBONE,
    output: str | os.PathLike[str] = "model.onnx",
    *,
    layers: Sequence[str] | str | None = None,
    pool: str | None = None,
    normalize: bool = False,
    precision: str = "fp32",
    input_format: str = "float",
    weights: str | os.PathLike[str] | None = None,
    verify_pixels: np.ndarray | None = None,
    seed: int = 0,
    calibrate: Sequence[str | os.PathLike[str]] | None = None,
    **quantize: Any,
) -> ModelCard:
    """Export ``backbone`` cut at ``layers`` to ``output`` and return its model card.

    Parameters
    ----------
    backbone : registry name, timm model name, or ``torchvision/<name>``
    output : path of the ONNX file to write
    layers : layer name(s) from :func:`~featurebank.export.layers.list_layers`; default the
        backbone's ``default_layer``. Several give one graph output per layer.
    pool : ``avg`` | ``max`` | ``gem`` | ``token`` | ``none``; default ``avg`` for feature
        maps, ``token`` for ViT tokens, ``none`` for logits
    normalize : L2-normalise each output vector inside the graph
    precision : ``fp32`` or ``fp16`` (weights and compute; inputs/outputs stay float32), or
        ``int8`` (needs ``calibrate``)
    input_format : ``float`` (NCHW float32, normalised) or ``uint8`` (NHWC uint8 pixels,
        resized and cropped; the graph scales and normalises)
    weights : None (the registry's source), a weights file, ``"hub"`` or ``"random"``
    verify_pixels : optional (N, H, W, 3) uint8 images (already resized and cropped) added to
        the seeded parity inputs, e.g. real photos
    seed : seeds the random weights of test models and the parity inputs
    calibrate : with ``precision="int8"`` only: image files of your data to calibrate on and
        to gate with (see :func:`~featurebank.export.quantize.quantize_model`, whose keyword
        arguments ``calibration_size``, ``calibration_method``, ``nodes_to_exclude``,
        ``min_cosine``, ``min_knn_agreement``, ``min_speedup`` ... pass through ``quantize``)

    Returns
    -------
    ModelCard
        The card written into the file, with the parity figures in ``verification``.

    Raises
    ------
    UnknownBackboneError, UnknownLayerError, WeightsMismatchError, WeightsNotFoundError,
    ExportParityError, OSError (output not writable), QuantizationError, QuantizationGateError
    """
    if precision not in CARD_PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(map(repr, CARD_PRECISIONS))}; got precision={precision!r}")
    if precision in QUANTIZED_PRECISIONS:
        if not calibrate:
            raise ValueError(f"precision={precision!r} needs calibration images of your data: pass calibrate=[image "
                             "paths] (--calibrate SOURCE, a folder or list of at least "
                             f"{DEFAULT_CALIBRATION_SIZE + MIN_HOLDOUT} images)")
        out_path = _check_output_path(output)
        with tempfile.TemporaryDirectory(prefix=".featurebank-export-", dir=out_path.parent) as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            export_backbone(backbone, fp32, layers=layers, pool=pool, normalize=normalize, precision="fp32",
                            input_format=input_format, weights=weights, verify_pixels=verify_pixels, seed=seed)
            return quantize_model(fp32, out_path, calibrate, seed=seed, **quantize)
    if calibrate is not None or quantize:
        given = ", ".join(["calibrate"] * (calibrate is not None) + sorted(quantize))
        raise ValueError(f"{given} only apply to precision='int8'; got precision={precision!r}")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be {' or '.join(map(repr, INPUT_FORMATS))}; got input_format={input_format!r}")
    if pool is not None and pool not in POOLINGS:
        raise ValueError(f"pool must be one of {', '.join(POOLINGS)}; got pool={pool!r}")
    out_path = _check_output_path(output)
    spec = get_backbone(backbone)
    requested = [layers] if isinstance(layers, str) else list(layers or [spec.default_layer])

    loaded = build_backbone(spec, weights, seed=seed)
    infos = list_layers(spec, loaded.model)
    chosen = resolve_layers(requested, infos)
    pools = []
    for info in chosen:
        p = pool or _default_pool(info, loaded.model)
        if info.layout == "NC" and p != "none":
            raise UnknownLayerError(f"layer {info.name!r} is already a vector ({info.shape}); use --pool none")
        if p == "token" and info.layout != "NLC":
            raise UnknownLayerError(
                f"--pool token needs a token layer (N, tokens, C); {info.name!r} is a {info.layout} map; use avg, max or gem"
            )
        pools.append(p)
    cut = truncate(loaded.model, spec, chosen)
    names = _output_names(chosen)

    with tempfile.TemporaryDirectory(prefix=".featurebank-export-", dir=out_path.parent) as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        dummy = torch.zeros(2, *spec.input_size)
        raw_names = [f"raw{i}" for i in range(len(chosen))]
        _torch_to_onnx(cut, dummy, raw_path, raw_names)
        raw = onnx.load(str(raw_path))
        # timm ViTs: avg/max/gem pool the patch tokens only, as timm's global_pool="avg" does
        prefix = int(getattr(loaded.model, "num_prefix_tokens", 0) or 0)
        heads = [
            HeadSpec(tensor=raw_names[i], name=names[i], pooling=pools[i], normalize=normalize,
                     layout=info.layout if info.layout != "NC" else "NCHW",
                     skip_tokens=prefix if info.layout == "NLC" and pools[i] in PATCH_POOLINGS else 0)
            for i, info in enumerate(chosen)
        ]
        model = add_heads(raw, heads, input_format=input_format, preprocessing=spec.preprocessing)
        if precision == "fp16":
            model = convert_to_fp16(model)

        # the card (verification figures added after the check)
        outputs = []
        for i, info in enumerate(chosen):
            shape = info.shape if pools[i] == "none" else ((info.shape[0],) if info.layout == "NCHW" else (info.shape[-1],))
            outputs.append(
                OutputSpec.make(
                    name=names[i], layer=info.name, pooling=pools[i], normalize=normalize, shape=shape,
                    backbone=spec.name, weights_sha256=loaded.weights_sha256, weights_source=loaded.weights_source,
                    preprocessing=spec.preprocessing, precision=precision,
                )
            )

        # verify against torch
        pixels = seeded_pixels(4, spec.input_size[1], spec.input_size[2], seed=seed)
        if verify_pixels is not None:
            pixels = np.concatenate([pixels, np.asarray(verify_pixels, np.uint8)], axis=0)
        floats = normalise_pixels(pixels, spec.mean, spec.std)
        with torch.no_grad():
            refs = [t.numpy() for t in cut(torch.from_numpy(floats))]
        figures = _verify(model, refs, heads, pixels if input_format == "uint8" else floats, precision)

        card = ModelCard(
            backbone=spec.name,
            weights_source=loaded.weights_source,
            weights_sha256=loaded.weights_sha256,
            weights_license=spec.license,
            outputs=tuple(outputs),
            preprocessing=spec.preprocessing,
            input_name="pixels",
            input_format=input_format,
            precision=precision,
            verification={"inputs": int(pixels.shape[0]), "seed": seed, "outputs": figures},
        )
        write_model_card(model, card)  # metadata only: the graph checked in _verify is unchanged
        write_bytes_atomic(out_path, model.SerializeToString())
    return card


def _torch_to_onnx(cut: torch.nn.Module, dummy: torch.Tensor, path: Path, names: list[str]) -> None:
    """Export the truncated network's raw feature maps with torch's exporter.

    torch.export-based (``dynamo=True``, torch's default since 2.9) first: it folds batch
    norms and gives a compact graph. A few models it cannot capture still export with the
    TorchScript tracer; either way the parity check below verifies the result.
    """
    import contextlib
    import io
    import logging
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(
                    cut, (dummy,), str(path), input_names=["pixels"], output_names=names,
                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                )
            return
        except Exception as exc:  # torch.export raises many types (Unsupported, UserError, ...)
            logging.getLogger("featurebank").info("torch.export could not capture the model (%s); using the tracer", exc)
        torch.onnx.export(
            cut, (dummy,), str(path), input_names=["pixels"], output_names=names,
            dynamic_axes={"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )


def _verify(model: onnx.ModelProto, refs: list[np.ndarray], heads: list[HeadSpec], feed: np.ndarray, precision: str) -> dict:
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # The check runs on the CPU everywhere, so an export verifies the same on any machine
    # (fp16 graphs keep the few ops the CPU provider lacks in fp32; see heads.convert_to_fp16).
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = sess.run([h.name for h in heads], {"pixels": feed})
    figures = {}
    for ref, out, head in zip(refs, got, heads):
        if head.pooling == "none":
            expected = pool_reference(ref, "none", layout=head.layout, normalize=head.normalize) if ref.ndim > 2 else _l2(ref, head.normalize)
        else:
            expected = pool_reference(ref, head.pooling, layout=head.layout, normalize=head.normalize,
                                      skip_tokens=head.skip_tokens)
        try:
            figures[head.name] = compare_outputs(expected, out, precision, name=head.name)
        except ExportParityError as exc:
            raise ExportParityError(f"{exc}; the export was not written") from None
    return figures


def _l2(x: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return x.astype(np.float32)
    n = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)
