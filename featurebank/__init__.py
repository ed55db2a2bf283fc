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

# public name -> module that defines it. Keep sorted by room, upstream first.
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
    "OutputSpec": "featurebank.artifact",
    "Preprocessing": "featurebank.artifact",
    "read_model_card": "featurebank.artifact",
    # export (needs torch)
    "BackboneSpec": "featurebank.export.registry",
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
            "SavedClassifier",
            "evaluate_classifier",
            "fuse_classifier",
        )
    },
    # decoding; input listing
    "decode_image": "featurebank.decoding",
    "to_model_input": "featurebank.decoding",
    "list_images": "featurebank.embedder.sources",
    "ImageList": "featurebank.embedder.sources",
    # embedder: sessions
    "open_model": "featurebank.embedder.session",
    "ModelRunner": "featurebank.embedder.session",
    "run_doctor": "featurebank.embedder.doctor",
    # embedding into a store, and the sklearn transformer (which can read and fill one)
    "embed_images": "featurebank.embed_into_store",
    "load_embeddings": "featurebank.embed_into_store",
    "Embeddings": "featurebank.embed_into_store",
    "ImageEmbedder": "featurebank.image_embedder",
    # workflows joining embedder, store, classifiers and search
    "train_classifier": "featurebank.workflow",
    "evaluate_on_images": "featurebank.workflow",
    "predict_images": "featurebank.workflow",
    "search_images": "featurebank.workflow",
    # studies: which layer, how many labels
    "sweep_layers": "featurebank.studies",
    "SweepResult": "featurebank.studies",
    "fewshot_study": "featurebank.studies",
    "FewshotResult": "featurebank.studies",
    # store
    "open_store": "featurebank.store",
    "EmbeddingStore": "featurebank.store",
    # search
    "SimilarityIndex": "featurebank.search",
    "build_index": "featurebank.search",
    "open_index": "featurebank.search",
    "index_store": "featurebank.search",
    "query_index": "featurebank.search",
    "find_duplicates": "featurebank.search",
    "write_duplicates": "featurebank.search",
    # service (needs the `service` extra: fastapi, uvicorn, python-multipart)
    "ServiceConfig": "featurebank.service",
    "create_app": "featurebank.service",
    "serve": "featurebank.service",
    # distributed (needs the `ray` extra)
    "embed_images_ray": "featurebank.distributed",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featurebank' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
