"""A model that classifies by itself (``featurebank fuse`` output), served with no classifier
file: /v1/classify answers from the model's own probabilities, as the two-step path does."""

from __future__ import annotations

import numpy as np
import pytest
from live_server import run_server


@pytest.fixture(scope="module")
def fused_live(assets, tmp_path_factory):
    from featurebank.classifiers import fuse_classifier, load_classifier
    from featurebank.service import ServiceConfig, create_app

    fused = fuse_classifier(assets.model, load_classifier(assets.classifier).estimator,
                            tmp_path_factory.mktemp("fused") / "fused.onnx")
    app = create_app(fused, index=assets.index, config=ServiceConfig(threads=1, decode_workers=1))
    with run_server(app) as server:
        yield server


def test_fused_model_alone_classifies_as_the_two_step_service(live, fused_live, assets):
    paths = sorted(assets.labels)
    with live.client() as two, fused_live.client() as one:
        for path in paths:
            with open(path, "rb") as fh:
                data = fh.read()
            a = two.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
            b = one.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
            assert a.status_code == b.status_code == 200, b.text
            (pa,), (pb,) = a.json()["predictions"], b.json()["predictions"]
            assert pb["label"] == pa["label"] == assets.labels[path]
            assert [p["label"] for p in pb["probabilities"]] == [p["label"] for p in pa["probabilities"]]
            np.testing.assert_allclose([p["probability"] for p in pb["probabilities"]],
                                       [p["probability"] for p in pa["probabilities"]], atol=1e-4)
        # by id: the stored vector through the model's own head
        key = assets.keys[paths[0]]
        (by_id,) = one.get("/v1/classify", params={"id": key}).json()["predictions"]
        assert by_id["label"] == assets.labels[paths[0]]
        info = one.get("/v1/info").json()
    assert info["classifier"] == {"classes": ["brick", "grass", "gravel"],
                                  "estimator": "the model's own probabilities output"}
    assert info["space"] == assets.space


def test_model_that_only_embeds_still_has_no_classify_route(assets, photo_dir):
    from featurebank.service import ServiceConfig, create_app

    app = create_app(assets.model, config=ServiceConfig(threads=1, decode_workers=1))
    with run_server(app) as bare, bare.client() as c, open(next(photo_dir.iterdir()), "rb") as fh:
        r = c.post("/v1/classify", content=fh.read(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 404
    assert r.json()["detail"] == "no classifier is loaded: start the service with --classifier FILE"
