"""featurebank: transfer learning by feature extraction.

Export a pretrained backbone cut at an intermediate layer to one self-describing ONNX file,
embed folders of images into a content-addressed on-disk cache with onnxruntime, then train
light scikit-learn / FAISS models and search by similarity on the cached vectors.

Names are imported lazily (PEP 562): ``import featurebank`` is cheap and never imports torch;
only the export functions need it.

>>> import featurebank as fb
>>> fb.get_backbone("efficientnet_lite0").input_size
(3, 224, 224)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# What a user calls, name -> module that defines it (sorted by room, upstream first). Everything
# else (result types, decoding, sessions, the doctor ...) is imported from its room.
_EXPORTS: dict[str, str] = {
    # errors
    **{
        name: "featurebank.errors"
        for name in (
            "FeaturebankError",
            "UnknownBackboneError",
            "UnknownLayerError",
            "UnknownTensorError",
            "WeightsMismatchError",
            "WeightsNotFoundError",
            "ExportParityError",
            "NotOnnxModelError",
            "ModelCardError",
            "FingerprintMismatchError",
            "ImageDecodeError",
            "ImageTooLargeError",
            "ImageSourceError",
            "StoreError",
            "ProviderError",
            "ClassifierFileError",
            "IndexFileError",
            "UnknownIdError",
            "ClusterError",
        )
    },
    # artifact
    "ModelCard": "featurebank.artifact",
    "read_model_card": "featurebank.artifact",
    # export (needs torch)
    "get_backbone": "featurebank.export.registry",
    "list_backbones": "featurebank.export.registry",
    "list_layers": "featurebank.export.layers",
    "export_backbone": "featurebank.export.onnx_export",
    "cached_export": "featurebank.export.cache",
    "cut_onnx": "featurebank.export.onnx_cut",
    "list_onnx_tensors": "featurebank.export.onnx_cut",
    # classifiers
    **{
        name: "featurebank.classifiers"
        for name in (
            "LinearProbe",
            "KNNClassifier",
            "PrototypeClassifier",
            "make_classifier",
            "save_classifier",
            "load_classifier",
            "evaluate_classifier",
            "fuse_classifier",
        )
    },
    # embedding into a store, and the sklearn transformer (which can read and fill one)
    "embed_images": "featurebank.embed_into_store",
    "load_embeddings": "featurebank.embed_into_store",
    "ImageEmbedder": "featurebank.image_embedder",
    # workflows joining embedder, store, classifiers and search
    "train_classifier": "featurebank.workflow",
    "evaluate_on_images": "featurebank.workflow",
    "predict_images": "featurebank.workflow",
    "search_images": "featurebank.workflow",
    # studies: which layer, how many labels
    "sweep_layers": "featurebank.studies",
    "fewshot_study": "featurebank.studies",
    # store
    "open_store": "featurebank.store",
    # search
    "build_index": "featurebank.search",
    "open_index": "featurebank.search",
    "index_store": "featurebank.search",
    "query_index": "featurebank.search",
    "find_duplicates": "featurebank.search",
    # service (needs the `service` extra: fastapi, uvicorn, python-multipart)
    "create_app": "featurebank.service",
    "serve": "featurebank.service",
    # distributed (needs the `ray` extra)
    "embed_images_ray": "featurebank.distributed",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

# Names the top level no longer offers (issue 12): an AttributeError says which room has them.
_IN_ROOMS: dict[str, str] = {
    "OutputSpec": "featurebank.artifact",
    "Preprocessing": "featurebank.artifact",
    "BackboneSpec": "featurebank.export.registry",
    "decode_image": "featurebank.decoding",
    "to_model_input": "featurebank.decoding",
    "list_images": "featurebank.embedder.sources",
    "ImageList": "featurebank.embedder.sources",
    "open_model": "featurebank.embedder.session",
    "ModelRunner": "featurebank.embedder.session",
    "run_doctor": "featurebank.embedder.doctor",
    "Embeddings": "featurebank.embed_into_store",
    "EmbeddingStore": "featurebank.store",
    "SavedClassifier": "featurebank.classifiers",
    "SimilarityIndex": "featurebank.search",
    "write_duplicates": "featurebank.search",
    "SweepResult": "featurebank.studies",
    "FewshotResult": "featurebank.studies",
    "ServiceConfig": "featurebank.service",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        where = f"; import it from {_IN_ROOMS[name]}" if name in _IN_ROOMS else ""
        raise AttributeError(f"module 'featurebank' has no attribute {name!r}{where}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
