"""An image over the pixel cap is an ImageTooLargeError carrying its size and the cap, so that
callers (the service's 413) tell it from broken data by its type, not by re-reading the file."""

from __future__ import annotations

import pickle

import pytest
from corpus import _png_declaring

from featurebank.artifact import Preprocessing
from featurebank.decoding import DEFAULT_MAX_PIXELS, decode_image
from featurebank.errors import ImageDecodeError, ImageTooLargeError

PRE = Preprocessing(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_over_max_pixels_carries_the_size_and_the_cap(photo_dir):
    path = photo_dir / "chelsea.jpg"  # a real 451x300 photo
    with pytest.raises(ImageTooLargeError, match=r"chelsea\.jpg: image has 135,300 pixels \(451x300\), over the "
                                                 r"limit of 100,000 \(possible decompression bomb\)") as info:
        decode_image(path, PRE, max_pixels=100_000)
    err = info.value
    assert (err.pixels, err.size, err.max_pixels) == (135_300, (451, 300), 100_000)
    assert isinstance(err, ImageDecodeError) and isinstance(err, ValueError)  # older except clauses still catch it


def test_pillow_refusal_is_too_large_with_the_pixels_it_names():
    # 10^10 pixels: Pillow refuses while opening, before the size is read; only the count is known
    data = _png_declaring(100_000, 100_000)
    with pytest.raises(ImageTooLargeError, match=r"^upload\.png: image has 10,000,000,000 pixels, over the limit of "
                                                 r"89,478,485 ") as info:
        decode_image(data, PRE, name="upload.png")
    assert (info.value.pixels, info.value.size, info.value.max_pixels) == (10**10, None, DEFAULT_MAX_PIXELS)


def test_broken_data_is_not_too_large(photo_dir):
    data = (photo_dir / "chelsea.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match=r"^cut\.jpg: truncated or corrupt image data") as info:
        decode_image(data[: len(data) // 3], PRE, name="cut.jpg")
    assert not isinstance(info.value, ImageTooLargeError)


def test_survives_pickling(photo_dir):
    # Ray carries errors from decode tasks to the driver by pickle
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(photo_dir / "chelsea.jpg", PRE, max_pixels=1000)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is ImageTooLargeError and str(clone) == str(info.value)
    assert (clone.pixels, clone.size, clone.max_pixels) == (135_300, (451, 300), 1000)
