"""URL sources: file:// goes through the local code path; other fsspec protocols are listed,
hashed and read with fsspec (here ``memory://``, a real fsspec filesystem in this process)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import pytest

from featurebank.artifact import read_model_card
from featurebank.distributed.locations import hash_urls, is_url, list_sources
from featurebank.distributed.ray_embed import _decode_batch
from featurebank.decoding import decode_image
from featurebank.embedder.sources import list_images
from featurebank.errors import ImageSourceError


@pytest.fixture()
def memory_textures(texture_dir):
    """texture_dir copied into a fresh memory:// folder (plus a dot file and a non-image)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/fb-{uuid.uuid4().hex[:8]}"
    for p in sorted(texture_dir.rglob("*.jpg")):
        fs.pipe_file(f"{root}/{p.parent.name}/{p.name}", p.read_bytes())
    fs.pipe_file(f"{root}/grass/.hidden.jpg", b"x")
    fs.pipe_file(f"{root}/notes.txt", b"not an image")
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_is_url():
    assert is_url("s3://bucket/x.jpg") and is_url("memory://a") and is_url("gs://b/")
    assert not is_url("/data/x.jpg") and not is_url("file:///data/x.jpg") and not is_url("rel/x.jpg")


def test_file_urls_are_local_paths(texture_dir, photo_dir):
    got = list_sources([f"file://{texture_dir}", str(photo_dir)])
    want = list_images([texture_dir, photo_dir])
    assert got.paths == want.paths and got.labels == want.labels


def test_memory_folder_lists_like_a_local_folder(memory_textures, texture_dir):
    got = list_sources(memory_textures)
    local = list_images(texture_dir)
    assert got.labels == local.labels  # classes from the first subfolder, same order
    assert [p.rsplit("/", 2)[-2:] for p in got.paths] == [p.rsplit("/", 2)[-2:] for p in local.paths]
    assert all(p.startswith("memory://") for p in got.paths)
    keys, errors = hash_urls(got.paths + [memory_textures + "/missing.jpg"])
    assert keys[:-1] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in local.paths]
    assert keys[-1] is None and errors[-1] == f"{memory_textures}/missing.jpg: no such file"


def test_url_errors(memory_textures):
    with pytest.raises(ImageSourceError, match=r"memory://nowhere-\w+: no such file or folder"):
        list_sources(f"memory://nowhere-{uuid.uuid4().hex[:6]}")
    with pytest.raises(ImageSourceError, match=r"list files must be local paths"):
        list_sources(memory_textures + "/list.csv")
    with pytest.raises(ImageSourceError, match=r"cannot open this URL .*install the fsspec backend"):
        list_sources("nosuchproto://bucket/photos/")


def test_decode_task_reads_urls_and_checks_their_key(memory_textures, texture_dir, tiny_model):
    import fsspec

    pre = read_model_card(tiny_model).preprocessing
    urls = list_sources(memory_textures).paths[:3]
    keys, _ = hash_urls(urls)
    keys[2] = "0" * 64  # as if the object had been rewritten after hashing
    fsspec.filesystem("memory").pipe_file(memory_textures.removeprefix("memory://") + "/broken.jpg", b"\xff\xd8\xffjunk")
    urls.append(memory_textures + "/broken.jpg")
    keys.append(hashlib.sha256(b"\xff\xd8\xffjunk").hexdigest())
    batch = {"key": np.array(keys, object), "path": np.array(urls, object), "label": np.array(["a"] * 4, object)}
    out = _decode_batch(batch, pre=pre, decode_mode="fast")
    local = sorted(texture_dir.rglob("*.jpg"))
    by_name = {f"{p.parent.name}/{p.name}": p for p in local}
    for i in range(2):
        want = decode_image(by_name["/".join(urls[i].rsplit("/", 2)[-2:])], pre, mode="fast")
        np.testing.assert_array_equal(out["pixels"][i], want)
    assert list(out["error"][:2]) == ["", ""]
    assert out["error"][2] == f"{urls[2]}: changed while being embedded (its bytes no longer match their key); run again"
    assert out["error"][3].startswith(urls[3] + ": ") and "JPEG" in out["error"][3]
    assert not out["pixels"][2:].any()


@pytest.fixture()
def textures_zip(texture_dir, tmp_path):
    import zipfile

    path = tmp_path / "textures.zip"
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(texture_dir.rglob("*.jpg")):
            z.write(p, f"textures/{p.parent.name}/{p.name}")
    return path


def test_chained_url_members_keep_their_archive(textures_zip, texture_dir):
    url = f"zip://textures::file://{textures_zip}"
    got = list_sources(url)
    local = list_images(texture_dir)
    assert got.labels == local.labels
    assert got.paths[0] == f"zip://textures/brick/00.jpg::file://{textures_zip}"
    keys, errors = hash_urls(got.paths)
    assert errors == [None] * len(keys)
    assert keys == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in local.paths]
