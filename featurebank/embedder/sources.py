"""Input listing: which image files to embed, and their labels.

:func:`list_images` accepts

* a **folder**, walked recursively. Immediate subfolders of the root are classes, as in
  torchvision's ``ImageFolder`` (``root/cat/x.jpg`` has label ``"cat"``, and so has
  ``root/cat/more/y.jpg``); images directly in the root have label ``None``. Files are
  picked by extension (:data:`IMAGE_EXTENSIONS`: the endings of the formats the decoder
  accepts, :data:`~featurebank.decoding.ACCEPTED_FORMATS`; case-insensitive). Other
  files are skipped and counted by extension in :attr:`ImageList.skipped` (``embed`` prints
  "skipped 3 files ...: .txt 2, .psd 1"), so no file disappears without a word. Names
  starting with a dot are skipped without being counted (``.DS_Store``, macOS ``._x.jpg``
  resource forks, ``.ipynb_checkpoints``: system files, never pictures someone put there). Symbolic links are followed,
  but a link back to a folder already on the current path (a loop) is not entered again.
  A symlink named ``x.jpg`` that is broken or loops *is* listed: the decoder then reports
  why that file fails, so no input disappears silently.
* a **.txt** list: one path per line, blank lines and lines starting with ``#`` ignored;
* a **.csv** with a header holding ``path`` and optionally ``label`` (other columns ignored);
* a **.parquet** file with a ``path`` column and optionally ``label``;
* a single image file;
* a list or tuple of any of these, concatenated in order.

Relative paths in list files are resolved against the folder of the list file. Listed
files are not opened or checked here (that would cost a stat per file on slow disks); the
decoder reports missing or broken ones. Order is deterministic: folders sorted by path
components, list files in file order.
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

from featurebank.decoding import ACCEPTED_FORMATS, IMAGE_EXTENSIONS
from featurebank.errors import ImageSourceError

__all__ = ["IMAGE_EXTENSIONS", "LIST_FORMATS", "ImageList", "list_images"]

LIST_FORMATS = (".txt", ".csv", ".parquet")

Source = Union[str, "os.PathLike[str]"]


@dataclass
class ImageList:
    """Image paths with their labels.

    Attributes
    ----------
    paths : list of str, absolute (normalised, symlinks not resolved)
    labels : list of str or None, one per path (``None``: no label)
    classes : sorted distinct labels (``None`` excluded)
    roots : one absolute folder per source: the walked folder, or the folder a list file's
        relative paths are resolved against
    skipped : ``{extension: count}`` of the files folder walks left out because their name
        does not end in an accepted image extension (``""`` for names without one); most
        frequent first
    """

    paths: list[str]
    labels: list[str | None]
    classes: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"paths and labels differ in length ({len(self.paths)} != {len(self.labels)})")
        if not self.classes:
            self.classes = sorted({lab for lab in self.labels if lab is not None})

    def __len__(self) -> int:
        return len(self.paths)

    def skipped_summary(self) -> str:
        """One line saying which files folder walks skipped, e.g. ``"skipped 3 files that are
        not in an accepted image format, by extension: .txt 2, .psd 1"``; ``""`` if none."""
        if not self.skipped:
            return ""
        n = sum(self.skipped.values())
        counts = ", ".join(f"{ext or '(no extension)'} {c}" for ext, c in self.skipped.items())
        files, verb = ("files", "are") if n != 1 else ("file", "is")
        return f"skipped {n} {files} that {verb} not in an accepted image format, by extension: {counts}"

    @property
    def class_to_idx(self) -> dict[str, int]:
        """``{class: index}`` in sorted order, as torchvision's ``ImageFolder.class_to_idx``."""
        return {c: i for i, c in enumerate(self.classes)}


def list_images(
    source: Source | Sequence[Source],
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> ImageList:
    """List the images of one source or several.

    Parameters
    ----------
    source : folder, ``.txt`` / ``.csv`` / ``.parquet`` list, image file, or a list of these.
    extensions : file name endings that count as images in folders (case-insensitive).

    Returns
    -------
    :class:`ImageList`

    Raises
    ------
    ImageSourceError
        missing source, unknown list format, CSV/parquet without a ``path`` column, empty
        path cell, unreadable folder, or a source that yields no image.

    Example
    -------
    >>> images = list_images("photos/")          # doctest: +SKIP
    >>> images.paths[0], images.labels[0]        # doctest: +SKIP
    ('/data/photos/cat/001.jpg', 'cat')
    """
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise ValueError("extensions must name at least one file ending, e.g. ('.jpg',)")
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise ImageSourceError("no image source given; pass a folder or a .txt/.csv/.parquet list")
    paths: list[str] = []
    labels: list[str | None] = []
    roots: list[str] = []
    skipped: dict[str, int] = {}
    for src in sources:
        if not isinstance(src, (str, os.PathLike)):
            raise TypeError(f"an image source must be a path; got {type(src).__name__}")
        p, lab, root = _list_one(os.fspath(src), exts, skipped)
        paths += p
        labels += lab
        roots.append(root)
    return ImageList(paths=paths, labels=labels, roots=roots, skipped=sort_skipped(skipped))


def sort_skipped(skipped: dict[str, int]) -> dict[str, int]:
    """``{extension: count}`` most frequent first, then by extension."""
    return dict(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def skipped_extension(name: str) -> str:
    """The key a skipped file is counted under: its extension, lower case ("" if none)."""
    return os.path.splitext(name)[1].lower()


def _list_one(src: str, exts: tuple[str, ...], skipped: dict[str, int]) -> tuple[list[str], list[str | None], str]:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise ImageSourceError(f"image source {src!r} does not exist; pass a folder or a .txt/.csv/.parquet list") from None
    except OSError as exc:
        raise ImageSourceError(f"cannot read image source {src!r}: {exc.strerror or exc}") from None
    path = os.path.abspath(src)
    if stat.S_ISDIR(st.st_mode):
        here: dict[str, int] = {}
        p, lab = _walk_folder(path, exts, here)
        if not p:
            others = ", ".join(e or "(no extension)" for e in sort_skipped(here))
            seen = f"; skipped {sum(here.values())} other files ({others})" if here else ""
            wanted = (f"the file endings of {', '.join(ACCEPTED_FORMATS)}" if exts == IMAGE_EXTENSIONS
                      else ", ".join(exts))
            raise ImageSourceError(f"found no images under {src!r} (looked for {wanted}, case-insensitive{seen})")
        for ext, c in here.items():
            skipped[ext] = skipped.get(ext, 0) + c
        return p, lab, path
    suffix = os.path.splitext(path)[1].lower()
    base = os.path.dirname(path)
    if suffix in exts:
        return [path], [None], base
    if suffix == ".txt":
        p, lab = _read_txt(path)
    elif suffix == ".csv":
        p, lab = _read_csv(path)
    elif suffix == ".parquet":
        p, lab = _read_parquet(path)
    else:
        raise ImageSourceError(
            f"unknown image list format {suffix or '(no extension)'!r} for {src!r}; "
            f"use a folder, an image file (ending in an accepted image extension, see "
            f"featurebank.decoding.IMAGE_EXTENSIONS), or a list ending in {', '.join(LIST_FORMATS)}"
        )
    if not p:
        raise ImageSourceError(f"image list {src!r} lists no images")
    return [_resolve(base, x) for x in p], lab, base


def _resolve(base: str, p: str) -> str:
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))


def _walk_folder(root: str, exts: tuple[str, ...], skipped: dict[str, int]) -> tuple[list[str], list[str | None]]:
    found: list[tuple[tuple[str, ...], str, str | None]] = []
    root_st = os.stat(root)
    # iterative DFS; each stack entry carries the (dev, inode) of the folders above it, so a
    # link back to an ancestor (a loop) is seen and not entered, while a folder linked from
    # two unrelated places is still listed under both, as torchvision's ImageFolder does.
    stack: list[tuple[str, tuple[str, ...], frozenset]] = [(root, (), frozenset({(root_st.st_dev, root_st.st_ino)}))]
    while stack:
        folder, parts, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            raise ImageSourceError(
                f"cannot list folder {folder!r}: {exc.strerror or exc}; fix its permissions or leave it out"
            ) from None
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:  # a symlink loop or unreadable link: not a folder to walk
                is_dir = False
            if is_dir:
                try:
                    st = entry.stat()
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    continue
                stack.append((entry.path, parts + (name,), ancestors | {key}))
            elif name.lower().endswith(exts):
                rel = parts + (name,)
                label = parts[0] if parts else None
                found.append((rel, entry.path, label))
            else:
                ext = skipped_extension(name)
                skipped[ext] = skipped.get(ext, 0) + 1
    found.sort(key=lambda t: t[0])
    return [os.path.normpath(p) for _, p, _ in found], [lab for _, _, lab in found]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ImageSourceError(f"image list {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ImageSourceError(f"cannot read image list {path!r}: {exc.strerror or exc}") from None


def _read_txt(path: str) -> tuple[list[str], list[str | None]]:
    paths = []
    for line in _read_text(path).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(line)
    return paths, [None] * len(paths)


def _read_csv(path: str) -> tuple[list[str], list[str | None]]:
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path)))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "path" not in columns:
        raise ImageSourceError(
            f"CSV {path!r} has no 'path' column (header: {', '.join(columns) or 'none'}); "
            "its first line must name the columns, e.g. 'path,label'"
        )
    reader.fieldnames = columns
    has_label = "label" in columns
    paths: list[str] = []
    labels: list[str | None] = []
    for row in reader:
        p = (row.get("path") or "").strip()
        if not p:
            raise ImageSourceError(f"CSV {path!r} line {reader.line_num}: empty 'path' cell")
        paths.append(p)
        lab = (row.get("label") or "").strip() if has_label else ""
        labels.append(lab or None)
    return paths, labels


def _read_parquet(path: str) -> tuple[list[str], list[str | None]]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise ImageSourceError(f"{path!r} is not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if "path" not in names:
        raise ImageSourceError(
            f"parquet {path!r} has no 'path' column (columns: {', '.join(names) or 'none'}); add one"
        )
    columns = ["path"] + (["label"] if "label" in names else [])
    table = pq.read_table(path, columns=columns)
    raw_paths = table.column("path").to_pylist()
    raw_labels = table.column("label").to_pylist() if "label" in columns else [None] * len(raw_paths)
    paths: list[str] = []
    for i, p in enumerate(raw_paths):
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if p is None or not str(p).strip():
            raise ImageSourceError(f"parquet {path!r} row {i}: empty 'path'")
        paths.append(str(p).strip())
    labels = [None if lab is None or str(lab).strip() == "" else str(lab).strip() for lab in raw_labels]
    return paths, labels
