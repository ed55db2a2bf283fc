"""Every route of the service against a real uvicorn server, with real photos and a real model."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from live_server import metric_value
from PIL import Image

from featurebank.decoding import decode_image, to_model_input
from featurebank.embedder.session import open_model


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _offline(model, data: bytes) -> np.ndarray:
    runner = open_model(model, threads=1)
    pixels = decode_image(data, runner.card.preprocessing, mode="fast")[None]
    return runner.run(to_model_input(pixels, runner.card))[runner.card.output().name][0]


def test_health_and_readiness(live):
    with live.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}


def test_embed_raw_body_matches_offline_model(live, assets, photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    with live.client() as c:
        r = c.post("/v1/embed", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == live.engine.output.dim and body["decode_mode"] == "fast"
    (emb,) = body["embeddings"]
    assert emb["key"] == hashlib.sha256(data).hexdigest()
    np.testing.assert_allclose(np.array(emb["vector"], np.float32), _offline(assets.model, data), rtol=1e-4, atol=1e-5)


def test_embed_multipart_many_images_in_order_and_binary(live, photo_dir):
    names = ["chelsea.jpg", "rocket.jpg", "astronaut.jpg"]
    files = [("image", (n, (photo_dir / n).read_bytes(), "image/jpeg")) for n in names]
    with live.client() as c:
        js = c.post("/v1/embed", files=files)
        raw = c.post("/v1/embed", files=files, headers={"Accept": "application/octet-stream"})
    assert js.status_code == 200 and raw.status_code == 200, (js.text, raw.text)
    keys = [hashlib.sha256((photo_dir / n).read_bytes()).hexdigest() for n in names]
    assert [e["key"] for e in js.json()["embeddings"]] == keys
    assert raw.headers["content-type"] == "application/octet-stream"
    n, dim = map(int, raw.headers["x-shape"].split(","))
    assert (n, dim) == (3, live.engine.output.dim) and raw.headers["x-dtype"] == "float32"
    assert raw.headers["x-keys"].split(",") == keys
    X = np.frombuffer(raw.content, "<f4").reshape(n, dim)
    np.testing.assert_array_equal(X, np.array([e["vector"] for e in js.json()["embeddings"]], np.float32))
    assert np.linalg.norm(X[0] - X[1]) > 1e-3  # different photos, different vectors


def test_repeated_image_is_answered_from_the_cache(live, photos):
    data = _jpeg(photos["motorcycle_left"], quality=77)  # bytes no other test sends
    with live.client() as c:
        before = metric_value(c.get("/metrics").text, "featurebank_cache_hits_total")
        images_before = metric_value(c.get("/metrics").text, "featurebank_images_total")
        first = c.post("/v1/embed", content=data, headers={"Content-Type": "image/jpeg"}).json()["embeddings"][0]
        second = c.post("/v1/embed", content=data, headers={"Content-Type": "image/jpeg"}).json()["embeddings"][0]
        text = c.get("/metrics").text
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["vector"] == second["vector"]
    assert metric_value(text, "featurebank_cache_hits_total") == before + 1
    assert metric_value(text, "featurebank_images_total") == images_before + 1  # the model ran once


def test_classify_training_photo_gets_its_class(live, assets):
    path = next(p for p, label in assets.labels.items() if label == "brick")
    with open(path, "rb") as fh:
        data = fh.read()
    with live.client() as c:
        r = c.post("/v1/classify", files={"image": ("b.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    probs = pred["probabilities"]
    assert sorted(p["label"] for p in probs) == ["brick", "grass", "gravel"]
    assert pred["label"] == probs[0]["label"] == "brick"
    values = [p["probability"] for p in probs]
    assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(1.0, abs=1e-6)


def test_classify_by_id_gives_each_indexed_photo_its_class(live, assets):
    # every indexed image is a crop of one of the three texture photos, so its class is the
    # folder it came from; the probe was trained on these 30 crops and separates them
    with live.client() as c:
        answers = {path: c.get("/v1/classify", params={"id": key}) for path, key in assets.keys.items()}
    assert {a.status_code for a in answers.values()} == {200}
    got = {path: a.json()["predictions"][0]["label"] for path, a in answers.items()}
    assert got == assets.labels
    # an indexed image is classified from its stored vector: the same answer as posting the file
    path = next(p for p, label in assets.labels.items() if label == "gravel")
    (by_id,) = answers[path].json()["predictions"]
    with open(path, "rb") as fh, live.client() as c:
        (posted,) = c.post("/v1/classify", content=fh.read(), headers={"Content-Type": "image/jpeg"}).json()["predictions"]
    assert by_id["key"] == posted["key"] == assets.keys[path]
    assert [p["label"] for p in by_id["probabilities"]] == [p["label"] for p in posted["probabilities"]]
    np.testing.assert_allclose([p["probability"] for p in by_id["probabilities"]],
                               [p["probability"] for p in posted["probabilities"]], atol=1e-6)


def test_classify_by_id_refusals(live, assets):
    key = next(iter(assets.keys.values()))
    with live.client() as c:
        unknown = c.get("/v1/classify", params={"id": "nope"})
        empty = c.get("/v1/classify", params={"id": ""})
        missing = c.get("/v1/classify")
    assert unknown.status_code == 404 and unknown.json()["detail"] == "id 'nope' is not in the index"
    assert empty.status_code == 422 and empty.json()["detail"] == "id: String should have at least 1 character"
    assert missing.status_code == 422 and missing.json()["detail"] == "id: Field required"

    from live_server import run_server

    from featurebank.service import ServiceConfig, create_app

    app = create_app(assets.model, index=assets.index, config=ServiceConfig(threads=1, decode_workers=1))
    with run_server(app) as bare, bare.client() as c:
        r = c.get("/v1/classify", params={"id": key})
    assert r.status_code == 404
    assert r.json()["detail"] == "no classifier is loaded: start the service with --classifier FILE"


def test_search_by_image_and_by_id_find_the_image_itself(live, assets):
    path, key = next(iter(assets.keys.items()))
    with open(path, "rb") as fh:
        data = fh.read()
    with live.client() as c:
        by_image = c.post("/v1/search", params={"k": 5}, content=data, headers={"Content-Type": "image/jpeg"})
        by_id = c.get("/v1/search", params={"id": key, "k": 5})
    assert by_image.status_code == 200 and by_id.status_code == 200, (by_image.text, by_id.text)
    hits = by_image.json()["results"][0]["neighbours"]
    # the client sees the file's name under the folder holding every indexed file, never
    # where it lies on the server
    assert len(hits) == 5 and hits[0]["id"] == key and hits[0]["path"] is None
    assert hits[0]["name"] == "/".join(Path(path).parts[-2:])  # e.g. brick/00.jpg
    by_id_hits = by_id.json()["results"][0]["neighbours"]
    assert all(not h["name"].startswith("/") and h["path"] is None for h in hits + by_id_hits)
    assert str(Path(path).parent.parent) not in by_image.text + by_id.text
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["thumbnail_url"] == f"/v1/images/{key}/thumbnail"
    assert [h["id"] for h in by_id.json()["results"][0]["neighbours"]][0] == key


def test_search_shows_server_paths_only_when_the_operator_opts_in(assets):
    from live_server import run_server

    from featurebank.service import ServiceConfig, create_app

    path, key = next(iter(assets.keys.items()))
    app = create_app(assets.model, index=assets.index, config=ServiceConfig(threads=1, decode_workers=1, expose_paths=True))
    with run_server(app) as live, live.client() as c:
        hits = c.get("/v1/search", params={"id": key, "k": 3}).json()["results"][0]["neighbours"]
    assert hits[0]["path"] == path and hits[0]["name"] == "/".join(Path(path).parts[-2:])
    assert all(h["path"].startswith(str(Path(path).parent.parent) + "/") for h in hits)


def test_thumbnails_only_by_indexed_id(live, assets):
    key = next(iter(assets.keys.values()))
    with live.client() as c:
        r = c.get(f"/v1/images/{key}/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and max(img.size) <= 256
        assert c.get(f"/v1/images/{'0' * 64}/thumbnail").status_code == 404
        # a path where an id belongs is just an unknown id: nothing is opened
        path = str(next(iter(assets.keys)))
        for bad in ("%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd", path.replace("/", "%2F")):
            assert c.get(f"/v1/images/{bad}/thumbnail").status_code == 404
        for bad in ("passwd", "...x", path.rsplit("/", 1)[-1]):
            r = c.get(f"/v1/images/{bad}/thumbnail")
            assert r.status_code == 404 and r.json()["detail"] == f"id {bad!r} is not in the index"


def test_info_describes_what_is_served(live, assets):
    with live.client() as c:
        info = c.get("/v1/info").json()
    assert info["space"] == assets.space
    assert info["classifier"]["classes"] == ["brick", "grass", "gravel"]
    assert info["index"]["count"] == 30 and info["index"]["with_files"] == 30
    assert info["auth"] is False


def test_metrics_count_exactly_what_was_served(assets, photo_dir):
    import prometheus_client
    from live_server import run_server

    from featurebank.service import ServiceConfig, create_app

    hubble, coffee = ((photo_dir / f"{n}.jpg").read_bytes() for n in ("hubble_deep_field", "coffee"))
    jpeg = {"Content-Type": "image/jpeg"}
    app = create_app(assets.model, classifier=assets.classifier, index=assets.index,
                     config=ServiceConfig(threads=1, decode_workers=1, max_batch=8))
    with run_server(app) as live, live.client() as c:
        assert [c.post("/v1/embed", content=hubble, headers=jpeg).status_code,  # model
                c.post("/v1/embed", content=hubble, headers=jpeg).status_code,  # cache
                c.post("/v1/embed", files=[("image", ("c.jpg", coffee, "image/jpeg")),  # model
                                           ("image", ("h.jpg", hubble, "image/jpeg"))]).status_code,  # cache
                c.post("/v1/embed", content=b"not an image", headers=jpeg).status_code,
                c.post("/v1/classify", content=b"x", headers={"Content-Type": "text/plain"}).status_code,
                c.get("/v1/nowhere").status_code] == [200, 200, 200, 422, 415, 404]
        first, second = c.get("/metrics"), c.get("/metrics")
        openmetrics = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert first.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = first.text
    assert "# TYPE featurebank_queue_depth gauge" in text and "# TYPE featurebank_requests_total counter" in text
    exact = {
        ("featurebank_requests_total", (("route", "/v1/embed"), ("status", "200"))): 3,
        ("featurebank_requests_total", (("route", "/v1/embed"), ("status", "422"))): 1,
        ("featurebank_requests_total", (("route", "/v1/classify"), ("status", "415"))): 1,
        ("featurebank_requests_total", (("route", "unmatched"), ("status", "404"))): 1,
        ("featurebank_requests_total", (("route", "/metrics"), ("status", "200"))): 0,  # counted once answered
        ("featurebank_request_duration_seconds_count", (("route", "/v1/embed"),)): 4,
        ("featurebank_images_total", ()): 2,
        ("featurebank_cache_hits_total", ()): 2,
        ("featurebank_cache_misses_total", ()): 2,
        ("featurebank_cache_entries", ()): 2,
        ("featurebank_batch_size_count", ()): 2,
        ("featurebank_batch_size_sum", ()): 2,
        ("featurebank_batch_size_bucket", (("le", "1"),)): 2,
        ("featurebank_batch_size_bucket", (("le", "+Inf"),)): 2,
        ("featurebank_stage_duration_seconds_count", (("stage", "decode"),)): 2,  # the broken body is not decoded
        ("featurebank_stage_duration_seconds_count", (("stage", "queue"),)): 2,
        ("featurebank_stage_duration_seconds_count", (("stage", "infer"),)): 2,  # warm-up runs are not counted
        ("featurebank_queue_depth", ()): 0,
        ("featurebank_rejected_total", ()): 0,
        ("featurebank_requests_in_flight", ()): 1,  # the scrape itself
    }
    assert {k: metric_value(text, k[0], **dict(k[1])) for k in exact} == exact
    assert metric_value(second.text, "featurebank_requests_total", route="/metrics", status="200") == 1
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert openmetrics.text.endswith("# EOF\n") and "featurebank_images_total 2.0" in openmetrics.text
    # each app keeps its metrics in a registry of its own, not in the process-wide one
    assert prometheus_client.REGISTRY.get_sample_value("featurebank_images_total") is None


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "body is empty"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type 'text/plain'"),
        ({"content": b"hello"}, 415, "no Content-Type"),
        ({"content": b"definitely not an image", "headers": {"Content-Type": "image/jpeg"}}, 422,
         "body: not an image"),
        ({"data": {"image": "/etc/passwd"}, "files": {"x": ("a.txt", b"", "text/plain")}}, 422, "form field 'image' is not a file"),
        ({"data": {"path": "/etc/passwd"}}, 415, "Content-Type 'application/x-www-form-urlencoded'"),
    ],
)
def test_bad_requests_get_clear_errors(live, kwargs, status, message):
    with live.client() as c:
        r = c.post("/v1/embed", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_refusals_never_echo_the_bytes_of_the_image(live):
    passwd = b"root:x:0:0:root:/root:/bin/bash\n"
    with live.client() as c:
        raw = c.post("/v1/embed", content=passwd, headers={"Content-Type": "image/jpeg"})
        form = c.post("/v1/embed", files=[("image", ("a.jpg", passwd, "image/jpeg"))])
    assert raw.status_code == 422 and raw.json()["detail"].startswith("body: not an image")
    assert form.status_code == 422 and form.json()["detail"].startswith("image 0 ('a.jpg'): not an image")
    assert "root" not in raw.text + form.text


def test_truncated_jpeg_is_422_naming_the_file(live, photo_dir):
    data = (photo_dir / "chelsea.jpg").read_bytes()
    files = [("image", ("ok.jpg", data, "image/jpeg")), ("image", ("cut.jpg", data[: len(data) // 3], "image/jpeg"))]
    with live.client() as c:
        r = c.post("/v1/embed", files=files)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("image 1 ('cut.jpg'): truncated or corrupt image data")


@pytest.mark.parametrize(("params", "message"), [({"k": 0}, "k: Input should be greater than or equal to 1"),
                                                  ({"k": 101}, "k: Input should be less than or equal to 100"),
                                                  ({"k": "many"}, "k: Input should be a valid integer, unable to parse string as an integer")])
def test_bad_k_is_422(live, photo_dir, params, message):
    with live.client() as c:
        r = c.post("/v1/search", params=params, content=(photo_dir / "coffee.jpg").read_bytes(),
                   headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422 and r.json()["detail"] == message


def test_search_unknown_id_is_404(live):
    with live.client() as c:
        r = c.get("/v1/search", params={"id": "nope"})
    assert r.status_code == 404 and r.json()["detail"] == "id 'nope' is not in the index"


def test_accept_without_json_or_binary_is_406(live, photo_dir):
    with live.client() as c:
        r = c.post("/v1/embed", content=(photo_dir / "coffee.jpg").read_bytes(),
                   headers={"Content-Type": "image/jpeg", "Accept": "text/html"})
    assert r.status_code == 406 and "allows neither application/json nor application/octet-stream" in r.json()["detail"]


def test_page_and_static_files_are_served(live):
    with live.client() as c:
        page = c.get("/")
        js = c.get("/static/app.js")
    assert page.status_code == 200 and "<title>featurebank</title>" in page.text
    assert js.status_code == 200 and "/v1/classify" in js.text
