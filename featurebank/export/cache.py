"""The model cache: ``featurebank embed --backbone NAME`` exports on first use, reuses after.

Exported files live in ``$FEATUREBANK_CACHE`` (default ``~/.cache/featurebank``) under
``models/``, named by the backbone and a hash of the export options, so each distinct recipe
is exported once. A cached file is used only if its model card still reads back.

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
    (layers, pool, normalize, precision, input_format, weights).
    """
    options = {k: v for k, v in export_options.items() if v is not None}
    if isinstance(options.get("layers"), str):
        options["layers"] = [options["layers"]]
    if "weights" in options and os.path.isfile(str(options["weights"])):
        options["weights"] = os.path.abspath(str(options["weights"]))
        options["_weights_mtime"] = os.stat(options["weights"]).st_mtime_ns
    key = fingerprint_of({"backbone": backbone, **options})[:16]
    options.pop("_weights_mtime", None)
    folder = cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{backbone.replace('/', '_')}-{key}.onnx"
    if path.is_file():
        try:
            read_model_card(path)
            return path
        except (ModelCardError, NotOnnxModelError):
            path.unlink()  # a broken cache entry is rebuilt, not trusted
    from featurebank.export.onnx_export import export_backbone  # torch: only on a miss

    export_backbone(backbone, path, **options)
    return path
