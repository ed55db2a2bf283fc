"""The data tools on image sources: vectors come from the store, images not embedded yet are
embedded first (:func:`featurebank.embed_into_store.load_embeddings`, as ``train`` does), then
the array functions of :mod:`~featurebank.curation.audit`, :mod:`~featurebank.curation.select`
and :mod:`~featurebank.curation.map` run on them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from featurebank.artifact import DEFAULT_DECODE_MODE
from featurebank.curation.audit import audit_vectors
from featurebank.curation.map import check_map_method, check_map_output, project_2d, write_map
from featurebank.curation.select import select_vectors
from featurebank.embed_into_store import load_embeddings, space_of
from featurebank.embedder.session import ModelRunner, open_model
from featurebank.errors import ImageSourceError

__all__ = ["audit_images", "audit_store", "select_images", "map_images"]


def _runner(model: Any) -> ModelRunner:
    return model if isinstance(model, ModelRunner) else open_model(model)


def _vectors(source: Any, runner: ModelRunner, store: Any, output: str | None, decode_mode: str,
             progress: bool | None) -> tuple[np.ndarray, list[str], list[str | None], list[str]]:
    out = runner.card.output(output)
    out.check_embedding(space_of(runner, out.name, decode_mode))
    X, keys, labels, paths = load_embeddings(source, runner, store, output=out.name, decode_mode=decode_mode,
                                             progress=progress)
    if not paths:
        raise ImageSourceError(f"no image of {source!r} could be embedded (see `featurebank store failures`)")
    return X, keys, labels, paths


def _require_labels(labels: list[str | None], paths: list[str], what: str) -> None:
    missing = [p for p, lab in zip(paths, labels) if lab is None]
    if missing:
        raise ImageSourceError(
            f"{len(missing)} of {len(paths)} images have no label (first: {missing[0]}); {what} needs labelled "
            "images: class subfolders (SOURCE/<class>/image.jpg) or a CSV/Parquet list with a `label` column")


def audit_images(
    source: Any, model: str | os.PathLike[str] | ModelRunner, *, store: Any, test: Any = None,
    classifier: str = "probe", params: Mapping[str, Any] | None = None, cv: int = 5, random_state: int = 0,
    k: int = 10, outlier_z: float = 3.5, duplicate_threshold: float = 0.98, output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE, progress: bool | None = None,
) -> dict[str, Any]:
    """Audit the labelled images of ``source``: label issues, outliers, duplicates with different
    labels and, with ``test`` (labelled or not), leakage between the two sets.

    Returns :func:`~featurebank.curation.audit.audit_vectors`'s report, with ``summary["space"]``.
    Raises ImageSourceError for unlabelled images, one class, or a class with one image.
    """
    runner = _runner(model)
    X, keys, labels, paths = _vectors(source, runner, store, output, decode_mode, progress)
    _require_labels(labels, paths, "an audit")
    X_test, t_keys, t_labels, t_paths = (None, [], None, [])
    if test is not None:
        X_test, t_keys, t_labels, t_paths = _vectors(test, runner, store, output, decode_mode, progress)
    report = audit_vectors(X, labels, paths, keys, X_test=X_test, test_paths=t_paths, test_keys=t_keys,
                           test_labels=t_labels, classifier=classifier, params=params, cv=cv,
                           random_state=random_state, k=k, outlier_z=outlier_z,
                           duplicate_threshold=duplicate_threshold)
    report["summary"]["space"] = space_of(runner, runner.card.output(output).name, decode_mode)
    return report


def audit_store(store: Any, space: str, **options: Any) -> dict[str, Any]:
    """The audit of the labelled files a store records (``store.items()``: path, key, label)
    with their vectors of ``space``: what the service shows. Files recorded without a label,
    or whose vector is not in the space, are left out; raises ImageSourceError when fewer than
    two classes remain."""
    from featurebank.store import open_store

    with open_store(store, create=False) as st:
        # the newest record of each path, in path order (a folder's order: the audit of the same
        # folder through audit_images draws the same folds)
        latest = {it.path: it for it in st.items() if it.label is not None}
        items = [latest[p] for p in sorted(latest)]
        sp = st.space(space)
        X, found = sp.get([it.key for it in items]) if items else (np.zeros((0, 0), np.float32), np.zeros(0, bool))
    keep = np.flatnonzero(found)
    items = [items[i] for i in keep]
    if len({it.label for it in items}) < 2:
        raise ImageSourceError(
            f"the store {str(store)!r} records fewer than two labelled classes in space {space[:12]}…; "
            "embed labelled folders (SOURCE/<class>/image.jpg) into it first")
    report = audit_vectors(X[keep], [it.label for it in items], [it.path for it in items], [it.key for it in items],
                           **options)
    report["summary"]["space"] = space
    return report


def select_images(
    unlabelled: Any, model: str | os.PathLike[str] | ModelRunner, *, store: Any, budget: int,
    labelled: Any = None, strategy: str = "combined", classifier: str = "probe",
    params: Mapping[str, Any] | None = None, random_state: int = 0, output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE, progress: bool | None = None,
) -> dict[str, Any]:
    """The ``budget`` images of ``unlabelled`` to label next.

    An image whose content key is labelled already (a renamed copy included) is never
    proposed, nor two files of the same content. Returns ``{"picks": [row, ...], "summary":
    {...}}``; each row: ``rank``, ``path``, ``key``, ``predicted`` and ``margin`` (None for
    diversity and random).
    """
    runner = _runner(model)
    X_lab = y_lab = None
    lab_keys: set[str] = set()
    if labelled is not None:
        X_lab, k_lab, y_lab, p_lab = _vectors(labelled, runner, store, output, decode_mode, progress)
        _require_labels(y_lab, p_lab, "--labelled")
        lab_keys = set(k_lab)
    X, keys, _, paths = _vectors(unlabelled, runner, store, output, decode_mode, progress)
    seen: set[str] = set()
    rows = []
    for i, key in enumerate(keys):
        if key not in lab_keys and key not in seen:
            seen.add(key)
            rows.append(i)
    n_labelled_copies = sum(1 for key in keys if key in lab_keys)
    if not rows:
        raise ImageSourceError(f"all {len(paths)} images of the pool are labelled already; nothing to select")
    pool = np.asarray(rows, dtype=np.int64)
    chosen = select_vectors(X[pool], budget, strategy=strategy, X_labelled=X_lab, y_labelled=y_lab,
                            classifier=classifier, params=params, random_state=random_state)
    picks = []
    for rank, j in enumerate(chosen["indices"].tolist(), 1):
        i = int(pool[j])
        picks.append({"rank": rank, "path": paths[i], "key": keys[i],
                      "predicted": None if chosen["predicted"] is None else chosen["predicted"][rank - 1],
                      "margin": None if chosen["margin"] is None else round(float(chosen["margin"][rank - 1]), 6)})
    summary = {"strategy": strategy, "budget": int(budget), "pool": int(len(pool)),
               "pool_files": int(len(paths)), "already_labelled": int(n_labelled_copies),
               "labelled": 0 if X_lab is None else int(len(X_lab)), "random_state": int(random_state),
               "space": space_of(runner, runner.card.output(output).name, decode_mode)}
    return {"summary": summary, "picks": picks}


def map_images(
    source: Any, model: str | os.PathLike[str] | ModelRunner, path: str | os.PathLike[str], *, store: Any,
    method: str = "pca", fit_size: int = 5000, random_state: int = 0, max_thumbnails: int = 5000,
    output: str | None = None, decode_mode: str = DEFAULT_DECODE_MODE, progress: bool | None = None,
) -> dict[str, Any]:
    """Write a 2-D map of the images of ``source`` to ``path`` (``.png`` or ``.html``).

    The method's package and the output's suffix are checked before anything is embedded.
    Returns ``{"path", "n_images", "method", "classes"}``.
    """
    check_map_method(method)
    check_map_output(path)
    runner = _runner(model)
    X, _, labels, paths = _vectors(source, runner, store, output, decode_mode, progress)
    coords = project_2d(X, method=method, fit_size=fit_size, random_state=random_state)
    backbone = runner.card.backbone
    out = write_map(coords, labels, paths, path, title=f"{len(paths)} images, {backbone}, {method.upper()}",
                    max_thumbnails=max_thumbnails, random_state=random_state)
    return {"path": str(out), "n_images": len(paths), "method": method,
            "classes": sorted({str(v) for v in labels if v is not None})}
