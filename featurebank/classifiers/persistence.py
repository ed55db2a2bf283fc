"""Saving and loading fitted classifiers without pickle.

A classifier file is a zip archive holding two members:

* ``featurebank-classifier.json``: the header (format version, the vector space the
  classifier was trained in, class names, training size, featurebank version, creation time,
  estimator type, user metadata);
* ``model.skops``: the estimator written by ``skops.io`` (itself a zip: ``schema.json``, a
  JSON tree of nodes, and one uncompressed ``.npy`` member per array).

Threat model
------------
A classifier file may come from anyone (a colleague, a download, a model zoo). Loading it
must not run code chosen by its author, import modules it names, touch the file system, or
use memory out of proportion to a limit the caller sets. What loading does, in order:

1. **Sizes, before anything is inflated.** The file on disk, every member of the outer zip
   and every member of the skops archive are checked against the cap (``max_bytes``,
   default :data:`DEFAULT_MAX_BYTES` = 1 GiB uncompressed in all; the header alone at most
   :data:`HEADER_MAX_BYTES`, the skops schema at most :data:`SCHEMA_MAX_BYTES`) by their
   declared size, then read in 1 MiB chunks that stop at the cap, so a member whose zip
   header lies about its size cannot inflate past it. Only stored and deflate members are
   read (bz2/lzma decompress without an output bound); members of the skops archive must
   be stored (skops writes them so), so skops itself never inflates anything.
2. **The vector space.** A classifier trained on another model's vectors is refused.
3. **The names, before any import.** Every node of the skops schema (nested ones included,
   and those skops would trust by default) must be an exact ``(module.Class, skops loader)``
   pair of :data:`ALLOWED_NODES`: the types featurebank's own estimators and the
   scikit-learn classifiers ``featurebank train`` accepts by name are made of, derived by
   fitting each of them (``tests/classifiers/test_persistence.py`` refits them all, so a
   legitimate file is never refused). No function, method, ``partial``, operator, bytes,
   sparse matrix or object-dtype array is allowed; the random generator's bit-generator
   name must be one of numpy's; the skops protocol must be :data:`SKOPS_PROTOCOL`. (Arrays of
   objects, such as GradientBoosting's array of trees, are stored as lists of nodes, each
   checked like any other.) This
   check parses JSON only: no module named in the file is imported unless the whole file
   passed it (``skops.io.get_untrusted_types`` is not used: it reads every array member).
4. **Array members** are ``.npy`` of a plain dtype (never ``object``, which needs pickle) whose
   header agrees with the member's size; together with the schema they stay within ``max_bytes``.
5. Only then skops rebuilds the estimator (classes: ``__new__`` + ``__setstate__``; never
   ``pickle``), and the header must agree with it (estimator type, number of classes).
   Decision trees (``sklearn.tree._tree.Tree``, whose node indices scikit-learn follows
   without bounds checks) must point forward, inside the tree and inside the features.
   A ``KNNClassifier``'s FAISS index blob is first read in a child process whose address
   space is capped at a few times the blob's size (FAISS fills the buffers a blob announces
   before reading them: a 1 KB blob announcing 2^31 elements took 8 GB), and refused if that
   fails.

What this does not defend against: bugs in numpy, scikit-learn, scipy, FAISS or skops
themselves when fed crafted *values* of allowed types that compiled code trusts (for
example the node arrays of HistGradientBoosting's ``TreePredictor`` or of ``KDTree`` /
``BallTree``, or a FAISS blob whose values, not sizes, are wrong), and a file whose size is
within the cap you set. Only load files from sources you would run a scikit-learn model
from; raise ``max_bytes`` only for
files you trust.

>>> # save_classifier(probe, "cats.fbclf", fingerprint=card.output().fingerprint)
>>> # load_classifier("cats.fbclf", fingerprint=card.output().fingerprint).estimator
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from featurebank.errors import ClassifierFileError, FingerprintMismatchError

__all__ = [
    "FORMAT_VERSION", "SavedClassifier", "save_classifier", "load_classifier", "ALLOWED_NODES",
    "DEFAULT_MAX_BYTES",
]

_KNN = "featurebank.classifiers.knn.KNNClassifier"  # its FAISS blob is read in a memory-capped child first

#: Bumped when the layout or the meaning of the header changes.
FORMAT_VERSION = 1
HEADER_NAME = "featurebank-classifier.json"
MODEL_NAME = "model.skops"
MAGIC = "featurebank.classifier"

#: Default cap on the uncompressed size of a classifier file (all members together).
#: A kNN classifier holds its training vectors: 100k x 1280 float32 is 512 MB.
DEFAULT_MAX_BYTES = 1 << 30
#: Cap on the JSON header, whatever ``max_bytes`` is.
HEADER_MAX_BYTES = 1 << 20
#: Cap on the skops ``schema.json`` (arrays live in their own members), whatever ``max_bytes`` is.
SCHEMA_MAX_BYTES = 64 << 20
#: Deepest nesting of skops nodes accepted (real estimators stay under 20).
MAX_DEPTH = 64
#: The skops protocol :data:`ALLOWED_NODES` was derived with.
SKOPS_PROTOCOL = 2
_CHUNK = 1 << 20

#: Every (``module.Class``, skops loader) pair a classifier file may hold: what featurebank's
#: estimators and the scikit-learn classifiers ``featurebank train`` accepts by name are made
#: of (derived by fitting each on small binary and multi-class problems, with their common
#: options; ``tests/classifiers/test_persistence.py`` refits them all), plus numpy's plain
#: scalar types and builtin dict-key types. A frozen literal on purpose: nothing here is
#: computed from imports, and a name is trusted only together with the loader it comes with.
ALLOWED_NODES = frozenset({
    # containers and primitives
    ("builtins.dict", "DictNode"),
    ("builtins.list", "ListNode"),
    ("builtins.tuple", "TupleNode"),
    ("builtins.str", "JsonNode"),
    # dict key types (skops calls them on each key)
    ("builtins.str", "TypeNode"),
    ("builtins.int", "TypeNode"),
    ("builtins.float", "TypeNode"),
    ("builtins.bool", "TypeNode"),
    ("numpy.str_", "TypeNode"),
    # arrays and numpy scalars (read with numpy.load(allow_pickle=False))
    ("numpy.ndarray", "NdArrayNode"),
    ("numpy.bool", "NdArrayNode"),
    ("numpy.int8", "NdArrayNode"),
    ("numpy.int16", "NdArrayNode"),
    ("numpy.int32", "NdArrayNode"),
    ("numpy.int64", "NdArrayNode"),
    ("numpy.uint8", "NdArrayNode"),
    ("numpy.uint16", "NdArrayNode"),
    ("numpy.uint32", "NdArrayNode"),
    ("numpy.uint64", "NdArrayNode"),
    ("numpy.float16", "NdArrayNode"),
    ("numpy.float32", "NdArrayNode"),
    ("numpy.float64", "NdArrayNode"),
    ("numpy.random._generator.Generator", "RandomGeneratorNode"),
    ("numpy.random.mtrand.RandomState", "RandomStateNode"),
    # featurebank's estimators
    ("featurebank.classifiers.knn.KNNClassifier", "ObjectNode"),
    ("featurebank.classifiers.probe.LinearProbe", "ObjectNode"),
    ("featurebank.classifiers.prototype.PrototypeClassifier", "ObjectNode"),
    # scikit-learn classifiers and the parts they are made of
    ("sklearn._loss._loss.CyExponentialLoss", "LossNode"),
    ("sklearn._loss._loss.CyHalfBinomialLoss", "LossNode"),
    ("sklearn._loss._loss.CyHalfMultinomialLoss", "LossNode"),
    ("sklearn.linear_model._sgd_fast.Hinge", "LossNode"),
    ("sklearn.linear_model._sgd_fast.ModifiedHuber", "LossNode"),
    ("sklearn._loss.link.HalfLogitLink", "ObjectNode"),
    ("sklearn._loss.link.Interval", "ObjectNode"),
    ("sklearn._loss.link.LogitLink", "ObjectNode"),
    ("sklearn._loss.link.MultinomialLogit", "ObjectNode"),
    ("sklearn._loss.loss.ExponentialLoss", "ObjectNode"),
    ("sklearn._loss.loss.HalfBinomialLoss", "ObjectNode"),
    ("sklearn._loss.loss.HalfMultinomialLoss", "ObjectNode"),
    ("sklearn.calibration.CalibratedClassifierCV", "ObjectNode"),
    ("sklearn.calibration._CalibratedClassifier", "ObjectNode"),
    ("sklearn.calibration._SigmoidCalibration", "ObjectNode"),
    ("sklearn.discriminant_analysis.LinearDiscriminantAnalysis", "ObjectNode"),
    ("sklearn.discriminant_analysis.QuadraticDiscriminantAnalysis", "ObjectNode"),
    ("sklearn.dummy.DummyClassifier", "ObjectNode"),
    ("sklearn.ensemble._bagging.BaggingClassifier", "ObjectNode"),
    ("sklearn.ensemble._forest.ExtraTreesClassifier", "ObjectNode"),
    ("sklearn.ensemble._forest.RandomForestClassifier", "ObjectNode"),
    ("sklearn.ensemble._gb.GradientBoostingClassifier", "ObjectNode"),
    ("sklearn.ensemble._hist_gradient_boosting.binning._BinMapper", "ObjectNode"),
    ("sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier", "ObjectNode"),
    ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor", "ObjectNode"),
    ("sklearn.ensemble._weight_boosting.AdaBoostClassifier", "ObjectNode"),
    ("sklearn.gaussian_process._gpc.GaussianProcessClassifier", "ObjectNode"),
    ("sklearn.gaussian_process._gpc._BinaryGaussianProcessClassifierLaplace", "ObjectNode"),
    ("sklearn.gaussian_process.kernels.ConstantKernel", "ObjectNode"),
    ("sklearn.gaussian_process.kernels.Product", "ObjectNode"),
    ("sklearn.gaussian_process.kernels.RBF", "ObjectNode"),
    ("sklearn.isotonic.IsotonicRegression", "ObjectNode"),
    ("sklearn.linear_model._logistic.LogisticRegression", "ObjectNode"),
    ("sklearn.linear_model._logistic.LogisticRegressionCV", "ObjectNode"),
    ("sklearn.linear_model._passive_aggressive.PassiveAggressiveClassifier", "ObjectNode"),
    ("sklearn.linear_model._perceptron.Perceptron", "ObjectNode"),
    ("sklearn.linear_model._ridge.RidgeClassifier", "ObjectNode"),
    ("sklearn.linear_model._ridge.RidgeClassifierCV", "ObjectNode"),
    ("sklearn.linear_model._stochastic_gradient.SGDClassifier", "ObjectNode"),
    ("sklearn.metrics._dist_metrics.EuclideanDistance64", "ObjectNode"),
    ("sklearn.multiclass.OneVsRestClassifier", "ObjectNode"),
    ("sklearn.naive_bayes.BernoulliNB", "ObjectNode"),
    ("sklearn.naive_bayes.CategoricalNB", "ObjectNode"),
    ("sklearn.naive_bayes.ComplementNB", "ObjectNode"),
    ("sklearn.naive_bayes.GaussianNB", "ObjectNode"),
    ("sklearn.naive_bayes.MultinomialNB", "ObjectNode"),
    ("sklearn.neighbors._ball_tree.BallTree", "ObjectNode"),
    ("sklearn.neighbors._classification.KNeighborsClassifier", "ObjectNode"),
    ("sklearn.neighbors._classification.RadiusNeighborsClassifier", "ObjectNode"),
    ("sklearn.neighbors._kd_tree.KDTree", "ObjectNode"),
    ("sklearn.neighbors._nearest_centroid.NearestCentroid", "ObjectNode"),
    ("sklearn.neural_network._multilayer_perceptron.MLPClassifier", "ObjectNode"),
    ("sklearn.neural_network._stochastic_optimizers.AdamOptimizer", "ObjectNode"),
    ("sklearn.neural_network._stochastic_optimizers.SGDOptimizer", "ObjectNode"),
    ("sklearn.preprocessing._data.StandardScaler", "ObjectNode"),
    ("sklearn.preprocessing._label.LabelBinarizer", "ObjectNode"),
    ("sklearn.preprocessing._label.LabelEncoder", "ObjectNode"),
    ("sklearn.semi_supervised._label_propagation.LabelPropagation", "ObjectNode"),
    ("sklearn.semi_supervised._label_propagation.LabelSpreading", "ObjectNode"),
    ("sklearn.svm._classes.LinearSVC", "ObjectNode"),
    ("sklearn.svm._classes.NuSVC", "ObjectNode"),
    ("sklearn.svm._classes.SVC", "ObjectNode"),
    ("sklearn.tree._classes.DecisionTreeClassifier", "ObjectNode"),
    ("sklearn.tree._classes.DecisionTreeRegressor", "ObjectNode"),
    ("sklearn.tree._classes.ExtraTreeClassifier", "ObjectNode"),
    ("sklearn.tree._tree.Tree", "TreeNode"),
})
#: numpy's bit generators: the only names a random Generator node may ask skops to call.
_BIT_GENERATORS = frozenset({"MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64"})
_ALLOWED_NAMES = frozenset(name for name, _ in ALLOWED_NODES)


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


def _too_big(path: Path, what: str, size: "int | str", cap: int) -> ClassifierFileError:
    return ClassifierFileError(
        f"{str(path)!r}: {what} is {size} bytes uncompressed, over the limit of {cap} bytes; if you trust "
        "this file, raise the limit (load_classifier(..., max_bytes=N), or --max-classifier-bytes N)"
    )


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, path: Path, what: str) -> bytes:
    """The member's bytes, never more than ``cap``: checked by declared size before reading, then
    read in bounded chunks so a member whose header lies cannot inflate past the cap."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ClassifierFileError(
            f"{str(path)!r}: {what} uses zip compression method {info.compress_type}; featurebank writes "
            "stored or deflate members only: save the classifier again with featurebank.save_classifier"
        )
    if info.file_size > cap:
        raise _too_big(path, what, info.file_size, cap)
    chunks, total = [], 0
    with zf.open(info) as fh:
        while True:
            chunk = fh.read(min(_CHUNK, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise _too_big(path, what, f"more than {cap}", cap)
    return b"".join(chunks)


def _corrupt(path: Path, exc: BaseException) -> ClassifierFileError:
    return ClassifierFileError(
        f"{str(path)!r} is not a featurebank classifier file, or it is truncated/corrupt "
        f"({type(exc).__name__}: {exc}); save it again with featurebank.save_classifier"
    )


def _read_archive(path: Path, max_bytes: int) -> tuple[dict, bytes]:
    if not path.is_file():
        raise ClassifierFileError(f"no classifier file at {str(path)!r}; check the path")
    on_disk = path.stat().st_size
    if on_disk > max_bytes + HEADER_MAX_BYTES:
        raise _too_big(path, "the file", on_disk, max_bytes + HEADER_MAX_BYTES)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            if HEADER_NAME not in infos or MODEL_NAME not in infos:
                raise ClassifierFileError(
                    f"{str(path)!r} is a zip file but not a featurebank classifier (no {HEADER_NAME}/{MODEL_NAME}); "
                    "save classifiers with featurebank.save_classifier"
                )
            header_bytes = _read_member(zf, infos[HEADER_NAME], HEADER_MAX_BYTES, path, f"member {HEADER_NAME}")
            model_bytes = _read_member(zf, infos[MODEL_NAME], max_bytes, path, f"member {MODEL_NAME}")
    except ClassifierFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ClassifierFileError(f"{str(path)!r} has a corrupt header ({exc})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ClassifierFileError(f"{str(path)!r} is not a featurebank classifier file (bad header)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ClassifierFileError(
            f"{str(path)!r} has classifier format version {version!r}; this featurebank reads version "
            f"{FORMAT_VERSION}: upgrade featurebank or retrain and save the classifier again"
        )
    for key, kind in (("fingerprint", str), ("classes", list), ("estimator_type", str)):
        if not isinstance(header.get(key), kind):
            raise ClassifierFileError(f"{str(path)!r} has a corrupt header (missing or malformed {key!r})")
    return header, model_bytes


def _refuse_types(path: Path, refused: "set[str]") -> ClassifierFileError:
    return ClassifierFileError(
        f"{str(path)!r} asks to rebuild types featurebank does not load from a classifier file: "
        f"{', '.join(sorted(refused))}. A classifier file may hold only featurebank's estimators, the "
        "scikit-learn classifiers `featurebank train` accepts and the numpy arrays they are made of "
        "(featurebank.classifiers.persistence.ALLOWED_NODES); do not load this file"
    )


def _check_schema(path: Path, schema: Any, members: Mapping[str, zipfile.ZipInfo]) -> tuple[set, list]:
    """Walk every node of a skops schema (JSON only: nothing is imported). Returns the allowed type
    names it holds and the array members it reads; raises ClassifierFileError on anything else."""
    if not isinstance(schema, dict) or schema.get("protocol") != SKOPS_PROTOCOL:
        got = schema.get("protocol") if isinstance(schema, dict) else None
        raise ClassifierFileError(
            f"{str(path)!r} holds a skops payload of protocol {got!r}; featurebank reads protocol "
            f"{SKOPS_PROTOCOL}: save the classifier again with this featurebank"
        )
    names: set[str] = set()
    refused: set[str] = set()
    arrays: list[str] = []
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ClassifierFileError(
                f"{str(path)!r} nests objects deeper than {MAX_DEPTH} levels; no featurebank classifier does: "
                "the file is corrupt or crafted"
            )
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
            continue
        if not isinstance(value, dict):
            continue
        stack.extend((v, depth + 1) for v in value.values())
        if "__loader__" not in value and "__class__" not in value and "__module__" not in value:
            continue  # a plain mapping inside a node (a dict's items, reduce args)
        module, cls, loader = value.get("__module__"), value.get("__class__"), value.get("__loader__")
        if not (isinstance(module, str) and isinstance(cls, str) and isinstance(loader, str)):
            raise ClassifierFileError(f"{str(path)!r} holds a malformed skops node: the file is corrupt or crafted")
        name = f"{module}.{cls}"
        if (name, loader) not in ALLOWED_NODES:
            # an allowed type asked for through another loader (e.g. a dict "called" as a key type)
            refused.add(f"{name} (as {loader})" if name in _ALLOWED_NAMES else name)
            continue
        names.add(name)
        if loader == "NdArrayNode" and value.get("type") != "json":
            # "json" arrays (GradientBoosting's array of trees) are lists of nodes, all checked here
            if value.get("type") != "numpy":
                raise ClassifierFileError(f"{str(path)!r} holds an array of unknown kind {value.get('type')!r}: "
                                          "the file is corrupt or crafted")
            file = value.get("file")
            if not isinstance(file, str) or file not in members:
                raise ClassifierFileError(f"{str(path)!r} refers to a missing array member {file!r}: it is corrupt")
            arrays.append(file)
        elif loader == "RandomGeneratorNode":
            try:
                bit_generator = json.loads(value["content"]["bit_generator"]["content"]["bit_generator"]["content"])
            except (KeyError, TypeError, ValueError):
                bit_generator = None
            if bit_generator not in _BIT_GENERATORS:
                refused.add(f"numpy.random.{bit_generator}")
    if refused:
        raise _refuse_types(path, refused)
    return names, arrays


def _check_array_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """An .npy member must hold a plain dtype and exactly the bytes its header promises."""
    import numpy as np
    from numpy.lib import format as npy

    with zf.open(info) as fh:
        head = fh.read(min(info.file_size, 1 << 16))
    buf = io.BytesIO(head)
    try:
        version = npy.read_magic(buf)
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = reader(buf)
    except Exception as exc:  # numpy raises ValueError/SyntaxError on bad headers
        raise ClassifierFileError(
            f"{str(path)!r} holds a corrupt array member {info.filename!r} ({type(exc).__name__}: {exc})"
        ) from None
    if dtype.hasobject:
        raise ClassifierFileError(
            f"{str(path)!r} holds an array of Python objects ({info.filename!r}, dtype {dtype}); featurebank "
            "loads only arrays of plain numbers or strings: do not load this file"
        )
    expected = int(np.prod(shape, dtype=np.uint64)) * dtype.itemsize + buf.tell()
    if expected != info.file_size:
        raise ClassifierFileError(
            f"{str(path)!r} holds an array member {info.filename!r} whose header promises {expected} bytes but "
            f"which has {info.file_size}: the file is corrupt or crafted"
        )


def _rebuild(path: Path, model_bytes: bytes, max_bytes: int) -> tuple[Any, set]:
    try:
        with zipfile.ZipFile(io.BytesIO(model_bytes)) as zf:
            infos = zf.infolist()
            members = {info.filename: info for info in infos}
            if len(members) != len(infos):
                raise ClassifierFileError(f"{str(path)!r} holds a skops payload with duplicate members: it is crafted")
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ClassifierFileError(
                        f"{str(path)!r} holds a compressed skops member {info.filename!r}; featurebank writes them "
                        "uncompressed: save the classifier again with featurebank.save_classifier"
                    )
            if "schema.json" not in members:
                raise ClassifierFileError(f"{str(path)!r} holds a skops payload without schema.json: it is corrupt")
            schema_bytes = _read_member(zf, members["schema.json"], min(max_bytes, SCHEMA_MAX_BYTES), path,
                                        "the skops schema")
            try:
                schema = json.loads(schema_bytes)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise ClassifierFileError(f"{str(path)!r} holds a corrupt skops schema ({exc})") from None
            names, arrays = _check_schema(path, schema, members)
            # skops reads each referenced member into memory once per reference
            total = len(schema_bytes) + sum(members[name].file_size for name in arrays)
            if total > max_bytes:
                raise _too_big(path, "the estimator", total, max_bytes)
            for name in set(arrays):
                _check_array_member(path, zf, members[name])
    except ClassifierFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from None
    # Every node is allowed and every member is stored and within the cap: skops now imports
    # only allowed modules and reads at most what was counted above. (Importing skops imports
    # all of scikit-learn; a refused file never gets this far.)
    import skops.io

    # A KNNClassifier's FAISS blob is read first in a memory-capped child (see
    # classifiers/knn.py: FAISS allocates what the blob announces before reading it).
    guard = contextlib.nullcontext()
    if _KNN in names:
        from featurebank.classifiers.knn import untrusted_faiss_blobs

        guard = untrusted_faiss_blobs()
    try:
        with guard:
            return skops.io.loads(model_bytes, trusted=sorted(names)), names
    except Exception as exc:
        raise ClassifierFileError(
            f"{str(path)!r} holds an estimator that cannot be rebuilt ({type(exc).__name__}: {exc}); "
            "it may be corrupt or written by an incompatible scikit-learn: retrain and save it again"
        ) from None


def _check_trees(path: Path, estimator: Any, names: "set[str]") -> None:
    """Decision trees hold raw node indices that scikit-learn follows without bounds checks at
    predict time: refuse any that point outside the tree, backwards (a loop) or past the features."""
    if "sklearn.tree._tree.Tree" not in names:
        return
    import numpy as np
    from sklearn.tree._tree import Tree

    seen, stack = set(), [(estimator, None)]
    while stack:
        obj, owner = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tree):
            n = obj.node_count
            ok = 0 <= n <= obj.capacity and (owner is None or obj.n_features == getattr(owner, "n_features_in_", -1))
            if ok and n:
                left, right, feature = obj.children_left, obj.children_right, obj.feature
                idx = np.arange(n)
                inner = left != -1
                ok = bool(np.array_equal(inner, right != -1) and np.all(
                    (left[inner] > idx[inner]) & (left[inner] < n) & (right[inner] > idx[inner]) & (right[inner] < n)
                    & (feature[inner] >= 0) & (feature[inner] < obj.n_features)))
            if not ok:
                raise ClassifierFileError(
                    f"{str(path)!r} holds a decision tree whose nodes point outside the tree or its features: the "
                    "file is corrupt or crafted; do not load it"
                )
        elif isinstance(obj, (list, tuple)) or (isinstance(obj, np.ndarray) and obj.dtype == object):
            stack.extend((item, owner) for item in obj)
        elif isinstance(obj, dict):
            stack.extend((item, owner) for item in obj.values())
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("sklearn.", "featurebank.")):
            stack.extend((item, obj) for item in vars(obj).values())


def load_classifier(
    path: "str | os.PathLike[str]", *, fingerprint: str | None = None, max_bytes: int | None = None
) -> SavedClassifier:
    """Load a classifier file written by :func:`save_classifier`.

    Parameters
    ----------
    path : the file
    fingerprint : the vector space of the vectors you will classify (the embedding model's
        ``OutputSpec.fingerprint``). When given and different from the one the classifier
        was trained in, :class:`~featurebank.errors.FingerprintMismatchError` is raised
        before the estimator is read. None skips the check (inspection only).
    max_bytes : cap on the uncompressed size of the file's contents, checked before anything
        is inflated; None means :data:`DEFAULT_MAX_BYTES` (1 GiB). Raise it only for files you
        trust (a kNN classifier holds its training vectors).

    Raises
    ------
    ClassifierFileError
        The file is missing, truncated, corrupt, not a classifier file, of an unknown format
        version, over ``max_bytes``, holds a type outside :data:`ALLOWED_NODES`, or its header
        disagrees with its estimator. See the module docstring for the threat model.
    FingerprintMismatchError
        The classifier was trained on vectors of another model.
    """
    if max_bytes is None:
        max_bytes = DEFAULT_MAX_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive number of bytes; got {max_bytes!r}")
    path = Path(path)
    header, model_bytes = _read_archive(path, max_bytes)
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
    estimator, names = _rebuild(path, model_bytes, max_bytes)
    del model_bytes
    _check_trees(path, estimator, names)
    expected_type = header["estimator_type"]
    actual_type = f"{type(estimator).__module__}.{type(estimator).__qualname__}"
    if actual_type != expected_type:
        raise ClassifierFileError(
            f"{str(path)!r} header says {expected_type} but the payload is {actual_type}; the file was tampered with"
        )
    n_fitted = len(getattr(estimator, "classes_", ()))
    if len(header["classes"]) != n_fitted:
        raise ClassifierFileError(
            f"{str(path)!r} header names {len(header['classes'])} classes but its estimator has {n_fitted}; the "
            "file was edited or is corrupt: save the classifier again with featurebank.save_classifier"
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
