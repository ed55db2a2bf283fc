"""Limits, auth, batching and shutdown of the service, each on its own real uvicorn server."""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from live_server import metric_value, run_server
from PIL import Image

from featurebank.errors import FingerprintMismatchError
from featurebank.service import ServiceConfig, create_app

JPEG = {"Content-Type": "image/jpeg"}


def _app(assets, **config):
    config.setdefault("threads", 1)
    config.setdefault("decode_workers", 2)
    return create_app(assets.model, classifier=assets.classifier, index=assets.index, config=ServiceConfig(**config))


def _distinct_jpegs(photos, n: int) -> list[bytes]:
    """n different real-photo JPEGs (different crops), so that none is a cache hit."""
    out = []
    names = sorted(photos)
    for i in range(n):
        img = photos[names[i % len(names)]]
        y = (i // len(names)) * 7
        buf = io.BytesIO()
        Image.fromarray(img[y : y + 200, : 200]).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    assert len(set(out)) == n
    return out


@pytest.fixture(scope="module")
def big_pngs(photos) -> list[bytes]:
    """Two distinct 3072x3072 PNGs of a real photo: each takes ~0.2 s to decode (PNG has no
    reduced-scale decoding), which keeps a request in flight long enough to act on it."""
    out = []
    base = np.asarray(Image.fromarray(photos["astronaut"]).resize((3072, 3072), Image.Resampling.BILINEAR))
    for i in range(2):
        arr = base.copy()
        arr[0, 0] = i
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


PNG = {"Content-Type": "image/png"}


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_body_over_limit_is_413(assets, photo_dir):
    data = (photo_dir / "astronaut.jpg").read_bytes()
    limit_mb = len(data) / 2 / 2**20
    with run_server(_app(assets, max_body_mb=limit_mb)) as live, live.client() as c:
        declared = c.post("/v1/embed", content=data, headers=JPEG)
        # no Content-Length: the limit is enforced while the body streams in
        streamed = c.post("/v1/embed", content=iter([data[:1000], data[1000:]]), headers=JPEG)
        small = c.post("/v1/embed", content=(photo_dir / "coffee.jpg").read_bytes()[:1000], headers=JPEG)
    assert declared.status_code == 413 and "server --max-body-mb" in declared.json()["detail"]
    assert f"request body is {len(data):,} bytes" in declared.json()["detail"]
    assert streamed.status_code == 413 and "request body is more than" in streamed.json()["detail"]
    assert small.status_code == 422  # under the limit: read, and refused only as a truncated JPEG


def test_too_many_pixels_is_413_before_decoding(assets, photos):
    big = Image.fromarray(photos["astronaut"])  # 512 x 512
    buf = io.BytesIO()
    big.save(buf, "PNG")
    with run_server(_app(assets, max_pixels=100_000)) as live, live.client() as c:
        r = c.post("/v1/embed", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        decoded = metric_value(c.get("/metrics").text, "featurebank_stage_duration_seconds_count", stage="decode")
    assert r.status_code == 413
    assert r.json()["detail"] == ("body: image has 262,144 pixels (512x512), over the limit of 100,000 (possible "
                                  "decompression bomb); if you trust the file, pass a larger max_pixels (server: --max-pixels)")
    assert decoded == 0


def test_image_pillow_refuses_to_open_is_413_by_its_error_type(live):
    # a PNG of a few hundred bytes declaring 10^10 pixels: Pillow refuses it while opening, so
    # no header size is known; the decoder's ImageTooLargeError alone makes it a 413
    from corpus import _png_declaring

    with live.client() as c:
        r = c.post("/v1/embed", files=[("image", ("bomb.png", _png_declaring(100_000, 100_000), "image/png"))])
    assert r.status_code == 413
    assert r.json()["detail"] == ("image 0 ('bomb.png'): image has 10,000,000,000 pixels, over the limit of 89,478,485 "
                                  "(possible decompression bomb); if you trust the file, pass a larger max_pixels "
                                  "(server: --max-pixels)")


def test_too_many_images_is_413(assets, photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    with run_server(_app(assets, max_images=2, queue_size=8)) as live, live.client() as c:
        r = c.post("/v1/embed", files=[("image", (f"{i}.jpg", data, "image/jpeg")) for i in range(3)])
        many = c.post("/v1/embed", files=[("image", (f"{i}.jpg", data, "image/jpeg")) for i in range(5)])
    assert r.status_code == 413 and r.json()["detail"] == "3 images in one request; the limit is 2 (split the request)"
    assert many.status_code == 413 and "more than 2 images in one request" in many.json()["detail"]


def test_full_queue_is_503_with_retry_after(assets, photos, big_pngs):
    (small,) = _distinct_jpegs(photos, 1)
    with run_server(_app(assets, queue_size=1, max_images=1)) as live, live.client() as c:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/embed", content=big_pngs[0], headers=PNG)
            _wait_for(lambda: live.engine._admitted == 1)
            refused = c.post("/v1/embed", content=small, headers=JPEG)
            assert first.result().status_code == 200
        text = c.get("/metrics").text
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["detail"] == "the service is busy (1 images queued, limit 1); retry shortly"
    assert metric_value(text, "featurebank_rejected_total") == 1


def test_request_over_timeout_is_504(assets, big_pngs):
    with run_server(_app(assets, timeout_s=0.05)) as live, live.client() as c:
        t = time.perf_counter()
        r = c.post("/v1/embed", content=big_pngs[1], headers=PNG)
        elapsed = time.perf_counter() - t
        assert live.engine._admitted == 0  # the timed-out image left the queue count
    assert r.status_code == 504 and r.json()["detail"].startswith("not answered within 0.05 s (server --timeout-s)")
    assert elapsed < 2.0


def test_lone_request_does_not_wait_for_a_batch(assets, photos):
    (data,) = _distinct_jpegs(photos, 1)
    with run_server(_app(assets, max_wait_ms=5000, max_batch=32)) as live, live.client() as c:
        t = time.perf_counter()
        r = c.post("/v1/embed", content=data, headers=JPEG)
        elapsed = time.perf_counter() - t
    assert r.status_code == 200
    assert elapsed < 2.5, f"a lone image waited {elapsed:.2f} s for company that was not coming"


def test_api_key_on_every_route_but_health_and_page(assets, photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    with run_server(_app(assets, api_key="s3cret")) as live, live.client() as c:
        key = next(iter(assets.keys.values()))
        routes = [("POST", "/v1/embed"), ("POST", "/v1/classify"), ("POST", "/v1/search"), ("GET", f"/v1/search?id={key}"),
                  ("GET", f"/v1/images/{key}/thumbnail"), ("GET", "/v1/info"), ("GET", "/metrics"),
                  ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
        for method, url in routes:
            kw = {"content": data, "headers": JPEG} if method == "POST" else {}
            headers = kw.pop("headers", {})

            def call(**extra):
                return c.request(method, url, **kw, headers={**headers, **extra})

            missing = call()
            assert missing.status_code == 401, url
            assert missing.json()["detail"] == "missing API key: send header X-API-Key: <key> or Authorization: Bearer <key>"
            assert missing.headers["www-authenticate"] == "ApiKey, Bearer"
            for wrong in (call(**{"X-API-Key": "guess"}), call(Authorization="Bearer guess"),
                          call(Authorization="Basic czNjcmV0")):
                assert wrong.status_code == 401, url
            assert wrong.json()["detail"] == "missing API key: send header X-API-Key: <key> or Authorization: Bearer <key>"
            assert call(**{"X-API-Key": "guess"}).json()["detail"] == "wrong API key (header X-API-Key or Authorization: Bearer)"
            for ok in (call(**{"X-API-Key": "s3cret"}), call(Authorization="Bearer s3cret")):
                assert ok.status_code == 200, (url, ok.text)
        spec = c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()
        assert spec["info"]["title"] == "featurebank embedding service" and "/v1/embed" in spec["paths"]
        assert "/openapi.json" not in spec["paths"] and "/docs" not in spec["paths"]
        assert "swagger-ui" in c.get("/docs", headers={"X-API-Key": "s3cret"}).text
        for url in ("/healthz", "/readyz", "/", "/static/app.js"):
            assert c.get(url).status_code == 200


def test_without_api_key_the_spec_and_docs_are_open(assets):
    with run_server(_app(assets)) as live, live.client() as c:
        spec, docs, redoc = c.get("/openapi.json"), c.get("/docs"), c.get("/redoc")
    assert spec.status_code == 200 and "/v1/embed" in spec.json()["paths"]
    assert "security" not in spec.json()["paths"]["/v1/embed"]["post"]
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert redoc.status_code == 200 and "redoc" in redoc.text


def test_concurrent_requests_form_batches(assets, photos):
    images = _distinct_jpegs(photos, 24)
    with run_server(_app(assets, max_batch=8, max_wait_ms=100)) as live, live.client() as c:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda d: c.post("/v1/embed", content=d, headers=JPEG), images))
        text = c.get("/metrics").text
    assert all(a.status_code == 200 for a in answers)
    batches = metric_value(text, "featurebank_batch_size_count")
    assert metric_value(text, "featurebank_batch_size_sum") == 24
    assert batches <= 12, f"24 concurrent images ran in {batches} batches"
    assert metric_value(text, "featurebank_batch_size_bucket", le="1") < batches  # not all alone
    assert metric_value(text, "featurebank_batch_size_bucket", le="4") < metric_value(
        text, "featurebank_batch_size_bucket", le="8")  # some batch held 5..8 images


def test_graceful_shutdown_finishes_in_flight_requests(assets, big_pngs):
    app = _app(assets)
    with run_server(app) as live, live.client() as c:
        with ThreadPoolExecutor(2) as pool:
            inflight = [pool.submit(c.post, "/v1/embed", content=d, headers=PNG) for d in big_pngs]
            _wait_for(lambda: live.engine._admitted == 2)
            live.server.should_exit = True  # what SIGTERM does
            answers = [f.result() for f in inflight]
        live.thread.join(timeout=20)
        assert not live.thread.is_alive()
        host, port = live.url.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=2)
    assert [r.status_code for r in answers] == [200, 200]
    assert all(len(r.json()["embeddings"][0]["vector"]) == live.engine.output.dim for r in answers)
    assert live.engine.stopping


def test_without_classifier_or_index_those_routes_are_404(assets, photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    app = create_app(assets.model, config=ServiceConfig(threads=1, decode_workers=1))
    with run_server(app) as live, live.client() as c:
        clf = c.post("/v1/classify", content=data, headers=JPEG)
        srch = c.post("/v1/search", content=data, headers=JPEG)
        thumb = c.get(f"/v1/images/{'a' * 64}/thumbnail")
        emb = c.post("/v1/embed", content=data, headers=JPEG)
    assert clf.status_code == 404 and "start the service with --classifier FILE" in clf.json()["detail"]
    assert srch.status_code == 404 and "start the service with --index DIR" in srch.json()["detail"]
    assert thumb.status_code == 404
    assert emb.status_code == 200 and emb.json()["decode_mode"] == "fast"


def test_classifier_of_another_vector_space_is_refused_at_start(assets, tmp_path):
    from featurebank.classifiers import load_classifier, save_classifier

    saved = load_classifier(assets.classifier)
    other = save_classifier(saved.estimator, tmp_path / "other.fbclf", fingerprint="f" * 64)
    with pytest.raises(FingerprintMismatchError, match=r"the classifier was built on vectors of space f{64}, which model "
                                                        r"'test_efficientnet' \(output .*\) does not produce"):
        create_app(assets.model, classifier=other)
    with pytest.raises(FingerprintMismatchError, match="decode_mode='exact' was asked for, but the classifier and index "
                                                       "expect vectors decoded with 'fast'"):
        create_app(assets.model, classifier=assets.classifier, index=assets.index,
                   config=ServiceConfig(decode_mode="exact"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch": 0}, "max_batch must be a positive integer; got max_batch=0"),
    ({"queue_size": 4, "max_images": 8}, r"queue_size \(4\) must be at least max_images \(8\)"),
    ({"timeout_s": 0}, "timeout_s must be a positive number; got timeout_s=0"),
    ({"header_timeout_s": -1}, "header_timeout_s must be a positive number; got header_timeout_s=-1"),
    ({"body_timeout_s": 0}, "body_timeout_s must be a positive number; got body_timeout_s=0"),
    ({"max_connections": 0}, "max_connections must be a positive integer; got max_connections=0"),
    ({"expose_paths": "yes"}, "expose_paths must be True or False; got expose_paths='yes'"),
    ({"api_key": " "}, "api_key must be a non-empty string or None"),
    ({"decode_mode": "quick"}, "decode_mode must be one of exact, fast or None; got 'quick'"),
    ({"device": "gpu"}, "device must be one of auto, cpu, cuda; got device='gpu'"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig(**kwargs)


@pytest.fixture(scope="module")
def huge_jpegs(photos) -> list[bytes]:
    """Two distinct 10000x8800 (88 megapixel) JPEGs of a real photo, about 3 MB each: under
    the per-image pixel limit, 350 MB of memory each when decoded at full size."""
    img = Image.fromarray(photos["astronaut"]).resize((10000, 8800), Image.Resampling.BILINEAR)
    out = []
    for i in range(2):
        img.putpixel((0, 0), (i, i, i))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


@pytest.mark.slow
def test_pixel_budget_per_request_is_413_before_decoding_and_bounds_memory(assets, huge_jpegs, tmp_path):
    from live_server import serve_process

    args = ["--model", str(assets.model), "--decode-mode", "exact", "--threads", "1", "--decode-workers", "2",
            "--max-request-pixels", "100000000"]
    with serve_process(args, tmp_path / "serve.log") as served, httpx.Client(base_url=served.url, timeout=60) as c:
        base = served.peak_rss_mb()
        t = time.perf_counter()
        over = c.post("/v1/embed", files=[("image", (f"{i}.jpg", huge_jpegs[0], "image/jpeg")) for i in range(4)])
        over_s = time.perf_counter() - t
        refused_peak = served.peak_rss_mb() - base
        decoded = metric_value(c.get("/metrics").text, "featurebank_stage_duration_seconds_count", stage="decode")
        # two requests of one such image each, at once: under the budget one by one, but the
        # budget also holds for the pixels being decoded across requests, so they take turns
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda d: c.post("/v1/embed", content=d, headers=JPEG), huge_jpegs))
        served_peak = served.peak_rss_mb() - base
    assert over.status_code == 413
    assert over.json()["detail"] == (
        "the 4 images of this request have 352,000,000 pixels in all, over the per-request budget of 100,000,000 "
        "(server --max-request-pixels); split them into requests of at most 100,000,000 pixels each "
        "(at least 4 requests)")
    assert decoded == 0 and over_s < 5.0
    assert refused_peak < 100, f"refusing 4 x 88 MP from their headers raised the peak RSS by {refused_peak:.0f} MiB"
    assert [r.status_code for r in both] == [200, 200]
    # one 88 MP decode takes ~350 MiB; two at once took ~700 MiB before the shared budget
    assert served_peak < 520, f"two 88 MP images in two requests raised the peak RSS by {served_peak:.0f} MiB"


def test_max_request_pixels_must_hold_one_image_of_max_pixels():
    with pytest.raises(ValueError, match=r"max_request_pixels \(1,000,000\) must be at least max_pixels \(89,478,485\)"):
        ServiceConfig(max_request_pixels=1_000_000)
