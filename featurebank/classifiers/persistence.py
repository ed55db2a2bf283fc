"""Saving and loading fitted classifiers without pickle.

A classifier file is a zip archive holding two members:

* ``featurebank-classifier.json``: the header (format version, the vector space the
  classifier was trained in, class names, training size, featurebank version, creation time,
  estimator type, user metadata);
* ``model.skops``: the estimator written by ``skops.io``.

Loading reads the header first and refuses a classifier trained in another vector space
before touching the estimator, then lets skops rebuild only scikit-learn, numpy and
featurebank *classes* (never functions, never other modules). ``pickle.load`` is never
called on a user's file.

>>> # save_classifier(probe, "cats.fbclf", fingerprint=card.output().fingerprint)
>>> # load_classifier("cats.fbclf", fingerprint=card.output().fingerprint).estimator
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from featurebank.errors import ClassifierFileError, FingerprintMismatchError

__all__ = ["FORMAT_VERSION", "SavedClassifier", "save_classifier", "load_classifier", "TRUSTED_PREFIXES"]

#: Bumped when the layout or the meaning of the header changes.
FORMAT_VERSION = 1
HEADER_NAME = "featurebank-classifier.json"
MODEL_NAME = "model.skops"
MAGIC = "featurebank.classifier"
#: The only modules whose classes a classifier file may ask skops to rebuild.
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "featurebank.")


@dataclass(frozen=True)
class SavedClassifier:
    """A loaded classifier and what its file says about it.

    Attributes
    ----------
    estimator : the fitted scikit-learn compatible classifier
    fingerprint : the vector space it was trained in (``OutputSpec.fingerprint``, possibly
        with a decode mode; compared as an opaque string)
    classes : class names, in the order of ``estimator.classes_``
    n_samples : number of training vectors, when known
    featurebank_version, format_version, created : provenance (``created`` is ISO 8601 UTC)
    estimator_type : dotted class path of ``estimator``
    meta : the user metadata given to :func:`save_classifier`
    """

    estimator: Any
    fingerprint: str
    classes: tuple
    n_samples: int | None
    featurebank_version: str
    format_version: int
    created: str
    estimator_type: str
    meta: Mapping[str, Any] = field(default_factory=dict)


def _json_value(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) else value


def save_classifier(
    clf: Any,
    path: "str | os.PathLike[str]",
    *,
    fingerprint: str,
    classes: "list | tuple | None" = None,
    meta: "Mapping[str, Any] | None" = None,
) -> Path:
    """Write a fitted classifier and its provenance to one file, atomically.

    Parameters
    ----------
    clf : fitted classifier (any scikit-learn classifier, or a featurebank one)
    path : destination file (conventionally ``*.fbclf``); its folder must exist
    fingerprint : the vector space ``clf`` was trained in: ``OutputSpec.fingerprint`` of the
        model that produced the training vectors (plus decode mode if the caller keys on it)
    classes : display names for ``clf.classes_`` (same length); default ``clf.classes_``
    meta : JSON-serialisable extra facts (backbone name, layer, dataset ...)

    Returns
    -------
    Path of the written file.
    """
    from sklearn.base import is_classifier
    from sklearn.utils.validation import check_is_fitted

    import skops.io

    from featurebank import __version__

    if not is_classifier(clf):
        raise ValueError(f"save_classifier saves scikit-learn classifiers; got {type(clf).__name__}")
    check_is_fitted(clf)
    if not isinstance(fingerprint, str) or not fingerprint.strip():
        raise ValueError(
            "fingerprint must be the non-empty vector-space fingerprint of the model the training "
            "vectors came from (ModelCard.output().fingerprint)"
        )
    fitted_classes = [_json_value(c) for c in getattr(clf, "classes_", [])]
    if classes is None:
        classes = fitted_classes
    else:
        classes = [_json_value(c) for c in classes]
        if len(classes) != len(fitted_classes):
            raise ValueError(
                f"classes has {len(classes)} names but the classifier has {len(fitted_classes)} classes "
                f"({fitted_classes!r}); pass one name per entry of clf.classes_"
            )
    meta = dict(meta or {})
    n_samples = getattr(clf, "n_samples_fit_", None)
    if n_samples is None:
        n_samples = meta.get("n_samples")
    header = {
        "magic": MAGIC,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "classes": classes,
        "n_samples": None if n_samples is None else int(n_samples),
        "featurebank_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "estimator_type": f"{type(clf).__module__}.{type(clf).__qualname__}",
        "meta": meta,
    }
    try:
        header_bytes = json.dumps(header, indent=2, sort_keys=True).encode("utf-8")
    except TypeError as exc:
        raise ValueError(f"classes and meta must be JSON-serialisable: {exc}") from None
    model_bytes = skops.io.dumps(clf)

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"folder {str(path.parent)!r} does not exist; create it first")
    from featurebank._atomic import atomic_writer

    with atomic_writer(path, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(HEADER_NAME, header_bytes)
            zf.writestr(MODEL_NAME, model_bytes)
    return path


def _read_archive(path: Path) -> tuple[dict, bytes]:
    if not path.is_file():
        raise ClassifierFileError(f"no classifier file at {str(path)!r}; check the path")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if HEADER_NAME not in names or MODEL_NAME not in names:
                raise ClassifierFileError(
                    f"{str(path)!r} is a zip file but not a featurebank classifier (no {HEADER_NAME}/{MODEL_NAME}); "
                    "save classifiers with featurebank.save_classifier"
                )
            header_bytes = zf.read(HEADER_NAME)
            model_bytes = zf.read(MODEL_NAME)
    except ClassifierFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ClassifierFileError(
            f"{str(path)!r} is not a featurebank classifier file, or it is truncated/corrupt "
            f"({type(exc).__name__}: {exc}); save it again with featurebank.save_classifier"
        ) from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClassifierFileError(f"{str(path)!r} has a corrupt header ({exc})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ClassifierFileError(f"{str(path)!r} is not a featurebank classifier file (bad header)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ClassifierFileError(
            f"{str(path)!r} has classifier format version {version!r}; this featurebank reads version "
            f"{FORMAT_VERSION}: upgrade featurebank or retrain and save the classifier again"
        )
    for key in ("fingerprint", "classes", "estimator_type"):
        if key not in header:
            raise ClassifierFileError(f"{str(path)!r} has a corrupt header (missing {key!r})")
    return header, model_bytes


def _is_trusted_class(type_name: str) -> bool:
    if not type_name.startswith(TRUSTED_PREFIXES):
        return False
    # Resolve the name: a class is rebuilt by skops from its state; a *function* (numpy
    # and sklearn have some that run code) is never trusted.
    module_name, _, attr = type_name.rpartition(".")
    obj = None
    while module_name and obj is None:
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            module_name, _, outer = module_name.rpartition(".")
            attr = f"{outer}.{attr}"
    if obj is None:
        return False
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return inspect.isclass(obj)


def load_classifier(path: "str | os.PathLike[str]", *, fingerprint: str | None = None) -> SavedClassifier:
    """Load a classifier file written by :func:`save_classifier`.

    Parameters
    ----------
    path : the file
    fingerprint : the vector space of the vectors you will classify (the embedding model's
        ``OutputSpec.fingerprint``). When given and different from the one the classifier
        was trained in, :class:`~featurebank.errors.FingerprintMismatchError` is raised
        before the estimator is read. None skips the check (inspection only).

    Raises
    ------
    ClassifierFileError
        The file is missing, truncated, corrupt, not a classifier file, of an unknown format
        version, or asks to rebuild a type outside scikit-learn / numpy / featurebank.
    FingerprintMismatchError
        The classifier was trained on vectors of another model.
    """
    import skops.io

    path = Path(path)
    header, model_bytes = _read_archive(path)
    saved_fp = header["fingerprint"]
    if fingerprint is not None and fingerprint != saved_fp:
        meta = header.get("meta") or {}
        about = ", ".join(f"{k}={meta[k]}" for k in ("backbone", "layer", "model") if k in meta)
        raise FingerprintMismatchError(
            f"classifier {str(path)!r} was trained on vectors of model space {saved_fp}"
            + (f" ({about})" if about else "")
            + f", but your vectors come from {fingerprint}. Its predictions on these vectors would be "
            "meaningless: embed your images with the model it was trained on, or retrain the classifier "
            "on vectors of your current model"
        )
    try:
        untrusted = skops.io.get_untrusted_types(data=model_bytes)
    except Exception as exc:  # skops raises zipfile/json/KeyError errors on damaged payloads
        raise ClassifierFileError(
            f"{str(path)!r} holds a corrupt estimator payload ({type(exc).__name__}: {exc})"
        ) from None
    refused = [t for t in untrusted if not _is_trusted_class(t)]
    if refused:
        raise ClassifierFileError(
            f"{str(path)!r} asks to rebuild types outside scikit-learn, numpy and featurebank, which "
            f"featurebank refuses to load: {', '.join(refused)}. Only load classifier files you trust, "
            "and re-save them with featurebank.save_classifier from plain scikit-learn estimators"
        )
    try:
        estimator = skops.io.loads(model_bytes, trusted=untrusted)
    except Exception as exc:
        raise ClassifierFileError(
            f"{str(path)!r} holds an estimator that cannot be rebuilt ({type(exc).__name__}: {exc}); "
            "it may be corrupt or written by an incompatible scikit-learn: retrain and save it again"
        ) from None
    expected_type = header["estimator_type"]
    actual_type = f"{type(estimator).__module__}.{type(estimator).__qualname__}"
    if actual_type != expected_type:
        raise ClassifierFileError(
            f"{str(path)!r} header says {expected_type} but the payload is {actual_type}; the file was tampered with"
        )
    return SavedClassifier(
        estimator=estimator,
        fingerprint=saved_fp,
        classes=tuple(header["classes"]),
        n_samples=header.get("n_samples"),
        featurebank_version=str(header.get("featurebank_version", "")),
        format_version=int(header["format_version"]),
        created=str(header.get("created", "")),
        estimator_type=expected_type,
        meta=header.get("meta") or {},
    )
