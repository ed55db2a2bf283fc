"""featurebank select (never an already-labelled image, never the same image twice) and map."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from featurebank.cli import main
from featurebank.curation import k_center_greedy, map_images, select_images, select_vectors


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def pool(faulty, tmp_path):
    """labelled: 4 crops of each texture; pool: the other crops, plus a renamed copy of a
    labelled image and two copies of one pool image."""
    lab, unl = tmp_path / "labelled", tmp_path / "pool"
    for cls in ("grass", "gravel", "brick"):
        (lab / cls).mkdir(parents=True)
        for i in range(1, 5):
            shutil.copy(faulty.train / cls / f"{cls}{i:02d}.jpg", lab / cls)
        unl.mkdir(exist_ok=True)
        for i in range(5, 12):
            shutil.copy(faulty.train / cls / f"{cls}{i:02d}.jpg", unl / f"{cls}{i:02d}.jpg")
    shutil.copy(lab / "grass/grass01.jpg", unl / "renamed_labelled.jpg")
    shutil.copy(unl / "brick05.jpg", unl / "brick05_again.jpg")
    return lab, unl


def test_k_center_greedy_is_farthest_first():
    X = np.array([[1, 0], [0.99, 0.14], [0, 1], [-1, 0], [0.7, 0.7]], np.float32)
    # cold start: the row nearest the mean first, then the farthest from all picked
    assert k_center_greedy(X, 3).tolist() == [4, 3, 0]  # rows 0 and 2 tie at 0.293: the first wins
    # labelled [1, 0] covers rows 0 and 1 first
    assert k_center_greedy(X, 2, centers=np.array([[1, 0]], np.float32)).tolist() == [3, 2]


def test_select_vectors_bad_input():
    X = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^budget 5 is larger than the pool of 4 unlabelled images; lower --budget "
                                         r"to at most 4$"):
        select_vectors(X, 5, strategy="diversity")
    with pytest.raises(ValueError, match=r"^strategy 'uncertainty' needs labelled images .* for a cold start use "
                                         r"--strategy diversity$"):
        select_vectors(X, 2, strategy="uncertainty")
    with pytest.raises(ValueError, match="strategy must be one of uncertainty, diversity, combined, random"):
        select_vectors(X, 2, strategy="entropy")


@pytest.mark.parametrize("strategy", ["uncertainty", "diversity", "combined", "random"])
def test_select_never_proposes_labelled_or_twice(pool, tiny_model, tmp_path, strategy):
    lab, unl = pool
    # the whole pool: 21 distinct unlabelled images (the renamed copy and the second copy are out)
    r = select_images(unl, tiny_model, store=tmp_path / "store", budget=21, labelled=lab, strategy=strategy,
                      progress=False)
    paths = [row["path"] for row in r["picks"]]
    keys = [row["key"] for row in r["picks"]]
    assert len(paths) == 21 and len(set(keys)) == 21
    assert str(unl / "renamed_labelled.jpg") not in paths
    assert not ({str(unl / "brick05.jpg"), str(unl / "brick05_again.jpg")} <= set(paths))
    assert r["summary"]["pool"] == 21 and r["summary"]["already_labelled"] == 1 and r["summary"]["pool_files"] == 23
    if strategy in ("uncertainty", "combined"):
        assert all(row["predicted"] in ("brick", "grass", "gravel") for row in r["picks"])
    if strategy == "uncertainty":
        margins = [row["margin"] for row in r["picks"]]
        assert margins == sorted(margins)
    with pytest.raises(ValueError, match=r"^budget 22 is larger than the pool of 21 unlabelled images"):
        select_images(unl, tiny_model, store=tmp_path / "store", budget=22, labelled=lab, strategy=strategy,
                      progress=False)


def test_select_cli_cold_start_sheet_and_errors(pool, tiny_model, tmp_path, capsys):
    lab, unl = pool
    code, out, err = cli(capsys, "select", unl, "--budget", 5, "--store", tmp_path / "s", "--model", tiny_model,
                         "--no-progress", "--format", "json", "--sheet", tmp_path / "next.png")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["summary"]["strategy"] == "diversity" and doc["summary"]["labelled"] == 0
    assert [p["rank"] for p in doc["picks"]] == [1, 2, 3, 4, 5]
    assert len({p["key"] for p in doc["picks"]}) == 5
    with Image.open(tmp_path / "next.png") as im:
        assert im.format == "PNG" and im.size[0] == 5 * (128 + 12)
    code, out, err = cli(capsys, "select", unl, "--labelled", lab, "--budget", 3, "--store", tmp_path / "s",
                         "--model", tiny_model, "--no-progress")
    assert code == 0
    assert out.splitlines()[0] == ("3 of 21 unlabelled images to label next (combined, 1 files left out as labelled "
                                   "already)")
    assert out.splitlines()[1].split() == ["rank", "predicted", "margin", "path"]
    r = subprocess.run([sys.executable, "-m", "featurebank", "select", str(unl), "--budget", "30", "--store",
                        str(tmp_path / "s"), "--model", str(tiny_model), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("featurebank: error: budget 30 is larger than the pool of 22 unlabelled "
                                         "images; lower --budget to at most 22")
    code, _, err = cli(capsys, "select", unl, "--budget", 3, "--strategy", "uncertainty", "--store", tmp_path / "s",
                       "--model", tiny_model, "--no-progress")
    assert code == 2 and "needs labelled images (--labelled SOURCE); for a cold start use --strategy diversity" in err


def test_map_png_and_html(faulty, tiny_model, tmp_path, capsys):
    r = map_images(faulty.train, tiny_model, tmp_path / "map.png", store=tmp_path / "s", progress=False)
    assert r["n_images"] == 49 and r["method"] == "pca" and r["classes"] == ["brick", "grass", "gravel"]
    with Image.open(tmp_path / "map.png") as im:
        assert im.format == "PNG" and im.size == (935, 770)
    code, out, err = cli(capsys, "map", faulty.train, "--store", tmp_path / "s", "--model", tiny_model,
                         "--no-progress", "-o", tmp_path / "map.html", "--max-thumbnails", 10)
    assert code == 0, err
    assert out == f"wrote {tmp_path / 'map.html'}: 49 images, 3 classes, pca\n"
    page = (tmp_path / "map.html").read_text()
    doc = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert len(doc["points"]) == 49 and doc["classes"] == ["brick", "grass", "gravel"]
    assert sum(p[4] is not None for p in doc["points"]) == 10
    assert {p[3] for p in doc["points"]} >= {"gravel/astronaut.jpg", "brick/grass00.jpg"}  # names, not server paths


def test_map_checks_the_optional_dependency_before_anything(faulty, tiny_model, tmp_path, capsys):
    pytest.importorskip("sklearn")
    try:
        import umap  # noqa: F401
        pytest.skip("umap-learn is installed here")
    except ImportError:
        pass
    code, out, err = cli(capsys, "map", faulty.train, "--store", tmp_path / "never", "--model", tiny_model,
                         "--method", "umap", "-o", tmp_path / "m.png")
    assert code == 2
    assert err == ("featurebank: error: --method umap needs umap-learn, which is not installed; pip install "
                   "'featurebank[umap]' (or use --method pca)\n")
    assert not (tmp_path / "never").exists()  # nothing embedded
    code, _, err = cli(capsys, "map", faulty.train, "--store", tmp_path / "never", "--model", tiny_model,
                       "-o", tmp_path / "m.jpg")
    assert code == 2 and err == f"featurebank: error: the map is written as .png or .html; got -o '{tmp_path / 'm.jpg'}'\n"


def test_map_html_shows_the_thumbnail_on_hover(faulty, tiny_model, tmp_path):
    pytest.importorskip("playwright.sync_api")
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
    from test_page import CHROMIUM, browser_page

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}")
    map_images(faulty.train, tiny_model, tmp_path / "map.html", store=tmp_path / "s", progress=False)
    with browser_page() as (page, errors):
        page.goto((tmp_path / "map.html").as_uri())
        assert page.locator("#map circle").count() == 49
        dot = page.locator("#map circle").nth(48)
        dot.dispatch_event("mouseover")
        page.wait_for_function("document.querySelector('#tip img') && document.querySelector('#tip img').naturalWidth > 0")
        assert page.locator("#tip div").nth(1).text_content() == "gravel/gravel15.jpg"
        assert page.locator("#tip div").first.text_content() == "gravel"
        assert not errors, errors
