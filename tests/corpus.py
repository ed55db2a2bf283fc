"""A corpus of awkward and broken image files, built from real photos (scikit-image).

``build_corpus(folder)`` writes the files and returns ``{file name: Expected}``. Used by
tests/decoding/test_decode.py (decode_image over every file) and by the end-to-end embed
test (failures must be recorded per file, good files embedded). Keep the API stable:
names may be added, existing names and Expected fields keep their meaning.

For an ``"ok"`` entry, ``reference`` is the picture the file shows, built independently of
the file (from the photo in memory: rotated, converted, quantised ...): decoding the file
must give what decoding ``reference`` gives, within ``tolerance`` (mean absolute difference
in grey levels after preprocessing; 0 for lossless formats). ``unlike`` is a picture it
must *not* decode to (the unrotated pixels of an EXIF-rotated photo, the second frame of an
animation). For ``"fail"``, ``match`` is a regex for the ImageDecodeError message.
``listed`` says whether ``list_images(folder)`` lists the name (a directory named x.jpg is
not listed; broken symlinks are, so their failure is reported).
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Expected", "build_corpus", "run_as_nobody"]


@dataclass(frozen=True)
class Expected:
    outcome: str  # "ok" or "fail"
    match: str | None = None  # fail: regex the error message must match
    reference: np.ndarray | None = None  # ok: (H, W, 3) uint8 RGB picture the file shows
    tolerance: float = 0.0  # ok: max mean |decode(file) - decode(reference)| (exact mode)
    unlike: np.ndarray | None = None  # ok: a picture the file must not decode to
    listed: bool = True  # whether list_images(folder) lists this name
    note: str = ""


def _photos() -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data

        return {
            "chelsea": data.chelsea(),  # 300 x 451
            "coffee": data.coffee(),  # 400 x 600
            "astronaut": data.astronaut(),  # 512 x 512
            "rocket": data.rocket(),  # 427 x 640
        }


def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring width x height 8-bit grey pixels, with one tiny
    IDAT: a few hundred bytes that would inflate to gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame declare width x height (LZW data: one pixel)."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b"\x3b"


def build_corpus(folder: str | os.PathLike) -> dict[str, Expected]:
    """Write the corpus into ``folder`` (created if needed); return ``{name: Expected}``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    ph = _photos()
    chelsea, coffee, astronaut, rocket = ph["chelsea"], ph["coffee"], ph["astronaut"], ph["rocket"]
    gray = np.asarray(Image.fromarray(coffee).convert("L"))
    rng = np.random.default_rng(0)
    out: dict[str, Expected] = {}

    def save(name: str, img: Image.Image, **kw) -> Path:
        p = root / name
        img.save(p, **kw)
        return p

    # --- readable, awkward -------------------------------------------------------------
    save("photo.jpg", Image.fromarray(chelsea), quality=92)
    out["photo.jpg"] = Expected("ok", reference=chelsea, tolerance=2.0, note="plain RGB JPEG")

    save("rgba.png", Image.fromarray(np.dstack([astronaut, rng.integers(0, 256, astronaut.shape[:2], dtype=np.uint8)]), "RGBA"))
    out["rgba.png"] = Expected("ok", reference=astronaut, note="alpha dropped, as timm's convert('RGB')")

    save("gray.png", Image.fromarray(gray, "L"))
    out["gray.png"] = Expected("ok", reference=_gray3(gray), note="8-bit grayscale PNG")

    save("gray.jpg", Image.fromarray(gray, "L"), quality=92)
    out["gray.jpg"] = Expected("ok", reference=_gray3(gray), tolerance=2.0, note="grayscale JPEG")

    la = Image.merge("LA", (Image.fromarray(gray, "L"), Image.fromarray(np.full_like(gray, 128))))
    save("la.png", la)
    out["la.png"] = Expected("ok", reference=_gray3(gray), note="grey + alpha")

    pal = Image.fromarray(rocket).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    save("palette_transparency.png", pal, transparency=3)
    out["palette_transparency.png"] = Expected(
        "ok", reference=np.asarray(pal.convert("RGB")), note="P with a transparent index: palette colours"
    )

    g16 = gray.astype(np.int32) * 257 + rng.integers(-100, 101, gray.shape)
    save("gray16.png", Image.fromarray(np.clip(g16, 0, 65535).astype(np.uint16)))
    out["gray16.png"] = Expected(
        "ok", reference=_gray3(gray), note="16-bit PNG scaled to 8 bits (v/257), not clipped to white"
    )

    save("cmyk.jpg", Image.fromarray(coffee).convert("CMYK"), quality=95)
    out["cmyk.jpg"] = Expected("ok", reference=coffee, tolerance=3.0, note="CMYK JPEG")

    f0 = Image.fromarray(chelsea).quantize(colors=128)
    f1 = Image.fromarray(coffee[:300, :451]).quantize(colors=128)
    save("animated.gif", f0, save_all=True, append_images=[f1], duration=100, loop=0)
    out["animated.gif"] = Expected(
        "ok", reference=np.asarray(f0.convert("RGB")), unlike=np.asarray(f1.convert("RGB")), note="first frame"
    )

    # stored rotated 90 degrees counter-clockwise; EXIF orientation 6 says "turn 90 clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = np.ascontiguousarray(np.rot90(rocket, k=1))
    save("exif_rotated.jpg", Image.fromarray(raw), quality=92, exif=exif)
    out["exif_rotated.jpg"] = Expected(
        "ok", reference=rocket, tolerance=2.0, unlike=raw, note="EXIF orientation 6 applied"
    )

    one = chelsea[150:151, 200:201]
    save("one_pixel.png", Image.fromarray(one))
    out["one_pixel.png"] = Expected("ok", reference=one, note="1x1")

    strip = np.asarray(Image.fromarray(astronaut).resize((10000, 10), Image.Resampling.BILINEAR))
    save("strip_10000x10.png", Image.fromarray(strip))
    out["strip_10000x10.png"] = Expected("ok", reference=strip, note="extreme aspect ratio 1000:1")

    save("photo.webp", Image.fromarray(coffee), lossless=True)
    out["photo.webp"] = Expected("ok", reference=coffee, note="lossless WebP")

    save("photo.bmp", Image.fromarray(chelsea))
    out["photo.bmp"] = Expected("ok", reference=chelsea, note="BMP")

    save("photo.tiff", Image.fromarray(rocket), compression="tiff_lzw")
    out["photo.tiff"] = Expected("ok", reference=rocket, note="LZW TIFF")

    save("UPPER.JPEG", Image.fromarray(astronaut), quality=92)
    out["UPPER.JPEG"] = Expected("ok", reference=astronaut, tolerance=2.0, note="upper-case extension")

    # --- broken --------------------------------------------------------------------------
    (root / "zero_bytes.jpg").write_bytes(b"")
    out["zero_bytes.jpg"] = Expected("fail", match=r"empty \(0 bytes\)")

    jpeg = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 6 // 10])
    out["truncated.jpg"] = Expected("fail", match=r"truncated")

    (root / "text.jpg").write_text("this is a text file renamed to .jpg\n")
    out["text.jpg"] = Expected("fail", match=r"text\.jpg: not an image: unrecognised content \(the first bytes match no accepted")

    (root / "bad_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    out["bad_header.png"] = Expected("fail", match=r"starts like a PNG file but its header is corrupt")

    (root / "bomb.png").write_bytes(_png_declaring(100_000, 100_000))
    out["bomb.png"] = Expected("fail", match=r"10,000,000,000 pixels.*decompression bomb.*max_pixels")

    (root / "bomb.gif").write_bytes(_gif_declaring(65_535, 65_535))
    out["bomb.gif"] = Expected("fail", match=r"4,294,836,225 pixels.*decompression bomb.*max_pixels")

    # above featurebank's default limit, below Pillow's own refusal: our check must catch it
    (root / "bomb_100mp.png").write_bytes(_png_declaring(10_000, 10_000))
    out["bomb_100mp.png"] = Expected(
        "fail", match=r"100,000,000 pixels \(10000x10000\), over the limit of 89,478,485"
    )

    (root / "folder.jpg").mkdir(exist_ok=True)
    out["folder.jpg"] = Expected("fail", match=r"is a directory", listed=False)

    unreadable = root / "unreadable.jpg"
    if unreadable.exists():  # a rebuild: make the old copy writable again
        os.chmod(unreadable, 0o644)
    save("unreadable.jpg", Image.fromarray(coffee), quality=92)
    os.chmod(unreadable, 0)
    if os.geteuid() == 0:
        # root reads mode-000 files: the file decodes (test_decode checks the denial as nobody)
        out["unreadable.jpg"] = Expected(
            "ok", reference=coffee, tolerance=2.0, note="chmod 000, but running as root bypasses it"
        )
    else:
        out["unreadable.jpg"] = Expected("fail", match=r"permission denied", note="chmod 000")

    loop = root / "loop.jpg"
    if not loop.is_symlink():
        loop.symlink_to("loop.jpg")
    out["loop.jpg"] = Expected("fail", match=r"symbolic link loop")

    broken = root / "broken_link.jpg"
    if not broken.is_symlink():
        broken.symlink_to("does_not_exist.jpg")
    out["broken_link.jpg"] = Expected("fail", match=r"broken symbolic link")
    return out


def run_as_nobody(fn) -> str:
    """Call ``fn()`` in a forked child running as uid/gid 65534 (nobody) and return
    ``"ok"`` or ``"<ExceptionType>: <message>"``. Tests run as root here, and root reads
    mode-000 files: this is the honest way to meet a real permission error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        msg = "child crashed"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                msg = "ok"
            except BaseException as exc:  # report anything to the parent
                msg = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(w, msg.encode())
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()
