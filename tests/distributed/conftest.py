"""Fixtures of the distributed room: a tiny real ONNX model and one local Ray cluster.

The cluster is started once per session with 2 CPUs (the machine is shared) and shut down
at the end; tests that use it are marked slow.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight test_efficientnet with two outputs (blocks.2 and features), uint8 input."""
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_backbone("test_efficientnet", path, layers=["blocks.2", "features"], weights="random", input_format="uint8")
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """This process connected to a fresh local Ray instance; yields its GCS address."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_features_model(tmp_path_factory) -> str:
    """The same network cut at ``features`` only: its one output shares a store space with
    ``tiny_model``'s ``features`` output."""
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("model") / "tiny_features.onnx"
    export_backbone("test_efficientnet", path, layers=["features"], weights="random", input_format="uint8")
    return str(path)
