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
    "ImageDecodeError", "ImageTooLargeError", "ImageSourceError", "StoreError", "ProviderError", "ClassifierFileError", "IndexFileError",
    "UnknownIdError", "ClusterError",
    # artifact
    "ModelCard", "read_model_card",
    # export
    "get_backbone", "list_backbones", "list_layers", "export_backbone", "cached_export", "cut_onnx", "list_onnx_tensors",
    # embedding, into a store or in a scikit-learn pipeline
    "embed_images", "load_embeddings", "ImageEmbedder",
    # store
    "open_store",
    # classifiers
    "LinearProbe", "KNNClassifier", "PrototypeClassifier", "make_classifier", "save_classifier", "load_classifier",
    "evaluate_classifier", "fuse_classifier",
    # search
    "build_index", "open_index", "index_store", "query_index", "find_duplicates",
    # workflows and studies
    "train_classifier", "evaluate_on_images", "predict_images", "search_images", "sweep_layers", "fewshot_study",
    # service, cluster
    "create_app", "serve", "embed_images_ray",
}


def test_all_is_pinned():
    assert set(featurebank.__all__) == PUBLIC


def test_every_public_name_resolves():
    for name in featurebank.__all__:
        if name in ("create_app", "serve", "embed_images_ray"):
            continue  # optional extras; covered by their own tests
        assert getattr(featurebank, name) is not None, name


def test_import_is_light_and_errors_subclass_builtins():
    code = "import sys, featurebank; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    assert issubclass(featurebank.UnknownBackboneError, KeyError)
    assert issubclass(featurebank.ExportParityError, ValueError)
    assert str(featurebank.UnknownLayerError("no such layer")) == "no such layer"  # no KeyError quotes


def test_names_left_to_their_rooms_say_where_they_are():
    import importlib

    import pytest

    for name, module in featurebank._IN_ROOMS.items():
        assert name not in featurebank.__all__
        if module not in ("featurebank.service",):  # optional extra
            assert getattr(importlib.import_module(module), name) is not None, (name, module)
    with pytest.raises(AttributeError, match=r"^module 'featurebank' has no attribute 'decode_image'; import it from "
                       r"featurebank\.decoding$"):
        featurebank.decode_image  # noqa: B018
    with pytest.raises(AttributeError, match=r"^module 'featurebank' has no attribute 'nothing_like_this'$"):
        featurebank.nothing_like_this  # noqa: B018
