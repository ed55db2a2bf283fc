"""decode_batch / infer_batch / decode_ahead: the one decode -> infer pair, on real image
files, real bytes and a real onnxruntime session."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from featurebank.artifact import read_model_card
from featurebank.decoding import decode_image, to_model_input
from featurebank.embedder.batches import decode_ahead, decode_batch, infer_batch
from featurebank.embedder.session import open_model
from featurebank.errors import ImageDecodeError, ImageSourceError


def test_decode_batch_aligns_rows_with_sources_and_reports_failures(tmp_path, photo_dir, tiny_model):
    card = read_model_card(tiny_model)
    good = [photo_dir / "chelsea.jpg", photo_dir / "coffee.jpg"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    data = good[1].read_bytes()
    sources = [str(good[0]), str(tmp_path / "gone.jpg"), data, str(broken), b"junk"]
    got = decode_batch(sources, card, mode="fast", names=[None, None, "upload.jpg", None, "https://x/y.jpg"])
    c, h, w = card.preprocessing.input_size
    assert got.pixels.shape == (5, h, w, c) and got.pixels.dtype == np.uint8
    assert got.ok.tolist() == [True, False, True, False, False]
    np.testing.assert_array_equal(got.pixels[0], decode_image(good[0], card, mode="fast"))
    np.testing.assert_array_equal(got.pixels[2], decode_image(data, card, mode="fast"))
    assert not got.pixels[[1, 3, 4]].any()  # failed rows are zero
    reasons = {i: str(e) for i, e in got.failures}
    assert list(reasons) == [1, 3, 4] and all(isinstance(e, ImageDecodeError) for _, e in got.failures)
    assert reasons[1] == f"{tmp_path / 'gone.jpg'}: no such file"
    assert reasons[3].startswith(f"{broken}: starts like a PNG file but its header is corrupt")
    assert reasons[4].startswith("https://x/y.jpg: not an image: unrecognised content")
    np.testing.assert_array_equal(got.decoded, got.pixels[[0, 2]])
    assert got.seconds > 0


def test_decode_batch_read_hook_errors_are_that_images_failure(photo_dir, tiny_model):
    card = read_model_card(tiny_model)
    calls = []

    def read(item):
        calls.append(item)
        if item == "refused":
            raise ImageSourceError("refused: not allowed here")
        if item == "vanished":
            raise FileNotFoundError(2, "No such file or directory")
        return (photo_dir / item).read_bytes()

    got = decode_batch(["chelsea.jpg", "refused", "vanished"], card, mode="exact", names=["a", "b", "c"], read=read)
    assert calls == ["chelsea.jpg", "refused", "vanished"]  # one at a time, in order
    assert got.ok.tolist() == [True, False, False]
    assert [str(e) for _, e in got.failures] == ["refused: not allowed here", "c: No such file or directory"]
    np.testing.assert_array_equal(got.pixels[0], decode_image(photo_dir / "chelsea.jpg", card, mode="exact"))


def test_decode_batch_names_an_unreadable_path_once(tmp_path, tiny_model):
    card = read_model_card(tiny_model)
    path = str(tmp_path / "x.jpg")

    def read(item):
        raise PermissionError(13, "Permission denied")

    got = decode_batch([path], card, mode="fast", read=read)
    assert str(got.failures[0][1]) == f"{path}: Permission denied"

    def read_url(item):  # fsspec readers name the URL themselves
        raise FileNotFoundError(f"{item}: no such file")

    url = "s3://bucket/x.jpg"
    got = decode_batch([url], card, mode="fast", names=[url], read=read_url)
    assert str(got.failures[0][1]) == "s3://bucket/x.jpg: no such file"


def test_decode_batch_rejects_a_wrong_number_of_names(tiny_model):
    with pytest.raises(ValueError, match=r"names must give one name per source \(2\); got 1"):
        decode_batch([b"a", b"b"], read_model_card(tiny_model), mode="fast", names=["x"])


def test_infer_batch_is_the_session_on_the_model_input(photo_dir, tiny_model):
    runner = open_model(tiny_model, device="cpu")
    pixels = decode_batch(sorted(photo_dir.glob("*.jpg"))[:3], runner.card, mode="fast").pixels
    out = infer_batch(runner, pixels)
    name = runner.card.output().name
    direct = runner.run(to_model_input(pixels, runner.card))[name].reshape(3, -1)
    assert list(out) == [name] and out[name].dtype == np.float32
    np.testing.assert_array_equal(out[name], direct)
    assert infer_batch(runner, pixels[:0])[name].shape == (0, runner.card.output().dim)


def test_decode_ahead_keeps_order_and_lowers_the_decode_threads_priority(photo_dir, tiny_model):
    card = read_model_card(tiny_model)
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    batches = [paths[i : i + 2] for i in range(0, len(paths), 2)]
    gen = decode_ahead(iter(batches), card, mode="fast", workers=2)
    first = next(gen)
    # the pool's threads are alive while the generator is suspended: read their nice value
    niceness = _thread_niceness("fb-decode")
    rest = list(gen)
    for batch, got in zip(batches, [first, *rest]):
        assert got.ok.all() and len(got.pixels) == len(batch)
        np.testing.assert_array_equal(got.pixels, decode_batch(batch, card, mode="fast").pixels)
    assert len(rest) == len(batches) - 1
    if niceness is not None:
        assert niceness and set(niceness) == {os.nice(0) + 10}


def test_decode_ahead_on_a_gpu_run_keeps_the_default_priority(photo_dir, tiny_model):
    card = read_model_card(tiny_model)
    gen = decode_ahead([[photo_dir / "chelsea.jpg"]] * 3, card, mode="fast", workers=1, lower_priority=False)
    next(gen)
    niceness = _thread_niceness("fb-decode")
    gen.close()
    if niceness is not None:
        assert niceness and set(niceness) == {os.nice(0)}


def _thread_niceness(prefix: str) -> list[int] | None:
    """Nice values of this process's threads whose name starts with ``prefix`` (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    out = []
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out.append(int(fields[16]))  # field 19 of stat(5), counted after the name
    return out
