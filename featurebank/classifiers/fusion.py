"""Fusing a fitted classifier into the backbone's ONNX graph: pixels in, label out.

The classifier is converted with skl2onnx (our LinearProbe and PrototypeClassifier through
their plain scikit-learn equivalents, :meth:`LinearProbe.to_sklearn` and
:meth:`PrototypeClassifier.to_sklearn`) and joined after the backbone's embedding output
with ``onnx.compose.merge_models``. The fused file keeps the backbone's inputs and outputs,
and adds ``label`` and ``probabilities`` in the one convention every classifying model
follows (:data:`featurebank.artifact.CLASS_OUTPUTS`, shared with fine-tuned models):
``label`` is the int64 column of the most probable class and the model card's ``classes``
names the columns. A ``featurebank.classifier`` entry records the estimator and the parity
figures. Before it is written, onnxruntime checks
on seeded inputs that the fused graph reproduces the two-step path (backbone session, then
``clf.predict_proba``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.errors import ExportParityError

__all__ = ["fuse_classifier", "classifier_to_onnx", "CLASSIFIER_METADATA_KEY"]

CLASSIFIER_METADATA_KEY = "featurebank.classifier"
LABEL, PROBABILITIES = "label", "probabilities"
_PREFIX = "classifier/"


def _plain_sklearn(clf: Any) -> Any:
    """The scikit-learn estimator skl2onnx will convert, or a clear refusal."""
    from featurebank.classifiers.knn import KNNClassifier

    if isinstance(clf, KNNClassifier):
        raise ValueError(
            "KNNClassifier cannot be fused into ONNX: its neighbours live in a FAISS index, which has no "
            "ONNX form. Classify in two steps (embed, then clf.predict on the vectors), or fuse a LinearProbe "
            "or PrototypeClassifier"
        )
    if hasattr(clf, "to_sklearn"):
        return clf.to_sklearn()
    if not hasattr(clf, "predict_proba"):
        raise ValueError(
            f"{type(clf).__name__} has no predict_proba, so a fused model could not output probabilities; "
            "use a probabilistic classifier (e.g. LinearProbe, LogisticRegression, RandomForestClassifier)"
        )
    return clf


def classifier_to_onnx(clf: Any, n_features: int, *, opset: int, input_name: str = "embedding") -> Any:
    """Convert a fitted classifier to an ONNX model ``input_name`` -> ``label``, ``probabilities``.

    Parameters
    ----------
    clf : fitted LinearProbe, PrototypeClassifier or scikit-learn classifier skl2onnx supports
    n_features : width of the float32 input, shape (batch, n_features)
    opset : the default-domain opset to target (the backbone's, so the graphs can merge)
    """
    import onnx
    import skl2onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier
    from sklearn.pipeline import Pipeline
    from sklearn.utils.validation import check_is_fitted

    if not is_classifier(clf):
        raise ValueError(f"fuse_classifier needs a scikit-learn classifier; got {type(clf).__name__}")
    check_is_fitted(clf)
    skl = _plain_sklearn(clf)
    final = skl.steps[-1][1] if isinstance(skl, Pipeline) else skl
    max_opset = int(skl2onnx.__max_supported_opset__)
    target = min(int(opset), max_opset)
    try:
        model = skl2onnx.convert_sklearn(
            skl,
            initial_types=[(input_name, FloatTensorType([None, int(n_features)]))],
            target_opset={"": target, "ai.onnx.ml": 3},
            options={id(final): {"zipmap": False}},
        )
    except Exception as exc:  # skl2onnx raises MissingShapeCalculator, RuntimeError, ...
        raise ValueError(
            f"skl2onnx cannot convert {type(clf).__name__} to ONNX ({type(exc).__name__}: {exc}); "
            "use LinearProbe, PrototypeClassifier or a classifier skl2onnx supports"
        ) from None
    if target < int(opset):
        from onnx import version_converter

        model = version_converter.convert_version(model, int(opset))
    outputs = [o.name for o in model.graph.output]
    if outputs != [LABEL, PROBABILITIES]:
        raise ValueError(f"skl2onnx produced outputs {outputs}, expected {[LABEL, PROBABILITIES]}")
    onnx.checker.check_model(model)
    return model


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.output[:] = [new if t == old else t for t in node.output]
        node.input[:] = [new if t == old else t for t in node.input]
    for out in graph.output:
        if out.name == old:
            out.name = new


def _seeded_inputs(card: Any, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c, h, w = card.preprocessing.input_size
    if card.input_format == "uint8":
        return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    return rng.standard_normal((n, c, h, w)).astype(np.float32)


def fuse_classifier(
    model_onnx_path: "str | os.PathLike[str]",
    clf: Any,
    output_path: "str | os.PathLike[str]",
    *,
    output: str | None = None,
    atol: float = 1e-4,
    n_check: int = 8,
    seed: int = 0,
) -> Path:
    """Write one ONNX model that maps pixels straight to ``label`` and ``probabilities``.

    Parameters
    ----------
    model_onnx_path : a featurebank backbone ONNX file (with a model card)
    clf : fitted classifier trained on that model's vectors of ``output``; ``KNNClassifier``
        is refused (FAISS has no ONNX form)
    output_path : the fused ONNX file to write (atomically)
    output : name or layer of the backbone output the classifier reads; default the only one
    atol : largest accepted difference between fused and two-step probabilities
    n_check : number of seeded inputs for the parity check
    seed : seeds the parity inputs

    The fused graph has the backbone's input and outputs plus ``label`` (shape (batch,),
    int64: the column of the most probable class) and ``probabilities`` (shape (batch,
    n_classes), float32); its model card's ``classes`` names the columns (``str`` of
    ``clf.classes_``).

    Raises
    ------
    ModelCardError, NotOnnxModelError : the backbone file is not a featurebank model
    ValueError : the classifier does not fit the output (width) or cannot be converted
    ExportParityError : the fused model disagrees with the two-step path
    """
    import onnx
    import onnxruntime as ort
    from onnx import compose

    import dataclasses

    from featurebank import __version__
    from featurebank.artifact import read_model_card, write_model_card

    card = read_model_card(model_onnx_path)  # clear error for a missing / foreign file
    backbone = onnx.load(os.fspath(model_onnx_path))
    spec = card.output(output)
    if len(spec.shape) != 1:
        raise ValueError(
            f"output {spec.name!r} has per-sample shape {spec.shape}; a classifier needs a pooled vector "
            "(export with pool='avg', 'gem', 'max' or 'token')"
        )
    n_features = getattr(clf, "n_features_in_", None)
    if n_features is not None and int(n_features) != spec.dim:
        raise ValueError(
            f"the classifier was fitted on {n_features}-dim vectors but output {spec.name!r} of this model is "
            f"{spec.dim}-dim; fuse it with the model whose vectors it was trained on"
        )
    opset = next((o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("the backbone ONNX model imports no default-domain opset")
    head = classifier_to_onnx(clf, spec.dim, opset=opset, input_name="embedding")

    taken = {t for n in backbone.graph.node for t in n.output} | {i.name for i in backbone.graph.input}
    clash = [name for name in (LABEL, PROBABILITIES) if name in taken]
    if clash:
        raise ValueError(f"the backbone already has tensors named {clash}; cannot add classifier outputs")
    head = compose.add_prefix(head, _PREFIX)
    ir = max(backbone.ir_version, head.ir_version)
    backbone.ir_version = head.ir_version = ir
    fused = compose.merge_models(
        backbone,
        head,
        io_map=[(spec.name, _PREFIX + "embedding")],
        outputs=[o.name for o in backbone.graph.output] + [_PREFIX + PROBABILITIES],
    )
    _rename_tensor(fused.graph, _PREFIX + PROBABILITIES, PROBABILITIES)
    # label: the column index, as in a fine-tuned model (skl2onnx's own label, the class
    # value itself, is left out; the card's ``classes`` names the columns)
    fused.graph.node.append(onnx.helper.make_node("ArgMax", [PROBABILITIES], [LABEL], name="label_argmax",
                                                  axis=1, keepdims=0))
    fused.graph.output.insert(len(backbone.graph.output),
                              onnx.helper.make_tensor_value_info(LABEL, onnx.TensorProto.INT64, [None]))
    fused = onnx.utils.Extractor(fused).extract_model(
        [i.name for i in fused.graph.input if i.name not in {t.name for t in fused.graph.initializer}],
        [o.name for o in fused.graph.output])  # drops skl2onnx's unused label nodes
    fused.graph.name = f"{backbone.graph.name or card.backbone}+{type(clf).__name__}"
    classes = [c.item() if hasattr(c, "item") else c for c in clf.classes_]
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"the classifier's classes {classes} are not distinct as text; rename them")
    write_model_card(fused, dataclasses.replace(card, classes=tuple(names), fingerprint=""))

    # Parity: the fused graph against backbone session -> clf.predict_proba.
    pixels = _seeded_inputs(card, int(n_check), seed)
    providers = ["CPUExecutionProvider"]
    two_step = ort.InferenceSession(backbone.SerializeToString(), providers=providers)
    vectors = two_step.run([spec.name], {card.input_name: pixels})[0]
    expected = np.asarray(clf.predict_proba(vectors), dtype=np.float64)
    expected_label = np.asarray(clf.predict(vectors))

    info = {
        "estimator": f"{type(clf).__module__}.{type(clf).__qualname__}",
        "input_output": spec.name,
        "space": spec.fingerprint,
        "outputs": [LABEL, PROBABILITIES],
        "featurebank_version": __version__,
    }
    entry = fused.metadata_props.add()
    entry.key, entry.value = CLASSIFIER_METADATA_KEY, json.dumps(info, sort_keys=True)
    onnx.checker.check_model(fused)

    session = ort.InferenceSession(fused.SerializeToString(), providers=providers)
    label, proba = session.run([LABEL, PROBABILITIES], {card.input_name: pixels})
    diff = float(np.max(np.abs(proba.astype(np.float64) - expected)))
    # Labels may legitimately differ where the two best classes are within tolerance.
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * atol
    label_ok = np.array_equal(np.asarray(names, dtype=object)[np.asarray(label)][decided],
                              np.asarray([str(c) for c in expected_label], dtype=object)[decided])
    if not diff <= atol or not label_ok:
        raise ExportParityError(
            f"the fused model disagrees with backbone + {type(clf).__name__}.predict_proba on {n_check} seeded "
            f"inputs: max |probability difference| = {diff:.3g} (atol={atol:g}), labels equal: {label_ok}. "
            "The classifier's ONNX conversion is not faithful; use the two-step path"
        )
    info["verification"] = {"max_abs_diff": diff, "n_inputs": int(n_check), "seed": int(seed)}
    entry.value = json.dumps(info, sort_keys=True)

    out = Path(output_path)
    if not out.parent.is_dir():
        raise ValueError(f"folder {str(out.parent)!r} does not exist; create it first")
    from featurebank._atomic import write_bytes_atomic

    return write_bytes_atomic(out, fused.SerializeToString())
