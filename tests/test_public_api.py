"""The public names of `featurebank` are pinned (httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import subprocess
import sys

import featurebank

PUBLIC = {
    "__version__",
    # errors
    "FeaturebankError", "UnknownBackboneError", "UnknownLayerError", "UnknownTensorError", "WeightsMismatchError",
    "WeightsNotFoundError", "ExportParityError", "NotOnnxModelError", "ModelCardError", "FingerprintMismatchError",
    "ImageDecodeError", "ImageSourceError", "StoreError", "ProviderError", "ClassifierFileError", "IndexFileError",
    "UnknownIdError", "ClusterError",
    # artifact
    "ModelCard", "OutputSpec", "Preprocessing", "read_model_card",
    # export
    "BackboneSpec", "get_backbone", "list_backbones", "list_layers", "export_backbone", "cached_export", "cut_onnx",
    "list_onnx_tensors",
    # embedder
    "decode_image", "to_model_input", "list_images", "ImageList", "open_model", "ModelRunner", "embed_images",
    "load_embeddings", "Embeddings", "ImageEmbedder", "run_doctor",
    # store
    "open_store", "EmbeddingStore",
    # classifiers
    "LinearProbe", "KNNClassifier", "PrototypeClassifier", "make_classifier", "save_classifier", "load_classifier",
    "SavedClassifier", "evaluate_classifier", "fuse_classifier",
    # search
    "SimilarityIndex", "build_index", "open_index", "index_store", "query_index", "find_duplicates",
    "write_duplicates",
    # workflows and studies
    "train_classifier", "evaluate_on_images", "predict_images", "search_images", "sweep_layers", "fewshot_study",
    "SweepResult", "FewshotResult",
    # service, cluster
    "ServiceConfig", "create_app", "serve", "embed_images_ray",
}


def test_all_is_pinned():
    assert set(featurebank.__all__) == PUBLIC


def test_every_public_name_resolves():
    for name in featurebank.__all__:
        if name in ("ServiceConfig", "create_app", "serve", "embed_images_ray"):
            continue  # optional extras; covered by their own tests
        assert getattr(featurebank, name) is not None, name


def test_import_is_light_and_errors_subclass_builtins():
    code = "import sys, featurebank; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    assert issubclass(featurebank.UnknownBackboneError, KeyError)
    assert issubclass(featurebank.ExportParityError, ValueError)
    assert str(featurebank.UnknownLayerError("no such layer")) == "no such layer"  # no KeyError quotes
