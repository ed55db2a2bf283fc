"""list_images over real folders, list files and the broken-file corpus."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import build_corpus, run_as_nobody

from featurebank.embedder.sources import ImageList, list_images
from featurebank.errors import ImageSourceError


def test_image_folder_matches_torchvision(texture_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.datasets import ImageFolder

    images = list_images(texture_dir)
    tv = ImageFolder(str(texture_dir))
    assert images.classes == tv.classes == ["brick", "grass", "gravel"]
    assert images.class_to_idx == tv.class_to_idx
    assert images.paths == [p for p, _ in tv.samples]  # same files, same order
    assert [images.class_to_idx[lab] for lab in images.labels] == [y for _, y in tv.samples]
    assert len(images) == 30 and images.roots == [str(texture_dir)]


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_rules(tmp_path):
    root = tmp_path / "data"
    _touch(root / "top.PNG")
    _touch(root / "cat" / "b.jpg")
    _touch(root / "cat" / "a.JPEG")
    _touch(root / "cat" / "deep" / "er" / "c.webp")
    _touch(root / "dog" / "d.Tif")
    _touch(root / "dog" / "notes.txt")  # not an image extension
    _touch(root / "dog" / ".hidden.jpg")  # dot files: .DS_Store, macOS ._x.jpg forks
    _touch(root / ".ipynb_checkpoints" / "e.jpg")
    (root / "dog" / "folder.jpg").mkdir()  # a directory named like an image
    (root / "empty_class").mkdir()
    (root / "dog" / "broken.gif").symlink_to("nowhere.gif")  # listed: the decoder says why it fails
    (root / "cat" / "deep" / "loop").symlink_to("..")  # a symlink loop must not hang the walk

    images = list_images(root)
    rel = [os.path.relpath(p, root) for p in images.paths]
    assert rel == ["cat/a.JPEG", "cat/b.jpg", "cat/deep/er/c.webp", "dog/broken.gif", "dog/d.Tif", "top.PNG"]
    assert images.labels == ["cat", "cat", "cat", "dog", "dog", None]
    assert images.classes == ["cat", "dog"]  # classes that hold images


def test_symlinked_folders_are_followed_without_looping(tmp_path):
    store = tmp_path / "store" / "birds"
    _touch(store / "x.jpg")
    root = tmp_path / "data"
    root.mkdir()
    (root / "birds").symlink_to(store)
    (root / "self").symlink_to(root)  # loops straight back to the root
    t = time.perf_counter()
    images = list_images(root)
    assert time.perf_counter() - t < 2
    assert [os.path.relpath(p, root) for p in images.paths] == ["birds/x.jpg"]
    assert images.labels == ["birds"]


def test_corpus_listing(tmp_path):
    expected = build_corpus(tmp_path / "corpus")
    images = list_images(tmp_path / "corpus")
    names = [os.path.basename(p) for p in images.paths]
    assert sorted(names) == sorted(n for n, e in expected.items() if e.listed)
    assert "folder.jpg" not in names and "loop.jpg" in names
    assert set(images.labels) == {None}


def test_txt_list(tmp_path, photo_dir):
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(photo_dir / "coffee.jpg", lists / "local.jpg")
    (lists / "files.txt").write_text(
        "# a comment\n"
        "\n"
        "local.jpg\n"
        f"  {photo_dir / 'chelsea.jpg'}  \n"
        "sub/../local.jpg\n"
        "missing.jpg\n"  # not checked here: the decoder reports it
    )
    images = list_images(lists / "files.txt")
    assert images.paths == [
        str(lists / "local.jpg"), str(photo_dir / "chelsea.jpg"), str(lists / "local.jpg"), str(lists / "missing.jpg")
    ]
    assert images.labels == [None] * 4 and images.classes == [] and images.roots == [str(lists)]


def test_csv_list(tmp_path):
    (tmp_path / "labels.csv").write_text("\ufeffid,path,label\n1,a.jpg,cat\n2,/abs/b.png,\n3,\"c, d.jpg\",dog\n")
    images = list_images(tmp_path / "labels.csv")
    assert images.paths == [str(tmp_path / "a.jpg"), "/abs/b.png", str(tmp_path / "c, d.jpg")]
    assert images.labels == ["cat", None, "dog"] and images.classes == ["cat", "dog"]

    (tmp_path / "nolabel.csv").write_text("path\nx.jpg\n")
    assert list_images(tmp_path / "nolabel.csv").labels == [None]

    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,cat\n")
    with pytest.raises(ImageSourceError, match=r"bad\.csv' has no 'path' column \(header: file, label\)"):
        list_images(tmp_path / "bad.csv")
    (tmp_path / "hole.csv").write_text("path,label\nx.jpg,cat\n,dog\n")
    with pytest.raises(ImageSourceError, match=r"hole\.csv' line 3: empty 'path' cell"):
        list_images(tmp_path / "hole.csv")
    (tmp_path / "header_only.csv").write_text("path,label\n")
    with pytest.raises(ImageSourceError, match=r"header_only\.csv' lists no images"):
        list_images(tmp_path / "header_only.csv")


def test_parquet_list(tmp_path):
    pq.write_table(pa.table({"path": ["a.jpg", "/abs/b.jpg"], "label": [3, None], "extra": [1.0, 2.0]}), tmp_path / "l.parquet")
    images = list_images(tmp_path / "l.parquet")
    assert images.paths == [str(tmp_path / "a.jpg"), "/abs/b.jpg"]
    assert images.labels == ["3", None]  # labels are strings

    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ImageSourceError, match=r"bad\.parquet' has no 'path' column \(columns: file\)"):
        list_images(tmp_path / "bad.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ImageSourceError, match=r"fake\.parquet' is not a readable parquet file"):
        list_images(tmp_path / "fake.parquet")


def test_several_sources_concatenate_in_order(tmp_path, texture_dir, photo_dir):
    (tmp_path / "one.txt").write_text(str(photo_dir / "coffee.jpg") + "\n")
    images = list_images([tmp_path / "one.txt", texture_dir, photo_dir / "rocket.jpg"])
    assert isinstance(images, ImageList) and len(images) == 32
    assert images.paths[0] == str(photo_dir / "coffee.jpg") and images.labels[0] is None
    assert images.paths[-1] == str(photo_dir / "rocket.jpg")
    assert images.labels[1:31] == list_images(texture_dir).labels
    assert images.roots == [str(tmp_path), str(texture_dir), str(photo_dir)]
    assert images.classes == ["brick", "grass", "gravel"]


def test_source_errors(tmp_path):
    with pytest.raises(ImageSourceError, match=r"image source '.*nope' does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ImageSourceError, match=r"unknown image list format '\.json'.*\.txt, \.csv, \.parquet"):
        list_images(tmp_path / "list.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match=r"found no images under '.*empty' \(looked for the file endings of "
                       r"JPEG, .*PNG.*, case-insensitive\)$"):
        list_images(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("x")
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(ImageSourceError, match=r"case-insensitive; skipped 2 other files \(\(no extension\), \.txt\)\)$"):
        list_images(tmp_path / "empty")
    with pytest.raises(ImageSourceError, match=r"\(looked for \.png, case-insensitive; skipped 2 other files"):
        list_images(tmp_path / "empty", extensions=["png"])
    with pytest.raises(ImageSourceError, match=r"no image source given"):
        list_images([])
    with pytest.raises(TypeError, match=r"an image source must be a path; got int"):
        list_images([3])


def test_unreadable_subfolder_is_an_error_not_a_silent_gap():
    # a folder under /tmp that nobody may enter (pytest's tmp folders are 0700 to root)
    root = tempfile.mkdtemp(prefix="fb-walk-", dir="/tmp")
    try:
        os.chmod(root, 0o755)
        _touch(Path(root) / "a" / "x.jpg")
        _touch(Path(root) / "b" / "y.jpg")
        os.chmod(Path(root) / "a", 0o755)
        os.chmod(Path(root) / "b", 0)
        expected = r"ImageSourceError: cannot list folder '.*/b': Permission denied; fix its permissions.*"
        if os.geteuid() == 0:  # root lists mode-000 folders: ask as nobody
            assert len(list_images(root)) == 2
            assert re.fullmatch(expected, run_as_nobody(lambda: list_images(root)))
        else:
            with pytest.raises(ImageSourceError, match=expected.split(": ", 1)[1]):
                list_images(root)
    finally:
        os.chmod(Path(root) / "b", 0o755)
        shutil.rmtree(root)
