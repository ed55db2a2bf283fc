"""The model cache: ``featurebank embed --backbone NAME`` exports on first use, reuses after.

Exported files live in ``$FEATUREBANK_CACHE`` (default ``~/.cache/featurebank``) under
``models/``, named by the backbone and a hash of the export options, so each distinct recipe
is exported once (the hash includes `GRAPH_VERSION`, so a featurebank that exports a better
graph does not keep serving the old one). A cached file is used only if its model card still
reads back.

An INT8 model (``precision="int8"``, ``calibrate=[image paths]``) is keyed on its whole recipe:
the fp32 export options, the calibration images by content (the sha256 of each distinct file,
the store's content key, so renaming or re-listing them changes nothing and editing one
rebuilds), every :func:`~featurebank.export.quantize.quantize_model` setting with its default
filled in (calibration size and method, nodes kept in fp32, search budget, gates) and this
CPU's integer-kernel class (an INT8 model is gated on, and only opened on, a CPU of its class:
a cache copied to another class of machine builds its own). It is quantized from the cached fp32
export of the same options, so the fp32 model is exported once for both. A set of images too
small for the gates is refused before anything is exported; an export that misses a gate writes
nothing, so the next call measures again.

Finding a cached file imports neither torch nor timm: the key is computed and the file checked
first, and the export machinery is imported only on a miss (a cached ``featurebank embed
--backbone NAME`` starts in a fraction of a second).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featurebank.artifact import fingerprint_of, read_model_card
from featurebank.errors import ModelCardError, NotOnnxModelError

__all__ = ["cache_dir", "cached_export"]


def cache_dir() -> Path:
    """The featurebank cache folder (``$FEATUREBANK_CACHE`` or ``~/.cache/featurebank``)."""
    root = os.environ.get("FEATUREBANK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featurebank"
    )
    return Path(root)


def cached_export(backbone: str, **export_options: Any) -> Path:
    """Path of ``backbone`` exported with ``export_options``, exporting it if not cached.

    ``export_options`` are those of :func:`~featurebank.export.onnx_export.export_backbone`
    (layers, pool, normalize, precision, input_format, weights; with ``precision="int8"``,
    ``calibrate`` (image paths) and :func:`~featurebank.export.quantize.quantize_model`'s
    keyword arguments: calibration_size, calibration_method, min_cosine, ...).

    Raises
    ------
    ValueError : ``calibrate`` or a quantization option without ``precision="int8"``, or
        ``precision="int8"`` without ``calibrate``
    QuantizationError : fewer distinct calibration images than the calibration and the gates
        need (the message gives the count); raised before any export
    QuantizationGateError : the INT8 model missed a gate (nothing cached)
    """
    options = {k: v for k, v in export_options.items() if v is not None}
    if isinstance(options.get("layers"), str):
        options["layers"] = [options["layers"]]
    if "weights" in options and os.path.isfile(str(options["weights"])):
        options["weights"] = os.path.abspath(str(options["weights"]))
        options["_weights_mtime"] = os.stat(options["weights"]).st_mtime_ns
    if options.get("precision") == "int8" or "calibrate" in options:
        return _cached_int8(backbone, options)
    path = _cache_path(backbone, options)
    options.pop("_weights_mtime", None)
    if _is_cached(path):
        return path
    from featurebank.export.onnx_export import export_backbone  # torch: only on a miss

    export_backbone(backbone, path, **options)
    return path


#: bumped when featurebank exports a different graph for the same recipe (2: the uint8 input
#: prefix transposes to NCHW first, 17x cheaper), so cached models are exported again
GRAPH_VERSION = 2


def _cache_path(backbone: str, key_payload: dict[str, Any]) -> Path:
    key = fingerprint_of({"backbone": backbone, "graph_version": GRAPH_VERSION, **key_payload})[:16]
    folder = cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{backbone.replace('/', '_')}-{key}.onnx"


def _is_cached(path: Path) -> bool:
    if path.is_file():
        try:
            read_model_card(path)
            return True
        except (ModelCardError, NotOnnxModelError):
            path.unlink()  # a broken cache entry is rebuilt, not trusted
    return False


def _cached_int8(backbone: str, options: dict[str, Any]) -> Path:
    """The INT8 branch of :func:`cached_export` (``options``: the given ones, None dropped)."""
    import inspect

    from featurebank._cpu import cpu_kernel_class
    from featurebank.export.quantize import SEARCH_VERSION, calibration_keys, quantize_model, split_images  # no torch

    calibrate = options.pop("calibrate", None)
    precision = options.pop("precision", "fp32")
    fp32_names = {"layers", "pool", "normalize", "input_format", "weights", "_weights_mtime"}
    quantize = {k: v for k, v in options.items() if k not in fp32_names}
    fp32_options = {k: v for k, v in options.items() if k in fp32_names}
    if precision != "int8":
        given = ", ".join(["calibrate"] + sorted(quantize))
        raise ValueError(f"{given} only apply to precision='int8'; got precision={precision!r}")
    if not calibrate:
        raise ValueError("precision='int8' needs calibration images of your data: pass calibrate=[image paths] "
                         "(--calibrate SOURCE)")
    if isinstance(calibrate, (str, os.PathLike)):
        calibrate = [calibrate]
    signature = inspect.signature(quantize_model).parameters
    unknown = sorted(set(quantize) - set(signature))
    if unknown:
        raise TypeError(f"cached_export got unexpected keyword argument(s) {', '.join(unknown)}")
    recipe = {name: p.default for name, p in signature.items()
              if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and name not in ("threads", "kernel_class")}
    recipe.update(quantize)
    if isinstance(recipe.get("nodes_to_exclude"), str):
        recipe["nodes_to_exclude"] = [recipe["nodes_to_exclude"]]
    recipe["nodes_to_exclude"] = sorted(recipe["nodes_to_exclude"])
    keys = calibration_keys(calibrate)
    # refuse a too-small set now, with the count needed, not after a minute of export
    split_images(keys, recipe["calibration_size"], min_holdout=recipe["min_holdout"], seed=recipe["seed"])
    if recipe.get("search_budget_s"):
        recipe["search_version"] = SEARCH_VERSION  # a better search re-exports, not a stale choice
    path = _cache_path(backbone, {**fp32_options, "precision": "int8", "quantize": recipe,
                                  "calibration_keys": keys, "kernel_class": cpu_kernel_class()})
    if _is_cached(path):
        return path
    fp32_options.pop("_weights_mtime", None)
    fp32 = cached_export(backbone, **fp32_options)
    quantize_model(fp32, path, calibrate, **quantize)
    return path
