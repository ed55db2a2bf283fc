"""Image decoding and preprocessing, driven by the model card's :class:`Preprocessing`.

:func:`decode_image` turns one image (a file path, bytes, a ``PIL.Image`` or a uint8 array)
into the ``(H, W, C)`` uint8 pixels the network sees, after the same steps timm's eval
transform applies; :func:`to_model_input` turns a stacked batch of those into the graph's
input (uint8 NHWC as is, or normalised float32 NCHW).

Steps of :func:`decode_image`, in order:

1. open the file (through :func:`~featurebank._files.open_image_file`, which refuses
   FIFOs, devices, virtual and oversized files) and read the header only, trying only the
   :data:`ACCEPTED_FORMATS`; refuse images with more than ``max_pixels`` pixels *before* any
   pixel is decoded (decompression bombs; Pillow's own ``DecompressionBombWarning`` is not
   shown, the refusal says it all);
2. take the first frame of animations (GIF, APNG, WebP, multi-page TIFF);
3. (``mode="fast"``, JPEG only) let libjpeg decode at 1/2, 1/4 or 1/8 scale
   (``Image.draft``) while staying at least as large as the resize target;
4. decode the pixels; a truncated or corrupt file raises;
5. convert to RGB with Pillow's ``convert("RGB")``, exactly as timm/torchvision loaders do,
   so alpha is dropped (the colour stored under transparent pixels shows), palettes are
   expanded, CMYK is converted by Pillow. Exception: 16-bit images (``I;16*``) are scaled to
   8 bits (``round(v / 257)``) instead of clipped to 255, which is what ``convert`` does and
   which turns nearly every 16-bit photo white. ``I`` (32-bit) and ``F`` follow Pillow
   (values taken as 0..255, clipped). ``channel_order="L"`` converts to ``L`` instead, as
   timm's ``input_img_mode="L"`` does; ``"BGR"`` reverses the channels at the end;
6. apply the EXIF orientation (as ``ImageOps.exif_transpose``): timm does not, but a
   sideways photo is never what anyone means;
7. timm's eval transform: the shorter side resized to ``floor(size / crop_pct)`` with the
   card's interpolation (a non-square ``input_size`` uses timm's ``ResizeKeepRatio`` rule),
   then the centre crop (torchvision's rounding). ``crop_mode="squash"`` resizes both sides
   straight to the input size (see :attr:`Preprocessing.resize_size`).

``mode="exact"`` reproduces timm's transform pixel for pixel (same Pillow calls in the same
order), with one guard: when the resized image would be more than 16
times the crop (aspect ratios beyond about 1:12), only the cropped region is resampled
(``Image.resize(box=...)``), which differs by at most a level or two for smooth filters but
keeps a 1 x 100000 image from allocating gigabytes.
``mode="fast"`` resamples only the cropped region, lets the JPEG decoder work at reduced
scale and reduces by integer factors first (``reducing_gap``); it is several times faster
on large JPEGs and differs from ``exact`` by about one grey level on average
(``tests/decoding/test_decode.py`` measures it).

Truncated files fail loudly: featurebank never sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
(a process-wide switch). If your program sets it, Pillow pads truncated images with grey
and they decode without error; that is then your choice. Corruption inside JPEG entropy
data that libjpeg recovers from is not detectable here.

Accepted formats: :mod:`featurebank.decoding.formats` (:data:`ACCEPTED_FORMATS`, the one list).

Everything here is thread-safe (no shared mutable state but one lock held while Pillow parses
a header, about 20-40 us of a 1.4 ms decode, see :func:`_open_image`; each call opens its own
file and image) and the heavy parts (file reads, decoding, resampling, numpy arithmetic)
release the GIL, so a thread pool scales with cores.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from functools import lru_cache
from typing import Any, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from featurebank.artifact import DECODE_MODES, INPUT_FORMATS, ModelCard, Preprocessing
from featurebank._files import open_image_file
from featurebank.decoding.formats import ACCEPTED_FORMATS, OPENERS, claimed_format
from featurebank.errors import ImageDecodeError, ImageTooLargeError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageSource", "decode_image", "thumbnail", "to_model_input"]


#: Default pixel limit, the same as Pillow's own warning threshold (about 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# ImageOps.exif_transpose's table, applied by hand so that images without an orientation
# tag are not copied (exif_transpose returns a full-size copy even when there is nothing to do).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# exact mode resizes the whole image before cropping, as timm does; beyond this many times
# the crop's area it resamples only the crop instead (see the module docstring).
_MAX_INTERMEDIATE = 16
# fast mode: Image.reduce() by an integer factor first while the image is more than this many
# times larger than the target (Pillow's reducing_gap); 2.0 measured ~as good as 3.0 here.
_REDUCING_GAP = 2.0

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# warnings.catch_warnings changes process-wide state: decode threads take turns inside it
_OPEN_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def decode_image(
    src: ImageSource,
    pre: Preprocessing | ModelCard,
    *,
    mode: str = "exact",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    out: np.ndarray | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode one image and preprocess it to the network's input size.

    Parameters
    ----------
    src : path (str or os.PathLike), encoded bytes, ``PIL.Image.Image`` (used as given, its
        current frame; not closed) or uint8 ndarray of shape (H, W), (H, W, 3) RGB or
        (H, W, 4) RGBA.
    pre : :class:`~featurebank.artifact.Preprocessing` (or a ``ModelCard``, whose
        preprocessing is used).
    mode : ``"exact"`` (pixel-identical to timm's eval transform) or ``"fast"`` (reduced-scale
        JPEG decoding and crop-only resampling; about one grey level off on average).
    max_pixels : refuse images with more pixels than this, before decoding them.
    out : optional preallocated uint8 array of shape (H, W, C), e.g. one row of a batch
        buffer; the result is written there and returned.
    name : what error messages call an image that is not a path (a URL, a request's file
        name); default ``"bytes"``, ``"array"`` or ``"image"``. A path is always named by itself.

    Returns
    -------
    ndarray of shape (H, W, C), uint8, with (C, H, W) = ``pre.input_size``; channels in
    ``pre.channel_order`` (C is 1 for ``"L"``).

    Raises
    ------
    ImageDecodeError
        with a one-line reason that never quotes the file's bytes: missing file, directory,
        permission denied, symlink loop, not a regular file (FIFO, device, ``/proc`` file),
        empty or oversized file (see :func:`~featurebank._files.open_image_file`),
        not an image or not in :data:`ACCEPTED_FORMATS`, too many pixels, truncated or
        corrupt data, unsupported mode, bad array shape or dtype. Paths and bytes are held
        to :data:`ACCEPTED_FORMATS`; a ``PIL.Image`` passed in is used whatever its format.

    Example
    -------
    >>> pre = Preprocessing(input_size=(3, 224, 224), interpolation="bicubic",
    ...                     crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> decode_image(np.zeros((480, 640, 3), np.uint8), pre).shape
    (224, 224, 3)
    """
    pre = _as_preprocessing(pre)
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {', '.join(DECODE_MODES)}; got {mode!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer; got {max_pixels!r}")
    channels, height, width = pre.input_size
    if out is not None and (
        not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != (height, width, channels)
    ):
        got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a uint8 array of shape {(height, width, channels)}; got {got}")

    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None; got {type(name).__name__}")
    if isinstance(src, np.ndarray):
        where = name or "array"
        return _process(_image_from_array(src, where), pre, mode, int(max_pixels), out, where, owned=True)
    if isinstance(src, Image.Image):
        return _process(src, pre, mode, int(max_pixels), out, name or "image", owned=False)
    if isinstance(src, (bytes, bytearray, memoryview)):
        where = name or "bytes"
        if len(src) == 0:
            raise ImageDecodeError(f"{where}: empty (0 bytes), not an image")
        with _open_image(io.BytesIO(src), where, max_pixels) as img:
            return _process(img, pre, mode, int(max_pixels), out, where, owned=True)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        with open_image_file(path) as fp, _open_image(fp, path, max_pixels) as img:
            return _process(img, pre, mode, int(max_pixels), out, path, owned=True)
    raise TypeError(
        "src must be a path, bytes, a PIL.Image.Image or a uint8 ndarray; got " + type(src).__name__
    )


def thumbnail(path: str | os.PathLike[str], size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB thumbnail of the image file at ``path``, its longest side ``size`` (EXIF
    orientation applied, the JPEG decoder drafting at reduced scale, Lanczos), read with the one
    checked opener (:func:`featurebank._files.open_image_file`: a FIFO or device named like an
    image is refused, never waited on).

    Raises ImageTooLargeError above ``max_pixels`` (before decoding), OSError / ValueError /
    PIL.Image.DecompressionBombError when the file cannot be read: the contact sheets draw a
    grey tile for those, the service answers 413 / 404.
    """
    from PIL import ImageOps

    from featurebank._files import open_image_file

    with open_image_file(path) as fh, Image.open(fh) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLargeError(_bomb_message(str(path), w * h, (w, h), max_pixels), pixels=w * h,
                                     size=(w, h), max_pixels=max_pixels)
        img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        return img.copy()


def to_model_input(
    batch: np.ndarray,
    card_or_pre: ModelCard | Preprocessing,
    input_format: str | None = None,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Turn a batch of decoded images into the graph's input tensor.

    Parameters
    ----------
    batch : ndarray of shape (N, H, W, C), uint8, as stacked from :func:`decode_image`.
    card_or_pre : ``ModelCard`` or ``Preprocessing`` (gives input_size, mean, std).
    input_format : ``"uint8"`` or ``"float"``; defaults to the card's ``input_format``
        (required when a bare ``Preprocessing`` is passed).
    out : optional preallocated float32 array of shape (N, C, H, W) for ``"float"``.

    Returns
    -------
    ``"uint8"``: ``batch`` itself, (N, H, W, C) uint8 (the graph scales and normalises).
    ``"float"``: ndarray of shape (N, C, H, W), float32, ``(x / 255 - mean) / std``
    (computed as one multiply-add per channel; within 1e-6 of torchvision's Normalize).
    """
    if isinstance(card_or_pre, ModelCard):
        pre = card_or_pre.preprocessing
        if input_format is None:
            input_format = card_or_pre.input_format
        elif input_format != card_or_pre.input_format:
            raise ValueError(
                f"input_format {input_format!r} contradicts the model card, whose graph takes "
                f"{card_or_pre.input_format!r}; leave input_format out"
            )
    elif isinstance(card_or_pre, Preprocessing):
        pre = card_or_pre
        if input_format is None:
            raise ValueError("input_format is required with a bare Preprocessing: pass 'uint8' or 'float'")
    else:
        raise TypeError(f"card_or_pre must be a ModelCard or Preprocessing; got {type(card_or_pre).__name__}")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}; got {input_format!r}")

    channels, height, width = pre.input_size
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
        got = batch.dtype if isinstance(batch, np.ndarray) else type(batch).__name__
        raise ValueError(f"batch must be a uint8 ndarray from decode_image; got {got}")
    if batch.ndim != 4 or batch.shape[1:] != (height, width, channels):
        raise ValueError(
            f"batch must have shape (N, {height}, {width}, {channels}) for this model; got {batch.shape}"
        )
    if input_format == "uint8":
        return batch

    n = batch.shape[0]
    if out is None:
        out = np.empty((n, channels, height, width), np.float32)
    elif out.dtype != np.float32 or out.shape != (n, channels, height, width):
        raise ValueError(f"out must be float32 of shape {(n, channels, height, width)}; got {out.shape} {out.dtype}")
    scale, bias = _affine(pre.mean, pre.std)
    for c in range(channels):
        # ufuncs release the GIL; one fused pass per channel, no temporaries
        np.multiply(batch[..., c], scale[c], out=out[:, c])
        out[:, c] += bias[c]
    return out


# ---------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------


def _as_preprocessing(pre: Any) -> Preprocessing:
    if isinstance(pre, Preprocessing):
        return pre
    if isinstance(pre, ModelCard):
        return pre.preprocessing
    raise TypeError(f"pre must be a Preprocessing or ModelCard; got {type(pre).__name__}")


@lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    # (x/255 - m)/s == x * (1/(255 s)) + (-m/s); computed in float64, applied in float32
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (255.0 * s)).astype(np.float32), (-m / s).astype(np.float32)


def _bomb_message(where: str, pixels: int | None, size: tuple[int, int] | None, max_pixels: int) -> str:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    count = f"{pixels:,} pixels{dims}" if pixels is not None else "too many pixels"
    return (
        f"{where}: image has {count}, over the limit of {max_pixels:,} (possible decompression bomb); "
        "if you trust the file, pass a larger max_pixels (CLI: --max-pixels)"
    )


def _open_image(fp, where: str, max_pixels: int) -> Image.Image:
    """Image.open (header only, accepted formats only) with Pillow's exceptions turned into
    ImageDecodeError. Pillow's DecompressionBombWarning is not shown: :func:`_process` checks
    the size against ``max_pixels`` and refuses with one message, or the caller allowed it."""
    try:
        # catch_warnings swaps the process's filter list: threads must not interleave inside it
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=OPENERS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses on its own above 2 * PIL.Image.MAX_IMAGE_PIXELS, before we see the size
        m = _BOMB_PIXELS.search(str(exc))
        pixels = int(m.group(1)) if m else None
        msg = _bomb_message(where, pixels, None, max_pixels)
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if max_pixels > limit:
            msg += f" and raise PIL.Image.MAX_IMAGE_PIXELS (Pillow itself refuses above {limit:,})"
        raise ImageTooLargeError(msg, pixels=pixels, max_pixels=max_pixels) from None
    except UnidentifiedImageError:
        kind = claimed_format(_peek(fp))
        if kind in ACCEPTED_FORMATS:
            raise ImageDecodeError(f"{where}: starts like a {kind} file but its header is corrupt or cut short") from None
        if kind:
            raise ImageDecodeError(
                f"{where}: a {kind} file, not an accepted image format (accepted: {', '.join(ACCEPTED_FORMATS)})"
            ) from None
        raise ImageDecodeError(
            f"{where}: not an image: unrecognised content (the first bytes match no accepted image format: "
            f"{', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except Exception as exc:  # malformed headers raise SyntaxError, struct.error, ValueError ...
        kind = claimed_format(_peek(fp))
        raise ImageDecodeError(
            f"{where}: starts like {f'a {kind}' if kind else 'an image'} file but its header is corrupt or cut "
            f"short ({_describe(exc)})"
        ) from None


def _peek(fp) -> bytes:
    try:
        fp.seek(0)
        return fp.read(16)
    except (OSError, ValueError):
        return b""


def _describe(exc: BaseException) -> str:
    """The exception's type and the first clause of its message. Pillow puts pieces of the
    file after a colon, a parenthesis or a quote ("broken PNG file (chunk b'...')", "Token too
    long in file header: <bytes>"); those are cut so that a reason never quotes the file."""
    text = " ".join(str(exc).split())
    if text[:2] in ("b'", 'b"'):  # a message Pillow built as bytes
        text = text[2:]
    text = re.split(r"[:(\[{'\"<=]", text, maxsplit=1)[0].strip()[:80]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _image_from_array(a: np.ndarray, where: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageDecodeError(f"{where}: dtype must be uint8; got {a.dtype} (scale to 0..255 and cast first)")
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA")
    raise ImageDecodeError(f"{where}: shape must be (H, W), (H, W, 3) or (H, W, 4); got {a.shape}")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block must not cost the picture; timm ignores EXIF anyway
        return 1
    return value if value in _ORIENTATION else 1


def _resized_size(w: int, h: int, pre: Preprocessing) -> tuple[int, int]:
    """(width, height) after timm's resize step, for a (w, h) image."""
    th, tw = pre.resize_size
    if pre.crop_mode == "squash":
        return tw, th
    if th == tw:
        # torchvision Resize(int): shorter side to size, longer side truncated
        if w <= h:
            return th, int(th * h / w)
        return int(th * w / h), th
    # timm ResizeKeepRatio(longest=0): scale by the smaller ratio, round both sides
    ratio = min(h / th, w / tw)
    return round(w / ratio), round(h / ratio)


def _crop_box(rw: int, rh: int, pre: Preprocessing) -> tuple[int, int, int, int]:
    """torchvision center_crop's (left, top, right, bottom) in the resized image."""
    _, ch, cw = pre.input_size
    top = int(round((rh - ch) / 2.0))
    left = int(round((rw - cw) / 2.0))
    return left, top, left + cw, top + ch


def _to_mode(img: Image.Image, target: str) -> Image.Image:
    """Convert to "RGB" (or "L") as timm's loader does; 16-bit is scaled, not clipped."""
    if img.mode == target:
        return img
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float32)
        gray = Image.fromarray(np.rint(a * (1.0 / 257.0)).astype(np.uint8), "L")
        return gray if target == "L" else gray.convert(target)
    try:
        return img.convert(target)
    except ValueError as exc:
        raise _Unsupported(f"unsupported image mode {img.mode!r} ({exc})") from None


class _Unsupported(Exception):
    pass


def _process(
    img: Image.Image,
    pre: Preprocessing,
    mode: str,
    max_pixels: int,
    out: np.ndarray | None,
    where: str,
    *,
    owned: bool,
) -> np.ndarray:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(_bomb_message(where, w * h, (w, h), max_pixels), pixels=w * h, size=(w, h),
                                 max_pixels=max_pixels)
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{where}: image has no pixels ({w}x{h})")
    channels, ch, cw = pre.input_size
    target = "L" if pre.channel_order == "L" else "RGB"
    filt = _FILTERS[pre.interpolation]
    # draft() changes the image object in place: never on an Image the caller gave us
    draft = mode == "fast" and owned and img.format == "JPEG"
    try:
        if not draft:
            # decode now, so that errors in the pixel data are not mistaken for EXIF trouble
            # (PNG's getexif() would decode the whole image anyway)
            img.load()
        orientation = _orientation(img)
        ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        rw, rh = _resized_size(ow, oh, pre)
        box = _crop_box(rw, rh, pre)
        # the crop in the oriented original's coordinates
        sx, sy = ow / rw, oh / rh
        src_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

        if draft:
            # decode at 1/2..1/8 scale, never below the resize target (Pillow picks the scale)
            req = (rw, rh) if (ow, oh) == (w, h) else (rh, rw)
            drafted = img.draft(None, req)
            if drafted is not None:
                k = drafted[1][2] / w  # drafted size / original size, same on both axes
                src_box = tuple(v * k for v in src_box)
            img.load()
        img = _to_mode(img, target)
        if orientation != 1:
            img = img.transpose(_ORIENTATION[orientation])

        if mode == "exact" and rw * rh <= _MAX_INTERMEDIATE * cw * ch:
            if img.size != (rw, rh):  # torchvision returns the image untouched when equal
                img = img.resize((rw, rh), filt)
            if box != (0, 0, rw, rh):
                img = img.crop(box)
        elif mode == "exact":
            img = img.resize((cw, ch), filt, box=src_box)
        else:
            img = img.resize((cw, ch), filt, box=src_box, reducing_gap=_REDUCING_GAP)
        pixels = np.asarray(img)
    except _Unsupported as exc:
        raise ImageDecodeError(f"{where}: {exc}") from None
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:  # Pillow reports bad data with OSError, SyntaxError, ValueError ...
        raise ImageDecodeError(f"{where}: truncated or corrupt image data ({_describe(exc)})") from None

    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pre.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    if pixels.shape != (ch, cw, channels):  # internal invariant, not user input
        raise RuntimeError(f"decode produced {pixels.shape}, expected {(ch, cw, channels)}")
    if out is not None:
        np.copyto(out, pixels)
        return out
    return np.array(pixels, order="C")  # writable, contiguous (asarray of an Image is read-only)
