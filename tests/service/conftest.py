"""Service fixtures: a tiny exported model, a real store, classifier and index built from real
texture photos, and a real uvicorn server on 127.0.0.1 (random free port) in a thread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from live_server import run_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@dataclass
class Assets:
    model: Path
    classifier: Path
    index: Path
    store: Path
    space: str
    labels: dict  # image path -> class name
    keys: dict  # image path -> content key


@pytest.fixture(scope="session")
def service_model(tmp_path_factory) -> Path:
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("service_model") / "tiny.onnx"
    export_backbone("test_efficientnet", path, weights="random", input_format="uint8")
    return path


@pytest.fixture(scope="session")
def assets(service_model, texture_dir, tmp_path_factory) -> Assets:
    """Store of the 30 texture photos, a LinearProbe trained on them (it gives each its class) and a Flat
    cosine index."""
    from featurebank.classifiers import LinearProbe, save_classifier
    from featurebank.embed_into_store import embed_images, space_of
    from featurebank.embedder.session import open_model
    from featurebank.search import index_store

    root = tmp_path_factory.mktemp("service_assets")
    runner = open_model(service_model, threads=1)
    emb = embed_images(texture_dir, runner, store=root / "store", decode_mode="fast", progress=False)
    assert emb.ok.all()
    space = space_of(runner, runner.card.output().name, "fast")
    # C fixed at 1 (not chosen by cross-validation, which picks 1e-3 on these random-weight
    # features and then misreads 5 grass crops): the 30 crops are all the service knows, and
    # the routes' tests expect each of them to get its own class
    probe = LinearProbe(Cs=[1.0], cv=3).fit(emb.X, emb.labels)
    clf = save_classifier(probe, root / "textures.fbclf", fingerprint=space)
    index_store(root / "store", space, root / "index")
    return Assets(service_model, clf, root / "index", root / "store", space,
                  dict(zip(emb.paths, emb.labels)), dict(zip(emb.paths, emb.keys)))


@pytest.fixture(scope="session")
def live(assets):
    """The full service (classifier + index), default limits, no API key."""
    from featurebank.service import ServiceConfig, create_app

    app = create_app(assets.model, classifier=assets.classifier, index=assets.index,
                     config=ServiceConfig(threads=1, decode_workers=2))
    with run_server(app) as server:
        yield server
