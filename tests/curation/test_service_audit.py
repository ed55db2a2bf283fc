"""`featurebank serve --store DIR`: the web page lists the audit's suspects (Playwright driving
Debian's chromium against a real uvicorn server), the same list `audit` gives, with no server
path unless the operator opts in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from live_server import run_server  # noqa: E402

from featurebank.curation import audit_images  # noqa: E402
from featurebank.errors import FingerprintMismatchError  # noqa: E402


@pytest.fixture(scope="module")
def audited(faulty, tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("served") / "store"
    report = audit_images(faulty.train, tiny_model, store=store, progress=False)
    return store, report


def test_audit_route_is_the_cli_list_without_server_paths(audited, tiny_model, faulty):
    import httpx

    from featurebank.service import ServiceConfig, create_app

    store, report = audited
    app = create_app(tiny_model, config=ServiceConfig(threads=1, decode_workers=1), store=store)
    with run_server(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        doc = c.get("/v1/audit").json()
        assert [(r["issue"], r["key"], r["given"], r["suggested"]) for r in doc["suspects"]] == [
            (r["issue"], r["key"], r["given"], r["suggested"]) for r in report["suspects"]]
        assert len(doc["suspects"]) > 0
        assert [r["name"] for r in doc["suspects"]] == [
            os.path.relpath(r["path"], faulty.train) for r in report["suspects"]]
        assert str(faulty.train) not in c.get("/v1/audit").text  # no server path
        first = doc["suspects"][0]
        thumb = c.get(first["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        assert c.get(f"/v1/audit/{'0' * 64}/thumbnail").status_code == 404
    app = create_app(tiny_model, config=ServiceConfig(threads=1, decode_workers=1, expose_paths=True), store=store)
    with run_server(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        doc = c.get("/v1/audit").json()
        assert [r["path"] for r in doc["suspects"]] == [r["path"] for r in report["suspects"]]
    # without a store there is no audit route
    app = create_app(tiny_model, config=ServiceConfig(threads=1, decode_workers=1))
    with run_server(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.get("/v1/audit").status_code == 404


def test_a_store_of_another_models_space_is_refused(audited, service_model_other, tmp_path):
    from featurebank.service import ServiceConfig, create_app

    store, _ = audited
    with pytest.raises(FingerprintMismatchError, match=r"^the store '.*' holds no vectors of the served model's "
                                                       r"space \(.*embed the labelled images with this model first"):
        create_app(service_model_other, config=ServiceConfig(threads=1), store=store)


@pytest.fixture(scope="module")
def service_model_other(tmp_path_factory) -> Path:
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("other") / "other.onnx"
    export_backbone("test_efficientnet", path, weights="random", input_format="uint8", normalize=True)
    return path


def test_the_page_lists_the_suspects(audited, tiny_model, tmp_path):
    pytest.importorskip("playwright.sync_api")
    from test_page import CHROMIUM, browser_page

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}")
    from featurebank.service import ServiceConfig, create_app

    store, report = audited
    n = min(60, len(report["suspects"]))
    app = create_app(tiny_model, config=ServiceConfig(threads=1, decode_workers=1), store=store)
    with run_server(app) as live, browser_page() as (page, errors):
        page.goto(live.url)
        page.wait_for_selector("#audit", state="visible")
        page.wait_for_function(f"document.querySelectorAll('#audit-list .suspect').length === {n}")
        page.wait_for_function("[...document.querySelectorAll('#audit-list img')].every(i => i.complete && "
                               "i.naturalWidth > 0)")
        keys = [c.get_attribute("data-key") for c in page.locator("#audit-list .suspect").all()]
        assert keys == [r["key"] for r in report["suspects"]][:n]
        first = report["suspects"][0]
        card = page.locator("#audit-list .suspect").first
        assert card.locator(".labels").text_content() == f"{first['given']} → {first['suggested']}"
        assert card.locator(".score").text_content() == f"#1 {first['issue'].replace('_', ' ')}"
        assert page.text_content("#audit-info").startswith("49 labelled images, 3 classes, out-of-fold accuracy ")
        page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)
        assert not errors, errors
    assert (tmp_path / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_store_that_cannot_be_audited_fails_at_start(faulty, tiny_model, tmp_path):
    import shutil

    from featurebank.embed_into_store import embed_images
    from featurebank.errors import ImageSourceError
    from featurebank.service import ServiceConfig, create_app

    shutil.copytree(faulty.train / "grass", tmp_path / "one" / "grass")
    embed_images(tmp_path / "one", tiny_model, store=tmp_path / "store", progress=False)
    with pytest.raises(ImageSourceError, match=r"records fewer than two labelled classes in space .*; embed labelled "
                                               r"folders \(SOURCE/<class>/image.jpg\) into it first"):
        create_app(tiny_model, config=ServiceConfig(threads=1), store=tmp_path / "store")
