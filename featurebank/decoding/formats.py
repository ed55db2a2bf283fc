"""The image formats featurebank accepts, and what a file's first bytes claim it is.

Accepted formats: :data:`ACCEPTED_FORMATS` (Pillow format names) and their file name
endings :data:`IMAGE_EXTENSIONS` are the one list featurebank uses everywhere: folder walks
pick files by these endings, and the decoder (files, and bytes sent to the service) opens
only these formats, so what ``embed`` picks up and what the service accepts are the same.
The list is the raster picture formats the *installed* Pillow decodes completely: JPEG (and
MPO, multi-picture JPEG from cameras), PNG, WebP, AVIF, GIF, BMP/DIB, TIFF, JPEG 2000, ICO,
PPM/PGM/PBM and TGA, each kept only when Pillow was built with its codec (``features.check``).
Left out on purpose although Pillow registers them: layered documents (PSD: Pillow reads the
merged image only, and not every bit depth), formats that need an outside program or have no decoder in Pillow
(EPS, WMF, BUFR, GRIB, HDF5, MPEG), and specialised containers whose pixels are not photos
(FITS, DDS, ICNS, CUR, fonts and brushes, ...). Reasons for refusals never quote the file's
bytes.

:func:`claimed_format` names the format a file's first bytes claim (accepted or not), so that
a refusal can tell "a broken PNG" from "a PDF" from "not an image at all".
"""

from __future__ import annotations

from PIL import Image, features

__all__ = ["ACCEPTED_FORMATS", "IMAGE_EXTENSIONS", "claimed_format"]


def _accepted_formats() -> tuple[str, ...]:
    # Pillow format name -> the codec or module it needs (None: pure Python in Pillow)
    wanted = {
        "JPEG": "jpg", "MPO": "jpg", "PNG": "zlib", "WEBP": "webp", "AVIF": "avif", "GIF": None,
        "BMP": None, "DIB": None, "TIFF": None, "JPEG2000": "jpg_2000", "ICO": None, "PPM": None, "TGA": None,
    }
    Image.init()
    # MPO has no opener of its own: the JPEG plugin opens it
    opens = set(Image.OPEN) | ({"MPO"} if "JPEG" in Image.OPEN else set())
    return tuple(f for f, need in wanted.items() if f in opens and (need is None or features.check(need)))


#: Pillow format names featurebank decodes (see the module docstring), computed at import
#: from what the installed Pillow can decode.
ACCEPTED_FORMATS: tuple[str, ...] = _accepted_formats()

#: What ``Image.open(formats=...)`` is given: the accepted names with an opener of their own
#: (MPO is opened by the JPEG plugin).
OPENERS = tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)

#: File name endings of :data:`ACCEPTED_FORMATS` (lower case, with the dot), as Pillow
#: registers them; folder walks pick image files by these.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(
    sorted(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS)
)

# magic numbers, to tell "broken PNG" from "not an image at all" and to name formats that are
# not accepted; Pillow format names. (offset, bytes, format)
_SIGNATURES = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"RIFF", "WEBP"),  # and "WEBP" at offset 8, checked below
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypavis", "AVIF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG2000"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    *((0, b"P%d" % d, "PPM") for d in range(1, 7)),
    # not accepted: named in the refusal so the user knows what the file is
    (0, b"8BPS", "PSD"),
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "EPS"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
)


def claimed_format(head: bytes) -> str | None:
    """The Pillow format name a file's first 16 bytes claim (accepted or not), or None."""
    for offset, sig, kind in _SIGNATURES:
        if head[offset : offset + len(sig)] == sig:
            if kind == "WEBP" and head[8:12] != b"WEBP":
                return None
            return kind
    return None
