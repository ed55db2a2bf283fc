"""Opening image files (open_image_file), the one list of accepted formats, and what the
embedder does with special files, foreign formats and files whose bytes must not leak.

Everything runs on real files: real photos written in each format, a real FIFO, real links
to /dev/zero and /proc/self/environ, a real sparse file, a real onnxruntime session and store.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import warnings

import numpy as np
import pytest
from PIL import Image, features

from featurebank.artifact import Preprocessing
from featurebank.distributed.locations import list_sources
from featurebank.decoding import ACCEPTED_FORMATS, IMAGE_EXTENSIONS, decode_image
from featurebank._files import MAX_FILE_BYTES, open_image_file
from featurebank.embed_into_store import embed_images
from featurebank.embedder.sources import ImageList, list_images
from featurebank.errors import ImageDecodeError
from featurebank.store import open_store

PRE = Preprocessing(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)
SECRET = "hunter2-SECRET-TOKEN"


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) if the body blocks longer than ``seconds``."""

    def fire(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def special_files(folder) -> dict[str, str]:
    """A FIFO, a link to /dev/zero and a link to /proc/self/environ, all named like images;
    name -> the start of the reason each must get."""
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink("/proc/self/environ", folder / "environ.jpg")
    return {
        "fifo.jpg": "not a regular file (a pipe, socket or device)",
        "zero.jpg": "not a regular file (a pipe, socket or device)",
        "environ.jpg": "not a regular image file (a virtual file, e.g. in /proc or /sys",
    }


# --- open_image_file ---------------------------------------------------------------------------


def test_open_refuses_special_files_without_blocking(tmp_path, photo_dir):
    expected = special_files(tmp_path)
    for name, reason in expected.items():
        exact = "^" + re.escape(f"{tmp_path / name}: {reason}")
        with deadline(10), pytest.raises(ImageDecodeError, match=exact):
            open_image_file(tmp_path / name)
        with deadline(10), pytest.raises(ImageDecodeError, match=exact):
            decode_image(tmp_path / name, PRE)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.jpg: file is empty \(0 bytes\)$"):
        open_image_file(tmp_path / "empty.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match=r"dir\.jpg: is a directory, not an image file$"):
        open_image_file(tmp_path / "dir.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg: broken symbolic link"):
        open_image_file(tmp_path / "broken.jpg")
    # a sparse file one byte over the cap: refused from its size, nothing read
    with open(tmp_path / "huge.tif", "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageDecodeError, match=r"huge\.tif: file is 2,147,483,649 bytes, over the limit of "
                                               r"2,147,483,648 for an image file$"):
        open_image_file(tmp_path / "huge.tif")
    # a link to a real image is followed; the file object reads from the start
    os.symlink(photo_dir / "chelsea.jpg", tmp_path / "link.jpg")
    with open_image_file(tmp_path / "link.jpg") as fh:
        assert fh.read() == (photo_dir / "chelsea.jpg").read_bytes()


# --- one list of formats -----------------------------------------------------------------------


def test_accepted_formats_are_what_pillow_decodes_here():
    Image.init()
    assert set(ACCEPTED_FORMATS) <= set(Image.OPEN) | {"MPO"}
    assert {"JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "ICO"} <= set(ACCEPTED_FORMATS)
    assert ("AVIF" in ACCEPTED_FORMATS) == features.check("avif")
    assert ("JPEG2000" in ACCEPTED_FORMATS) == features.check("jpg_2000")
    assert "PSD" not in ACCEPTED_FORMATS and "EPS" not in ACCEPTED_FORMATS
    ext = Image.registered_extensions()
    assert set(IMAGE_EXTENSIONS) == {e for e, f in ext.items() if f in ACCEPTED_FORMATS}
    assert {".jpg", ".jpeg", ".png", ".avif", ".jp2", ".j2k", ".ico", ".mpo", ".tif", ".webp"} <= set(IMAGE_EXTENSIONS)


def formats_folder(root, photos) -> dict[str, float]:
    """Real photos in AVIF, JPEG 2000 and ICO (+ a JPEG), and files that are not accepted:
    two .txt, a .psd-named file, a real PCX (Pillow reads PCX, featurebank does not), a hidden
    file. Returns image name -> tolerated mean difference from the photo's own decoding."""
    root.mkdir()
    chelsea, astronaut = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["astronaut"])
    chelsea.save(root / "cat.jpg", quality=95)
    chelsea.save(root / "cat.jp2")  # lossless by default
    astronaut.save(root / "astronaut.ico")  # largest frame 256x256
    tol = {"cat.jpg": 2.0, "cat.jp2": 0.0, "astronaut.ico": 12.0}
    if features.check("avif"):
        chelsea.save(root / "cat.avif", quality=90)
        tol["cat.avif"] = 4.0
    (root / "notes.txt").write_text("hello")
    (root / "labels.txt").write_text("cat")
    (root / "layered.psd").write_bytes(b"8BPS\x00\x01" + bytes(64))
    chelsea.save(root / "cat.pcx")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return tol


def test_folder_walk_takes_every_accepted_format_and_counts_the_rest(tmp_path, photos):
    tol = formats_folder(tmp_path / "mixed", photos)
    images = list_images(tmp_path / "mixed")
    assert sorted(os.path.basename(p) for p in images.paths) == sorted(tol)
    assert images.skipped == {".txt": 2, ".pcx": 1, ".psd": 1}
    assert images.skipped_summary() == (
        "skipped 4 files that are not in an accepted image format, by extension: .txt 2, .pcx 1, .psd 1"
    )
    assert ImageList(paths=[], labels=[], skipped={"": 1}).skipped_summary() == (
        "skipped 1 file that is not in an accepted image format, by extension: (no extension) 1"
    )
    # the distributed listing (local paths) agrees and keeps the counts
    assert list_sources([tmp_path / "mixed"]).skipped == images.skipped
    reference = decode_image(photos["chelsea"], PRE).astype(np.int16)
    for name, t in tol.items():
        got = decode_image(tmp_path / "mixed" / name, PRE)
        same_bytes = decode_image((tmp_path / "mixed" / name).read_bytes(), PRE)  # what the service decodes
        np.testing.assert_array_equal(got, same_bytes)
        if name != "astronaut.ico":
            assert float(np.abs(got - reference).mean()) <= t, name
    ico = decode_image(tmp_path / "mixed" / "astronaut.ico", PRE).astype(np.int16)
    assert float(np.abs(ico - decode_image(photos["astronaut"], PRE)).mean()) <= tol["astronaut.ico"]


def test_decoder_refuses_what_the_folder_walk_skips(tmp_path, photos):
    formats_folder(tmp_path / "mixed", photos)
    pcx = (tmp_path / "mixed" / "cat.pcx").read_bytes()
    with Image.open(io.BytesIO(pcx)) as img:
        assert img.format == "PCX"  # Pillow itself reads it
    with pytest.raises(ImageDecodeError, match=r"^bytes: not an image: unrecognised content \(the first bytes match no "
                                               r"accepted image format: JPEG, "):
        decode_image(pcx, PRE)
    (tmp_path / "renamed.jpg").write_bytes(pcx)
    with pytest.raises(ImageDecodeError, match=r"renamed\.jpg: not an image: unrecognised content"):
        decode_image(tmp_path / "renamed.jpg", PRE)
    with pytest.raises(ImageDecodeError, match=r"^bytes: a PSD file, not an accepted image format \(accepted: JPEG, "):
        decode_image((tmp_path / "mixed" / "layered.psd").read_bytes(), PRE)


def test_embed_takes_avif_jpeg2000_ico_and_says_what_it_skipped(tmp_path, photos, tiny_model, capsys):
    from featurebank.cli import main

    tol = formats_folder(tmp_path / "mixed", photos)
    emb = embed_images(tmp_path / "mixed", tiny_model, progress=False)
    assert emb.ok.all() and sorted(os.path.basename(p) for p in emb.paths) == sorted(tol)
    code = main(["embed", str(tmp_path / "mixed"), "--store", str(tmp_path / "store"), "--model", str(tiny_model),
                 "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "skipped 4 files that are not in an accepted image format, by extension: .txt 2, .pcx 1, .psd 1\n" in out.err
    assert out.out.startswith(f"{len(tol)} images: {len(tol)} embedded, 0 from cache, 0 failed")


# --- warnings and reasons ---------------------------------------------------------------------


def test_a_refused_large_image_shows_only_our_refusal(tmp_path, recwarn):
    # a real PNG of 10000 x 10000 pixels: over the default limit (and Pillow's warning threshold),
    # under Pillow's own hard limit, so Pillow would warn before we refuse
    path = tmp_path / "large.png"
    Image.new("1", (10_000, 10_000)).save(path)
    warnings.simplefilter("always")
    with pytest.raises(ImageDecodeError, match=r"large\.png: image has 100,000,000 pixels \(10000x10000\), over the "
                                               r"limit of 89,478,485 \(possible decompression bomb\)"):
        decode_image(path, PRE)
    with pytest.raises(ImageDecodeError, match=r"^bytes: image has 100,000,000 pixels"):
        decode_image(path.read_bytes(), PRE)
    assert [str(w.message) for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)] == []
    # the warning filters are as they were (catch_warnings restored them)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()


def test_reasons_never_quote_the_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(f"root:x:0:0:{SECRET}\n")
    os.symlink(secret, tmp_path / "passwd.jpg")
    # headers Pillow parses before failing put file bytes in their messages
    (tmp_path / "ppm.ppm").write_bytes(b"P6 " + SECRET.encode() * 10 + b"\n")
    (tmp_path / "chunk.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d" + b"hunt" + bytes(64))
    reasons = []
    for name in ("passwd.jpg", "ppm.ppm", "chunk.png"):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(tmp_path / name, PRE)
        reasons.append(str(info.value))
    with pytest.raises(ImageDecodeError) as info:
        decode_image(secret.read_bytes(), PRE)
    reasons.append(str(info.value))
    assert reasons[0].endswith("passwd.jpg: not an image: unrecognised content (the first bytes match no accepted "
                               f"image format: {', '.join(ACCEPTED_FORMATS)})")
    assert reasons[1] == (f"{tmp_path / 'ppm.ppm'}: starts like a PPM file but its header is corrupt or cut short "
                          "(ValueError: Token too long in file header)")
    assert reasons[2] == f"{tmp_path / 'chunk.png'}: starts like a PNG file but its header is corrupt or cut short"
    for r in reasons:
        assert SECRET not in r and "root:x" not in r and "hunt" not in r, r


def test_store_failures_hold_reasons_not_contents(tmp_path, photo_dir, tiny_model):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        os.symlink(photo_dir / name, src / name)
    (tmp_path / "secret.txt").write_text(f"root:x:0:0:{SECRET}\n")
    os.symlink(tmp_path / "secret.txt", src / "passwd.jpg")
    expected = special_files(src)
    with deadline(120):
        emb = embed_images(src, tiny_model, store=tmp_path / "store", progress=False)
    assert emb.report.embedded == 2 and emb.report.failed == 4
    rows = {os.path.basename(f.path): f.reason for f in open_store(tmp_path / "store").failures()}
    assert set(rows) == {"passwd.jpg", *expected}
    assert rows["passwd.jpg"].endswith("passwd.jpg: not an image: unrecognised content (the first bytes match no "
                                       f"accepted image format: {', '.join(ACCEPTED_FORMATS)})")
    # the store's own stat pass words it "is not a regular file"; the virtual file gets past
    # that stat (procfs says "regular, 0 bytes") and is refused by open_image_file
    assert rows["fifo.jpg"] == rows["zero.jpg"] == "is not a regular file"
    assert rows["environ.jpg"] == f"{src / 'environ.jpg'}: {expected['environ.jpg']}, whose size is not known in advance)"
    assert not [r for r in rows.values() if SECRET in r or "root:x" in r]


def test_embedding_without_a_store_does_not_hang_on_special_files(tmp_path, photo_dir, tiny_model):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(photo_dir / "chelsea.jpg", src / "chelsea.jpg")
    expected = special_files(src)
    with deadline(120):
        emb = embed_images(src, tiny_model, progress=False)  # store-less: hashes files itself
    assert emb.report.embedded == 1 and emb.ok.tolist() == [p.endswith("chelsea.jpg") for p in emb.paths]
    reasons = dict(emb.report.failures)
    for name, reason in expected.items():
        assert reasons[str(src / name)].startswith(f"{src / name}: {reason}")
