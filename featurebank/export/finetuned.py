"""Export a fine-tuned network as one self-describing ONNX graph that embeds *and* classifies.

The network is any ``torch.nn.Module`` whose ``forward(x)`` takes normalised float pixels
(N, C, H, W) and returns ``(features, logits)`` (e.g. ``featurebank.finetune``'s
``FineTunedNet``: frozen bottom, fine-tuned top, linear head). The graph has

* ``features`` : (N, dim) float32, the fine-tuned embedding: a vector space of its own (its
  fingerprint is keyed on the fine-tuned weights, so it never mixes with the parent's);
* ``probabilities`` : (N, n_classes) float32, softmax of the logits;
* ``label`` : (N,) int64, the column of the most probable class;

the convention of every model that classifies by itself (:data:`featurebank.artifact.CLASS_OUTPUTS`,
shared with ``featurebank fuse``): the model card's ``classes`` names the columns, and its
``finetune`` entry records the provenance. As every export, the graph is checked
(``onnx.checker``) and compared with the torch model on seeded inputs (plus real pixels when
given); a mismatch raises :class:`~featurebank.errors.ExportParityError` and nothing is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from featurebank._atomic import write_bytes_atomic
from featurebank.artifact import (
    CLASS_OUTPUTS,
    INPUT_FORMATS,
    POOLINGS,
    ModelCard,
    OutputSpec,
    Preprocessing,
    write_model_card,
)
from featurebank.errors import ExportParityError
from featurebank.export.heads import _add_uint8_prefix
from featurebank.export.onnx_export import OPSET, _check_output_path, _torch_to_onnx
from featurebank.export.parity import compare_outputs, normalise_pixels, seeded_pixels

__all__ = ["export_finetuned", "PROVENANCE_KEYS", "FEATURES"]

FEATURES = "features"
PROBABILITIES, LABEL = CLASS_OUTPUTS
#: The keys ``card`` (the provenance) must carry.
PROVENANCE_KEYS = (
    "parent_backbone",  # registry name of the network fine-tuning started from
    "parent_weights_sha256",  # its weights hash (the parent model card's weights_sha256)
    "finetuned_weights_sha256",  # sha256 of the fine-tuned state dict
    "recipe",  # {"unfreeze": ..., "epochs": ..., "lr": ..., "seed": ...}
    "data_fingerprint",  # of the training data: content keys + labels
    "validation",  # validation metrics, e.g. {"accuracy": 0.93}
)


class _Classifying(torch.nn.Module):
    """(features, logits) -> (features, softmax probabilities, int64 argmax label)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        features, logits = self.net(x)
        probabilities = torch.softmax(logits, dim=1)
        return features, probabilities, torch.argmax(probabilities, dim=1)


def _check_provenance(card: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(card, Mapping):
        raise ValueError(f"card must be a dict of provenance ({', '.join(PROVENANCE_KEYS)}); got {type(card).__name__}")
    missing = [k for k in PROVENANCE_KEYS if k not in card]
    if missing:
        raise ValueError(f"card is missing provenance {', '.join(missing)}; it needs {', '.join(PROVENANCE_KEYS)}")
    for key in ("parent_weights_sha256", "finetuned_weights_sha256"):
        value = card[key]
        if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
            raise ValueError(f"card[{key!r}] must be a sha256 hex digest (64 lowercase hex characters); got {value!r}")
    if card["finetuned_weights_sha256"] == card["parent_weights_sha256"]:
        raise ValueError(
            "card['finetuned_weights_sha256'] equals the parent's weights hash: the fine-tuned features would share "
            "the parent's vector space; hash the fine-tuned state dict"
        )
    import json

    try:
        json.dumps(dict(card), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"card must be JSON-serialisable (it goes into the model card): {exc}") from None
    return dict(card)


def export_finetuned(
    net: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[Any],
    card: Mapping[str, Any],
    preprocessing: Preprocessing,
    input_format: str = "uint8",
    weights_license: str = "unknown",
    layer: str = FEATURES,
    pooling: str = "avg",
    verify_pixels: np.ndarray | None = None,
    seed: int = 0,
) -> ModelCard:
    """Write ``net`` as one ONNX graph with outputs ``features``, ``probabilities``, ``label``.

    Parameters
    ----------
    net : torch module, ``forward(x)`` -> ``(features, logits)``; x float32 (N, C, H, W)
        normalised with ``preprocessing.mean`` / ``std``, features (N, dim), logits
        (N, len(classes)). Exported in eval mode (its mode is restored after).
    path : the ONNX file to write (atomically; nothing is written when a check fails)
    classes : class names, in the order of the logits' columns (stored as text)
    card : provenance, the keys of :data:`PROVENANCE_KEYS` (more keys are kept as given);
        stored as the model card's ``finetune`` entry, and must be JSON-serialisable
    preprocessing : how images become the network input (the parent's)
    input_format : ``"uint8"`` (NHWC uint8 pixels, the graph normalises) or ``"float"``
    weights_license : license of the fine-tuned weights (that of the parent's, usually)
    layer, pooling : how the card describes the ``features`` output
    verify_pixels : optional (N, H, W, C) uint8 real images added to the seeded parity inputs
    seed : seeds the parity inputs

    Returns the :class:`ModelCard` written, parity figures in ``verification``.

    Raises
    ------
    ValueError : a bad argument (named with its value); ExportParityError : the ONNX graph
    disagrees with ``net``; OSError : ``path`` not writable
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}; got input_format={input_format!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got pooling={pooling!r}")
    if not isinstance(preprocessing, Preprocessing):
        raise ValueError(f"preprocessing must be a featurebank.artifact.Preprocessing; got {type(preprocessing).__name__}")
    names = tuple(str(c) for c in classes)
    if len(names) < 2:
        raise ValueError(f"classes needs at least two class names; got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct as text; got {list(names)}")
    provenance = _check_provenance(card)
    out_path = _check_output_path(path)
    c, h, w = preprocessing.input_size

    pixels = seeded_pixels(4, h, w, c, seed=seed)
    if verify_pixels is not None:
        pixels = np.concatenate([pixels, np.asarray(verify_pixels, np.uint8)], axis=0)
    floats = normalise_pixels(pixels, preprocessing.mean, preprocessing.std)
    wrapped = _Classifying(net)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            ref_features, ref_proba, ref_label = (t.numpy() for t in wrapped(torch.from_numpy(floats)))
        if ref_features.ndim != 2 or ref_proba.shape != (len(pixels), len(names)):
            raise ValueError(
                f"net must return features (N, dim) and logits (N, {len(names)}) for {len(names)} classes; got "
                f"features {tuple(ref_features.shape)} and logits {tuple(ref_proba.shape)}"
            )
        with tempfile.TemporaryDirectory(prefix=".featurebank-export-", dir=out_path.parent) as tmp:
            raw_path = Path(tmp) / "raw.onnx"
            _torch_to_onnx(wrapped, torch.zeros(2, c, h, w), raw_path, [FEATURES, PROBABILITIES, LABEL])
            model = onnx.load(str(raw_path))
    finally:
        net.train(was_training)
    model.graph.name = f"{provenance['parent_backbone']}+finetune"
    if input_format == "uint8":
        _add_uint8_prefix(model.graph, preprocessing, OPSET)

    dim = int(ref_features.shape[1])
    features = OutputSpec.make(
        name=FEATURES, layer=layer, pooling=pooling, normalize=False, dim=dim,
        backbone=str(provenance["parent_backbone"]), weights_sha256=provenance["finetuned_weights_sha256"],
        weights_source="finetune", preprocessing=preprocessing, precision="fp32",
    )
    figures = _verify(model, pixels if input_format == "uint8" else floats, ref_features, ref_proba, ref_label)
    model_card = ModelCard(
        backbone=str(provenance["parent_backbone"]),
        weights_source="finetune",
        weights_sha256=provenance["finetuned_weights_sha256"],
        weights_license=weights_license,
        outputs=(features,),
        preprocessing=preprocessing,
        input_name="pixels",
        input_format=input_format,
        precision="fp32",
        verification={"inputs": int(len(pixels)), "seed": int(seed), "outputs": figures},
        classes=names,
        finetune=provenance,
    )
    write_model_card(model, model_card)  # metadata only: the graph checked in _verify is unchanged
    write_bytes_atomic(out_path, model.SerializeToString())
    return model_card


def _verify(model: onnx.ModelProto, feed: np.ndarray, ref_features: np.ndarray, ref_proba: np.ndarray,
            ref_label: np.ndarray) -> dict[str, Any]:
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    features, proba, label = sess.run([FEATURES, PROBABILITIES, LABEL], {"pixels": feed})
    try:
        figures = {FEATURES: compare_outputs(ref_features, features, "fp32", name=FEATURES),
                   PROBABILITIES: compare_outputs(ref_proba, proba, "fp32", name=PROBABILITIES, atol=1e-4)}
    except ExportParityError as exc:
        raise ExportParityError(f"{exc}; the export was not written") from None
    # a label may differ only where the two best classes are within the probability tolerance
    top2 = np.sort(ref_proba, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2e-4
    wrong = int(np.sum(np.asarray(label)[decided] != ref_label[decided]))
    if label.dtype != np.int64 or wrong:
        raise ExportParityError(
            f"{LABEL}: exported model gives {wrong} different labels (dtype {label.dtype}) from the source model on "
            f"{int(decided.sum())} decided inputs; the export was not written"
        )
    figures[LABEL] = {"mismatches": 0, "decided": int(decided.sum())}
    return figures
