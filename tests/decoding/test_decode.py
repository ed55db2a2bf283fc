"""decode_image and to_model_input on real photos and on the broken-file corpus.

The reference is timm's own eval transform (torch is allowed in tests, not in the embedder).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from corpus import build_corpus, run_as_nobody
from PIL import Image, ImageFile, ImageOps

from featurebank.artifact import ModelCard, OutputSpec, Preprocessing
from featurebank.decoding import DEFAULT_MAX_PIXELS, decode_image, to_model_input
from featurebank.errors import ImageDecodeError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import timm
    import timm.data

LITE0 = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
PRE = Preprocessing(
    input_size=LITE0["input_size"],
    interpolation=LITE0["interpolation"],
    crop_pct=LITE0["crop_pct"],
    crop_mode=LITE0["crop_mode"],
    mean=LITE0["mean"],
    std=LITE0["std"],
)


def timm_transform(pre: Preprocessing):
    return timm.data.create_transform(
        input_size=pre.input_size,
        interpolation=pre.interpolation,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
        mean=pre.mean,
        std=pre.std,
    )


def timm_reference(path, pre: Preprocessing, *, exif: bool = False) -> np.ndarray:
    """What timm's loader + eval transform give: (C, H, W) float32."""
    with Image.open(path) as img:
        if exif:
            img = ImageOps.exif_transpose(img)
        return timm_transform(pre)(img.convert("RGB")).numpy()


def normalised(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    return to_model_input(pixels[None], pre, "float")[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory, photos):
    """A ~1200x900 real-photo JPEG (the astronaut, upscaled; quality 90)."""
    p = tmp_path_factory.mktemp("big") / "astronaut_1200x900.jpg"
    Image.fromarray(photos["astronaut"]).resize((1200, 900), Image.Resampling.BICUBIC).save(p, quality=90)
    return p


# --- parity with timm --------------------------------------------------------------------


def test_exact_matches_timm_eval_transform_on_real_photos(photo_dir):
    files = sorted(photo_dir.glob("*.jpg"))
    assert len(files) >= 8
    for p in files:
        ours = normalised(decode_image(p, PRE), PRE)
        ref = timm_reference(p, PRE)
        # same Pillow ops: identical pixels; the only difference is float rounding of the
        # fused multiply-add normalisation (one ulp at 1.0)
        assert np.abs(ours - ref).max() <= 1e-6, p.name


@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing((3, 200, 260), "bilinear", 0.9, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        Preprocessing((3, 240, 240), "lanczos", 1.0, (0.5,) * 3, (0.5,) * 3),
        Preprocessing((3, 192, 192), "bicubic", 1.0, (0.5,) * 3, (0.25,) * 3, crop_mode="squash"),
        Preprocessing((3, 300, 300), "nearest", 0.95, (0.0,) * 3, (1.0,) * 3),
    ],
    ids=["nonsquare-bilinear", "lanczos-crop1", "squash", "nearest-upscale"],
)
def test_exact_matches_timm_for_other_preprocessing(photo_dir, pre):
    for p in sorted(photo_dir.glob("*.jpg"))[:4]:
        ours = normalised(decode_image(p, pre), pre)
        assert np.abs(ours - timm_reference(p, pre)).max() <= 2e-6, p.name


def test_exact_matches_timm_loader_on_every_mode_in_the_corpus(corpus):
    root, expected = corpus
    checked = []
    for name, e in expected.items():
        if e.outcome != "ok" or name in ("gray16.png", "strip_10000x10.png"):
            continue  # 16-bit: timm's convert clips (tested below); strip: see the aspect test
        ours = normalised(decode_image(root / name, PRE), PRE)
        ref = timm_reference(root / name, PRE, exif=(name == "exif_rotated.jpg"))
        assert np.abs(ours - ref).max() <= 1e-6, name
        checked.append(name)
    assert {"cmyk.jpg", "palette_transparency.png", "la.png", "rgba.png", "animated.gif"} <= set(checked)


def test_extreme_aspect_ratio_resamples_only_the_crop(photos):
    # timm would resize 1200x10 to 30720x256 first; we resample the crop directly
    strip = np.asarray(Image.fromarray(photos["coffee"]).resize((1200, 10), Image.Resampling.BILINEAR))
    ours = decode_image(strip, PRE).astype(np.float64)
    ref = timm_transform(PRE)(Image.fromarray(strip)).numpy().transpose(1, 2, 0)
    ref = np.rint((ref * np.array(PRE.std) + np.array(PRE.mean)) * 255)
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.5 and diff.max() <= 3


# --- fast mode -----------------------------------------------------------------------------


def test_fast_differs_only_slightly_from_exact(photo_dir, big_jpeg):
    files = sorted(photo_dir.glob("*.jpg")) + [big_jpeg]
    diffs = {}
    for p in files:
        exact = decode_image(p, PRE, mode="exact").astype(np.int16)
        fast = decode_image(p, PRE, mode="fast").astype(np.int16)
        diffs[p.name] = float(np.abs(fast - exact).mean())
    # measured: 0.0 .. 1.3 grey levels (mean abs); the biggest where libjpeg's DCT scaling
    # replaces the bicubic anti-aliasing (512x512 -> 256: decoded at 1/2 scale)
    assert max(diffs.values()) < 2.0, diffs
    assert diffs[big_jpeg.name] > 0  # the fast path really is a different path here


def test_fast_mode_does_not_modify_a_callers_image(big_jpeg):
    with Image.open(big_jpeg) as img:
        decode_image(img, PRE, mode="fast")
        assert img.size == (1200, 900)


@pytest.mark.slow
def test_fast_mode_is_faster_on_large_jpegs(big_jpeg):
    def best_of(mode, n=15):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            decode_image(big_jpeg, PRE, mode=mode)
            times.append(time.perf_counter() - t)
        return min(times)

    exact, fast = best_of("exact"), best_of("fast")
    # measured 1.7x (quiet) to 3.5x (loaded) on a 2-core EPYC; 1.2 leaves room for noise
    assert exact / fast > 1.2, (exact, fast)


# --- the broken-file corpus -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # refused files warn no more
def test_corpus_outcomes(corpus, mode):
    root, expected = corpus
    problems = []
    for name, e in expected.items():
        try:
            got = decode_image(root / name, PRE, mode=mode)
        except ImageDecodeError as exc:
            if e.outcome != "fail":
                problems.append(f"{name}: expected ok, got {exc}")
            elif not re.search(e.match, str(exc)):
                problems.append(f"{name}: message {str(exc)!r} does not match {e.match!r}")
            elif "\n" in str(exc) or str(root) not in str(exc):
                problems.append(f"{name}: message is not one line naming the file: {exc!r}")
            continue
        if e.outcome == "fail":
            problems.append(f"{name}: expected failure matching {e.match!r}, but it decoded")
            continue
        assert got.shape == (224, 224, 3) and got.dtype == np.uint8
        ref = decode_image(e.reference, PRE, mode=mode).astype(np.int16)
        diff = float(np.abs(got - ref).mean())
        # fast mode decodes JPEGs at reduced scale, the in-memory reference at full scale
        slack = 2.0 if mode == "fast" and name.lower().endswith((".jpg", ".jpeg")) else 0.0
        if diff > e.tolerance + slack:
            problems.append(f"{name}: mean abs diff {diff:.2f} from its reference > {e.tolerance + slack}")
        if e.unlike is not None:
            far = float(np.abs(got - decode_image(e.unlike, PRE, mode=mode)).mean())
            if far < 10 * max(e.tolerance, 1.0):
                problems.append(f"{name}: too close ({far:.2f}) to the picture it must not show")
    assert not problems, "\n".join(problems)


def test_corpus_covers_the_required_cases(corpus):
    _, expected = corpus
    required = {
        "zero_bytes.jpg", "truncated.jpg", "text.jpg", "bomb.png", "bomb.gif", "cmyk.jpg",
        "gray16.png", "gray.png", "palette_transparency.png", "animated.gif", "exif_rotated.jpg",
        "one_pixel.png", "strip_10000x10.png", "folder.jpg", "unreadable.jpg", "loop.jpg",
        "rgba.png", "la.png", "photo.webp", "photo.bmp", "photo.tiff",
    }
    assert required <= set(expected)
    with Image.open(corpus[0] / "gray16.png") as img:
        assert img.mode == "I;16"  # really 16-bit on disk
    with Image.open(corpus[0] / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
    with Image.open(corpus[0] / "animated.gif") as img:
        assert img.n_frames == 2


def test_sixteen_bit_is_scaled_not_clipped(corpus):
    root, _ = corpus
    ours = decode_image(root / "gray16.png", PRE)
    with Image.open(root / "gray16.png") as img:
        clipped = decode_image(np.asarray(img.convert("RGB")), PRE)  # what convert("RGB") gives
    assert clipped.mean() > 250  # nearly all white: why we do not follow Pillow here
    assert 60 < ours.mean() < 200


def _decode_as_nobody(path, pre) -> str:
    msg = run_as_nobody(lambda: decode_image(path, pre))
    return "decoded" if msg == "ok" else msg


def test_permission_denied(photos, tmp_path):
    src = Image.fromarray(photos["coffee"])
    if os.geteuid() != 0:
        p = tmp_path / "unreadable.jpg"
        src.save(p)
        os.chmod(p, 0)
        with pytest.raises(ImageDecodeError, match=r"unreadable\.jpg: permission denied"):
            decode_image(p, PRE)
        return
    # as root, mode 000 does not stop us: drop to nobody in a child process instead
    folder = tempfile.mkdtemp(prefix="fb-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        p = os.path.join(folder, "unreadable.jpg")
        src.save(p)
        os.chmod(p, 0)
        assert decode_image(p, PRE).shape == (224, 224, 3)  # root reads it: the reason for the child
        assert re.fullmatch(r"ImageDecodeError: .*unreadable\.jpg: permission denied \(the file is not readable.*", _decode_as_nobody(p, PRE))
        os.chmod(p, 0o644)
        assert _decode_as_nobody(p, PRE) == "decoded"
        # a folder on the path that nobody may enter (pytest's tmp folders are 0700)
        q = tmp_path / "x.jpg"
        src.save(q)
        assert re.fullmatch(r"ImageDecodeError: .*x\.jpg: permission denied \(a folder on the path.*", _decode_as_nobody(q, PRE))
    finally:
        shutil.rmtree(folder)


# --- other failures, each with a clear one-line reason -------------------------------------


def test_missing_file_fifo_and_bad_arguments(tmp_path, photos):
    with pytest.raises(ImageDecodeError, match=r"nothere\.jpg: no such file"):
        decode_image(tmp_path / "nothere.jpg", PRE)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match=r"pipe\.jpg: not a regular file"):
        decode_image(fifo, PRE)  # must not block on open()
    with pytest.raises(ImageDecodeError, match=r"bytes: empty \(0 bytes\)"):
        decode_image(b"", PRE)
    with pytest.raises(ImageDecodeError, match=r"^bytes: not an image: unrecognised content \(the first bytes match no "
                       r"accepted image format: JPEG, .*PNG.*\)$"):
        decode_image(b"GIF8 nonsense", PRE)
    with pytest.raises(ImageDecodeError, match=r"array: dtype must be uint8; got float32"):
        decode_image(photos["chelsea"].astype(np.float32), PRE)
    with pytest.raises(ImageDecodeError, match=r"array: shape must be .*got \(300, 451, 2\)"):
        decode_image(photos["chelsea"][:, :, :2], PRE)
    with pytest.raises(ImageDecodeError, match=r"image: unsupported image mode 'La'"):
        decode_image(Image.new("La", (8, 8)), PRE)
    with pytest.raises(ValueError, match=r"mode must be one of exact, fast; got 'quick'"):
        decode_image(photos["chelsea"], PRE, mode="quick")
    with pytest.raises(ValueError, match=r"max_pixels must be a positive integer; got 0"):
        decode_image(photos["chelsea"], PRE, max_pixels=0)
    with pytest.raises(ValueError, match=r"out must be a uint8 array of shape \(224, 224, 3\)"):
        decode_image(photos["chelsea"], PRE, out=np.zeros((224, 224, 3), np.float32))
    with pytest.raises(TypeError, match=r"src must be a path, bytes.*got int"):
        decode_image(3, PRE)


def test_max_pixels_is_checked_before_decoding(photo_dir, corpus):
    p = photo_dir / "chelsea.jpg"
    with pytest.raises(ImageDecodeError, match=r"135,300 pixels \(451x300\), over the limit of 100,000 .*max_pixels"):
        decode_image(p, PRE, max_pixels=100_000)
    assert decode_image(p, PRE, max_pixels=135_300).shape == (224, 224, 3)
    # the 10^10-pixel PNG is a few hundred bytes: refused at once, nothing allocated
    root, _ = corpus
    t = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(root / "bomb.png", PRE, max_pixels=DEFAULT_MAX_PIXELS)
    assert time.perf_counter() - t < 1.0


def test_truncated_jpeg_fails_unless_the_process_opts_in(corpus, monkeypatch):
    root, _ = corpus
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg: truncated or corrupt image data"):
        decode_image(root / "truncated.jpg", PRE)
    # documented: a program that sets Pillow's global switch gets grey-padded images
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert decode_image(root / "truncated.jpg", PRE).shape == (224, 224, 3)


# --- inputs, outputs, channel orders -------------------------------------------------------


def test_every_source_kind_gives_the_same_pixels(tmp_path, photos):
    rgb = photos["rocket"]
    png = tmp_path / "rocket.png"
    Image.fromarray(rgb).save(png)
    expected = decode_image(str(png), PRE)
    assert decode_image(png, PRE).tobytes() == expected.tobytes()
    assert np.array_equal(decode_image(png.read_bytes(), PRE), expected)
    assert np.array_equal(decode_image(memoryview(png.read_bytes()), PRE), expected)
    assert np.array_equal(decode_image(Image.fromarray(rgb), PRE), expected)
    assert np.array_equal(decode_image(rgb, PRE), expected)
    assert np.array_equal(decode_image(np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)]), PRE), expected)
    assert np.array_equal(decode_image(np.asfortranarray(rgb), PRE), expected)
    gray = rgb[:, :, 1]
    assert np.array_equal(decode_image(gray, PRE), decode_image(np.dstack([gray] * 3), PRE))
    assert expected.flags.writeable and expected.flags.c_contiguous


def test_out_argument_and_channel_orders(photo_dir):
    p = photo_dir / "coffee.jpg"
    rgb = decode_image(p, PRE)
    batch = np.zeros((2, 224, 224, 3), np.uint8)
    row = batch[1]
    assert decode_image(p, PRE, out=row) is row
    assert np.array_equal(batch[1], rgb) and not batch[0].any()

    bgr = Preprocessing(PRE.input_size, PRE.interpolation, PRE.crop_pct, PRE.mean[::-1], PRE.std[::-1], channel_order="BGR")
    assert np.array_equal(decode_image(p, bgr), rgb[:, :, ::-1])

    gray_pre = Preprocessing((1, 224, 224), "bicubic", 0.875, (0.5,), (0.5,), channel_order="L")
    g = decode_image(p, gray_pre)
    assert g.shape == (224, 224, 1)
    with Image.open(p) as img:
        ref = timm_transform(gray_pre)(img.convert("L")).numpy()  # timm's input_img_mode="L"
    assert np.abs(normalised(g, gray_pre) - ref).max() <= 1e-6


def test_model_card_is_accepted_in_place_of_preprocessing(photo_dir):
    card = _card("uint8")
    p = photo_dir / "coffee.jpg"
    assert np.array_equal(decode_image(p, card), decode_image(p, PRE))


def test_decoding_from_threads_matches_sequential(photo_dir):
    files = sorted(photo_dir.glob("*.jpg")) * 3
    seq = [decode_image(p, PRE, mode=m) for p in files for m in ("exact", "fast")]
    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(lambda pm: decode_image(pm[0], PRE, mode=pm[1]), [(p, m) for p in files for m in ("exact", "fast")]))
    assert all(np.array_equal(a, b) for a, b in zip(seq, par))


# --- to_model_input ------------------------------------------------------------------------


def _card(input_format: str) -> ModelCard:
    out = OutputSpec.make(
        name="embedding", layer="blocks.5", pooling="avg", normalize=False, dim=320,
        backbone="tf_efficientnet_lite0", weights_sha256="ab" * 32, weights_source="test",
        preprocessing=PRE, precision="fp32",
    )
    return ModelCard(
        backbone="tf_efficientnet_lite0", weights_source="test", weights_sha256="ab" * 32,
        weights_license="apache-2.0", outputs=(out,), preprocessing=PRE, input_format=input_format,
    )


def test_to_model_input_formats(photo_dir):
    batch = np.stack([decode_image(p, PRE) for p in sorted(photo_dir.glob("*.jpg"))[:3]])
    assert to_model_input(batch, _card("uint8")) is batch
    assert to_model_input(batch, PRE, "uint8") is batch
    x = to_model_input(batch, _card("float"))
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    # torchvision: ToTensor (x / 255) then Normalize ((x - mean) / std), in float32
    ref = (batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert np.abs(x - ref).max() <= 1e-6
    buf = np.empty_like(x)
    assert to_model_input(batch, PRE, "float", out=buf) is buf and np.array_equal(buf, x)


def test_to_model_input_rejects_bad_batches():
    good = np.zeros((2, 224, 224, 3), np.uint8)
    with pytest.raises(ValueError, match=r"batch must have shape \(N, 224, 224, 3\) for this model; got \(224, 224, 3\)"):
        to_model_input(good[0], PRE, "float")
    with pytest.raises(ValueError, match=r"batch must be a uint8 ndarray from decode_image; got float32"):
        to_model_input(good.astype(np.float32), PRE, "float")
    with pytest.raises(ValueError, match=r"input_format must be one of float, uint8; got 'fp16'"):
        to_model_input(good, PRE, "fp16")
    with pytest.raises(ValueError, match=r"input_format is required with a bare Preprocessing"):
        to_model_input(good, PRE)
    with pytest.raises(ValueError, match=r"input_format 'float' contradicts the model card"):
        to_model_input(good, _card("uint8"), "float")
    with pytest.raises(ValueError, match=r"out must be float32 of shape \(2, 3, 224, 224\)"):
        to_model_input(good, PRE, "float", out=np.empty((2, 224, 224, 3), np.float32))


def test_broken_headers_name_the_format_they_claim():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    with pytest.raises(ImageDecodeError, match=r"^bytes: starts like a PNG file but its header is corrupt or cut short"):
        decode_image(buf.getvalue()[:20], PRE)
    with pytest.raises(ImageDecodeError, match=r"^bytes: not an image: unrecognised content"):
        decode_image(b"RIFF\x00\x00\x00\x00WAVEfmt ", PRE)


def test_name_replaces_bytes_array_and_image_in_messages(photo_dir, photos):
    """What a URL or a request's file is called in its refusal; a path always names itself."""
    url = "https://example.org/cat.jpg"
    with pytest.raises(ImageDecodeError, match=r"^https://example\.org/cat\.jpg: empty \(0 bytes\), not an image$"):
        decode_image(b"", PRE, name=url)
    with pytest.raises(ImageDecodeError, match=r"^https://example\.org/cat\.jpg: not an image: unrecognised content"):
        decode_image(b"GIF8 nonsense", PRE, name=url)
    data = (photo_dir / "chelsea.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match=r"^upload\.jpg: image has 135,300 pixels \(451x300\), over the limit"):
        decode_image(data, PRE, max_pixels=100_000, name="upload.jpg")
    with pytest.raises(ImageDecodeError, match=r"^row 3: dtype must be uint8; got float32"):
        decode_image(photos["chelsea"].astype(np.float32), PRE, name="row 3")
    with pytest.raises(ImageDecodeError, match=r"^frame: unsupported image mode 'La'"):
        decode_image(Image.new("La", (8, 8)), PRE, name="frame")
    with pytest.raises(ImageDecodeError, match=r"nothere\.jpg: no such file"):
        decode_image(photo_dir / "nothere.jpg", PRE, name="ignored")
    with pytest.raises(TypeError, match=r"name must be a str or None; got int"):
        decode_image(data, PRE, name=3)
    assert np.array_equal(decode_image(data, PRE, name=url), decode_image(data, PRE))
