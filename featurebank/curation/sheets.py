"""Pictures a person scans: contact sheets of suspects or picks (PNG or a self-contained HTML
page), each tile a thumbnail with its caption lines (given label, suggested label, why).

Thumbnails are :func:`featurebank.decoding.decode.thumbnail` (the one checked opener):
a file that can no longer be read gets a grey tile that says so, it never stops the sheet.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["thumbnail", "thumbnail_data_uri", "write_contact_sheet", "SHEET_FORMATS"]

SHEET_FORMATS = (".png", ".html")


def thumbnail(path: str, size: int = 128):
    """An RGB PIL image whose longest side is ``size`` (None when the file cannot be read or is
    over the decoder's default pixel limit): :func:`featurebank.decoding.decode.thumbnail`."""
    from PIL import Image

    from featurebank.decoding.decode import thumbnail as decode_thumbnail
    from featurebank.errors import ImageTooLargeError

    try:
        return decode_thumbnail(path, size)
    except (ImageTooLargeError, OSError, ValueError, Image.DecompressionBombError):
        return None


def thumbnail_data_uri(path: str, size: int = 96) -> str | None:
    """``data:image/jpeg;base64,...`` of the thumbnail of ``path`` (None when unreadable)."""
    img = thumbnail(path, size)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _check_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SHEET_FORMATS:
        raise ValueError(f"a contact sheet is written as .png or .html; got {str(path)!r}")
    return suffix


def write_contact_sheet(tiles: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "",
                        columns: int = 8, size: int = 128) -> Path:
    """Write a contact sheet of ``tiles`` to ``path`` (``.png`` or ``.html``, by its suffix).

    tiles : dicts with ``path`` (the image file) and ``lines`` (caption lines, first one bold
        in HTML); an optional ``colour`` (CSS / PIL colour name) marks the tile's border.
    Written to a temporary file in the same folder, then renamed into place.
    """
    from featurebank._atomic import write_bytes_atomic

    out = Path(path)
    suffix = _check_format(out)
    if suffix == ".html":
        data = _html_sheet(tiles, title, size).encode("utf-8")
    else:
        data = _png_sheet(tiles, title, columns, size)
    write_bytes_atomic(out, data)
    return out


def _png_sheet(tiles: Sequence[dict[str, Any]], title: str, columns: int, size: int) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    big = ImageFont.load_default(size=15)
    n_lines = max((len(t.get("lines", ())) for t in tiles), default=0)
    pad, line_h, head = 6, 13, (28 if title else 4)
    cols = max(1, min(columns, len(tiles) or 1))
    rows = (len(tiles) + cols - 1) // cols
    tile_w, tile_h = size + 2 * pad, size + 2 * pad + n_lines * line_h
    sheet = Image.new("RGB", (cols * tile_w, head + max(rows, 1) * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 6), title, fill="black", font=big)
    for n, tile in enumerate(tiles):
        x0, y0 = (n % cols) * tile_w, head + (n // cols) * tile_h
        img = thumbnail(str(tile["path"]), size)
        if img is None:
            draw.rectangle((x0 + pad, y0 + pad, x0 + pad + size, y0 + pad + size), fill="#cccccc")
            draw.text((x0 + pad + 4, y0 + pad + size // 2), "unreadable", fill="black", font=font)
        else:
            if img.size[0] < size // 2 and img.size[1] < size // 2:  # tiny images (28x28) are shown larger
                s = size / max(img.size)
                img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))),
                                 Image.Resampling.NEAREST)
            sheet.paste(img, (x0 + pad + (size - img.size[0]) // 2, y0 + pad + (size - img.size[1]) // 2))
        if tile.get("colour"):
            draw.rectangle((x0 + 2, y0 + 2, x0 + tile_w - 3, y0 + pad + size + 3), outline=tile["colour"], width=3)
        for j, text in enumerate(tile.get("lines", ())):
            text = str(text)
            while len(text) > 4 and draw.textlength(text, font=font) > tile_w - 4:
                text = text[:-2]
            draw.text((x0 + pad, y0 + 2 * pad + size + j * line_h), text, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _html_sheet(tiles: Sequence[dict[str, Any]], title: str, size: int) -> str:
    esc = html.escape
    parts = []
    for tile in tiles:
        uri = thumbnail_data_uri(str(tile["path"]), size)
        img = (f'<img src="{uri}" alt="" style="max-width:{size}px;max-height:{size}px">' if uri
               else '<div class="missing">unreadable</div>')
        lines = [str(x) for x in tile.get("lines", ())]
        caption = "".join(('<div class="first">' if j == 0 else "<div>") + esc(t) + "</div>"
                          for j, t in enumerate(lines))
        border = f' style="border-color:{esc(str(tile["colour"]))}"' if tile.get("colour") else ""
        parts.append(f'<figure class="tile"{border} title="{esc(str(tile["path"]))}">'
                     f'<div class="thumb" style="width:{size}px;height:{size}px">{img}</div>'
                     f"<figcaption>{caption}</figcaption></figure>")
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\">"
        f"<title>{esc(title or 'featurebank contact sheet')}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:16px}figure.tile{display:inline-block;vertical-align:top;"
        "margin:4px;padding:4px;border:3px solid #ddd;border-radius:4px;font-size:12px}"
        ".thumb{display:flex;align-items:center;justify-content:center;background:#f4f4f4}"
        ".thumb img{image-rendering:auto;width:100%;height:100%;object-fit:contain}"
        f"figcaption{{max-width:{size}px;overflow-wrap:anywhere}}.first{{font-weight:600}}"
        ".missing{color:#555}</style></head><body>"
        f"<h1 style=\"font-size:18px\">{esc(title)}</h1>{''.join(parts)}</body></html>\n"
    )
