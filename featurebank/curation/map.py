"""A 2-D map of vectors: PCA (scikit-learn) by default, UMAP where ``umap-learn`` is installed
(``pip install 'featurebank[umap]'``), each fitted on a seeded sample of at most ``fit_size``
vectors and applied to all of them, so a large set costs one transform, not one fit.

:func:`write_map` draws it as a PNG (matplotlib, one colour per label) or an HTML page (SVG
points coloured by label; hovering a point shows its thumbnail, label and file name).
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["MAP_METHODS", "MAP_FORMATS", "check_map_method", "project_2d", "write_map"]

MAP_METHODS = ("pca", "umap")
MAP_FORMATS = (".png", ".html")


def check_map_method(method: str) -> str:
    """``method`` if it can run here; ValueError naming the missing package otherwise
    (called before any vector is loaded)."""
    if method not in MAP_METHODS:
        raise ValueError(f"method must be one of {', '.join(MAP_METHODS)}; got {method!r}")
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise ValueError("--method umap needs umap-learn, which is not installed; pip install 'featurebank[umap]' "
                         "(or use --method pca)")
    return method


def check_map_output(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in MAP_FORMATS:
        raise ValueError(f"the map is written as .png or .html; got -o {str(path)!r}")
    return out


def project_2d(X: np.ndarray, *, method: str = "pca", fit_size: int = 5000, random_state: int = 0) -> np.ndarray:
    """(n_samples, 2) float32 coordinates of ``X`` (L2-normalised first, so that the map
    shows the cosine geometry the store's searches use)."""
    check_map_method(method)
    X = np.asarray(X, dtype=np.float32)
    if len(X) < 3:
        raise ValueError(f"a map needs at least 3 images; got {len(X)}")
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(random_state)
    fit = Xn if len(Xn) <= fit_size else Xn[rng.choice(len(Xn), fit_size, replace=False)]
    if method == "pca":
        from sklearn.decomposition import PCA

        model = PCA(n_components=2, random_state=random_state).fit(fit)
    else:
        import umap

        model = umap.UMAP(n_components=2, metric="cosine", random_state=random_state,
                          n_neighbors=min(15, len(fit) - 1)).fit(fit)
    return np.asarray(model.transform(Xn), dtype=np.float32)


def _display_names(paths: Sequence[str]) -> list[str]:
    try:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:
        root = None
    return [os.path.relpath(os.path.abspath(p), root) if root else os.path.basename(p) for p in paths]


def _colours(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def write_map(coords: np.ndarray, labels: Sequence[Any], paths: Sequence[str], path: str | os.PathLike[str], *,
              title: str = "", max_thumbnails: int = 5000, random_state: int = 0) -> Path:
    """Write the map to ``path``: ``.png`` or ``.html`` (by the suffix); atomically.

    labels : one per point (None: "unlabelled"). In HTML at most ``max_thumbnails`` points
    (a seeded sample) carry a thumbnail; the others show their name and label on hover.
    """
    from featurebank._atomic import write_bytes_atomic

    out = check_map_output(path)
    names = ["unlabelled" if v is None else str(v) for v in labels]
    classes = sorted(set(names))
    colour = dict(zip(classes, _colours(len(classes))))
    if out.suffix.lower() == ".png":
        data = _png(coords, names, classes, colour, title)
    else:
        data = _html(coords, names, classes, colour, list(paths), title, max_thumbnails, random_state).encode("utf-8")
    write_bytes_atomic(out, data)
    return out


def _png(coords: np.ndarray, names: list[str], classes: list[str], colour: dict[str, str], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 7), dpi=110)
    names_a = np.asarray(names)
    size = 4 if len(names) > 2000 else 14
    for c in classes:
        m = names_a == c
        ax.scatter(coords[m, 0], coords[m, 1], s=size, c=colour[c], label=f"{c} ({int(m.sum())})", alpha=0.7,
                   linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{len(names)} images")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2.5 if size < 10 else 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html(coords, names, classes, colour, paths, title, max_thumbnails, random_state) -> str:
    from featurebank.curation.sheets import thumbnail_data_uri

    n = len(names)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    xy = (coords - lo) / span * 760 + 20
    with_thumb = set(range(n)) if n <= max_thumbnails else set(
        np.random.default_rng(random_state).choice(n, max_thumbnails, replace=False).tolist())
    shown = _display_names(paths)
    thumbs = {i: thumbnail_data_uri(paths[i], 96) for i in sorted(with_thumb)}
    points = [[round(float(xy[i, 0]), 1), round(float(780 - xy[i, 1] + 20), 1), classes.index(names[i]), shown[i],
               thumbs.get(i)] for i in range(n)]
    legend = "".join(f'<li><span style="background:{colour[c]}"></span>{html.escape(c)} '
                     f'({names.count(c)})</li>' for c in classes)
    data = json.dumps({"points": points, "colours": [colour[c] for c in classes], "classes": classes})
    data = data.replace("</", "<\\/")  # no file name can close the script element
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title or 'featurebank map')}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:16px;display:flex;gap:16px}"
        "#map{border:1px solid #ccc;background:#fff}#side{width:260px}ul{list-style:none;padding:0}"
        "li span{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:5px}"
        "#tip img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#f4f4f4}"
        "circle:hover{stroke:#000;stroke-width:2}</style></head><body>"
        f"<svg id=\"map\" width=\"800\" height=\"800\" viewBox=\"0 0 800 800\"></svg>"
        f"<div id=\"side\"><h1 style=\"font-size:18px\">{html.escape(title or 'featurebank map')}</h1>"
        f"<p>{n} images; hover a point</p><div id=\"tip\"></div><ul>{legend}</ul></div>"
        f"<script id=\"data\" type=\"application/json\">{data}</script><script>"
        "const D=JSON.parse(document.getElementById('data').textContent);"
        "const svg=document.getElementById('map'),tip=document.getElementById('tip');"
        "const NS='http://www.w3.org/2000/svg';const r=D.points.length>2000?2.5:4;"
        "D.points.forEach((p,i)=>{const c=document.createElementNS(NS,'circle');"
        "c.setAttribute('cx',p[0]);c.setAttribute('cy',p[1]);c.setAttribute('r',r);"
        "c.setAttribute('fill',D.colours[p[2]]);c.setAttribute('fill-opacity','0.75');c.dataset.i=i;"
        "svg.appendChild(c);});"
        "svg.addEventListener('mouseover',e=>{const i=e.target.dataset&&e.target.dataset.i;if(i===undefined)return;"
        "const p=D.points[i];tip.textContent='';if(p[4]){const im=document.createElement('img');im.src=p[4];"
        "tip.appendChild(im);}const b=document.createElement('div');b.style.fontWeight='600';"
        "b.textContent=D.classes[p[2]];const s=document.createElement('div');s.textContent=p[3];"
        "tip.appendChild(b);tip.appendChild(s);});"
        "</script></body></html>\n"
    )
