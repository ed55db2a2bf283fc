"""The web page in a real browser (Playwright driving Debian's chromium) against a real server.

Skipped cleanly where chromium or playwright is missing. The README screenshot comes from
``test_readme_screenshot`` (real efficientnet_lite0 weights), run on demand::

    FEATUREBANK_SCREENSHOT=docs/service-page.png pytest tests/service/test_page.py -k readme
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("FEATUREBANK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
                                reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 860):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def _drive(page, url: str, photo: Path, n_results: int) -> str:
    """Load the page, upload ``photo``, wait for label and grid, click the second result;
    returns the id clicked."""
    page.goto(url)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('index:')")
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('label').textContent.length > 0")
    page.wait_for_function(f"document.querySelectorAll('#results .result').length === {n_results}")
    # every thumbnail arrived and decoded
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    return page.locator("#results .result").nth(1).get_attribute("data-id")


def test_page_upload_classify_search_and_click(live, assets, tmp_path):
    brick = next(p for p, label in assets.labels.items() if label == "brick")
    with browser_page() as (page, errors):
        second = _drive(page, live.url, Path(brick), n_results=12)
        assert page.text_content("#label") == "brick"
        assert page.locator("#key-box").is_hidden()  # no key asked for where none is needed
        probs = page.locator("#probabilities li")
        assert probs.count() == 3
        first = page.locator("#results .result").first
        assert first.get_attribute("data-id") == assets.keys[brick]  # the photo finds itself
        assert first.locator(".score").text_content().startswith("1.000")
        page.screenshot(path=str(tmp_path / "upload.png"))

        # click a neighbour of another class than the upload, so that the label must change:
        # each indexed image is a crop of one texture photo, and its folder is its class
        class_of = {key: assets.labels[path] for path, key in assets.keys.items()}
        shown = [r.get_attribute("data-id") for r in page.locator("#results .result").all()]
        assert shown[1] == second
        n, clicked = next((n, key) for n, key in enumerate(shown) if class_of[key] != "brick")
        page.locator("#results .result").nth(n).click()
        page.wait_for_function(f"document.querySelector('#results .result').dataset.id === '{clicked}'")
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        assert page.text_content("#status").startswith(f"indexed image {clicked[:12]}")
        assert page.text_content("#label") == class_of[clicked]
        page.screenshot(path=str(tmp_path / "clicked.png"), full_page=True)
        assert not errors, errors
    for name in ("upload.png", "clicked.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_asks_for_the_api_key(assets, photo_dir):
    from live_server import run_server

    from featurebank.service import ServiceConfig, create_app

    app = create_app(assets.model, classifier=assets.classifier, index=assets.index,
                     config=ServiceConfig(threads=1, decode_workers=1, api_key="page-key"))
    with run_server(app) as live, browser_page() as (page, errors):
        page.goto(live.url)
        page.wait_for_selector("#key-box", state="visible")
        assert "needs an API key" in page.text_content("#model-info")
        page.fill("#api-key", "page-key")
        page.click("#key-save")
        page.wait_for_function("document.getElementById('model-info').textContent.includes('index: 30 images')")
        page.set_input_files("#file", str(photo_dir / "coffee.jpg"))
        page.wait_for_function("document.querySelectorAll('#results .result').length === 12")
        assert not errors, errors


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEATUREBANK_SCREENSHOT"), reason="set FEATUREBANK_SCREENSHOT=PATH to write it")
def test_readme_screenshot(texture_dir, photo_dir, tmp_path):
    """The README's screenshot: real efficientnet_lite0, textures + photos indexed, a real photo."""
    from live_server import run_server

    from featurebank.classifiers import LinearProbe, save_classifier
    from featurebank.embed_into_store import embed_images, space_of
    from featurebank.embedder.session import open_model
    from featurebank.export.onnx_export import export_backbone
    from featurebank.search import index_store
    from featurebank.service import ServiceConfig, create_app

    model = tmp_path / "lite0.onnx"
    export_backbone("efficientnet_lite0", model, input_format="uint8")
    runner = open_model(model)
    emb = embed_images(texture_dir, runner, store=tmp_path / "store", decode_mode="fast", progress=False)
    space = space_of(runner, runner.card.output().name, "fast")
    clf = save_classifier(LinearProbe(cv=3).fit(emb.X, emb.labels), tmp_path / "textures.fbclf", fingerprint=space)
    embed_images(photo_dir, runner, store=tmp_path / "store", decode_mode="fast", progress=False)
    index_store(tmp_path / "store", space, tmp_path / "index")
    # a crop the index has not seen, of a real brick photo
    query = tmp_path / "query.jpg"
    from PIL import Image
    import skimage.data

    Image.fromarray(skimage.data.brick()[200:480, 100:380]).convert("RGB").save(query, quality=92)
    app = create_app(runner, classifier=clf, index=tmp_path / "index", config=ServiceConfig())
    with run_server(app) as live, browser_page(1280, 760) as (page, errors):
        _drive(page, live.url, query, n_results=12)
        out = Path(os.environ["FEATUREBANK_SCREENSHOT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(tmp_path / "page.png"))
        shutil.copyfile(tmp_path / "page.png", out)
        assert not errors, errors
