"""Fixtures of the studies tests: a private model cache, and one sweep / few-shot run on
real images shared by the tests that only read their results."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Exports made by the studies go to a fresh cache, not the user's."""
    old = os.environ.get("FEATUREBANK_CACHE")
    os.environ["FEATUREBANK_CACHE"] = str(tmp_path_factory.mktemp("fb-cache"))
    yield os.environ["FEATUREBANK_CACHE"]
    if old is None:
        os.environ.pop("FEATUREBANK_CACHE", None)
    else:
        os.environ["FEATUREBANK_CACHE"] = old


@pytest.fixture(scope="session")
def studies_store(tmp_path_factory):
    return tmp_path_factory.mktemp("studies-store")


@pytest.fixture(scope="session")
def texture_sweep(texture_dir, studies_store, tmp_path_factory):
    """A sweep of every stage of the tiny random test_efficientnet on the real texture crops."""
    from featurebank.studies import sweep_layers

    out = tmp_path_factory.mktemp("sweep-out")
    return sweep_layers(texture_dir, backbone="test_efficientnet", weights="random", all_stages=True,
                        store=studies_store, folds=3, seed=0, out_dir=out, progress=False), out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """test_efficientnet (random weights) cut at blocks.3, uint8 input: a one-output model."""
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("fewshot-model") / "tiny.onnx"
    export_backbone("test_efficientnet", path, layers=["blocks.3"], weights="random", input_format="uint8")
    return path
