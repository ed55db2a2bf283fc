"""INT8 models that keep their features: static QDQ quantization, calibrated on the user's own
images, gated on images kept apart from the calibration, refused when a gate is missed.

The recipe (:func:`quantize_model`):

1. the images are hashed (sha256 of the file, the store's content key) and deduplicated by
   content, shuffled with ``seed`` and split: ``calibration_size`` images calibrate, the rest
   (at least ``min_holdout``) are held out for the gates, so no calibration image (not even
   one copied under another name) is ever a gate image. Both lists of keys go in the card;
2. each image is decoded with the model card's own preprocessing
   (:func:`featurebank.decoding.decode_image` / :func:`~featurebank.decoding.to_model_input`),
   in the graph's input format (uint8 NHWC pixels or normalised float NCHW);
3. ``onnxruntime.quantization.quantize_static`` writes a QDQ graph with per-channel int8
   weights and uint8 activations, with the settings chosen for this CPU's integer-kernel
   class (:func:`settings_for`). The graph's own uint8 -> float preprocessing prefix and its
   pooling / L2 head (nodes named ``featurebank_input/...`` and ``featurebank_head/...``) stay
   fp32, as do the ``nodes_to_exclude`` the caller names and the network stages the exclusion
   search (:func:`search_exclusions`, on the calibration images only) finds losing the most;
4. gates, on the held-out images: per output, the cosine of each INT8 vector to its fp32
   vector (median, p1 and min are recorded, the median is gated) and the agreement of each
   image's top-10 nearest neighbours among the other held-out images (cosine similarity),
   INT8 vs fp32; then the model-only speed, INT8 vs fp32 images/s on the same batches. A miss
   raises :class:`~featurebank.errors.QuantizationGateError` saying which gate and by how
   much; nothing is written at the output path (the file is written atomically at the end).

Settings per CPU class. onnxruntime's documentation of ``quantize_static`` (its docstring in
onnxruntime 1.31, "Choosing parameters for CPU inference", and
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html) says: on x86
without VNNI use ``activation_type=QUInt8, weight_type=QInt8`` with ``reduce_range=True``
("quantizes weights to 7-bit to reduce the risk of integer saturation on CPUs that typically
lack the VNNI dot-product instruction"); with VNNI the same types with ``reduce_range=False``
("VNNI-capable cores typically accumulate 8-bit products without saturation"); QDQ is the
preferred format on CPU since 1.11; ``per_channel=True`` "can improve accuracy for models with
weight distributions that vary across output channels". The saturation is the AVX2 kernels'
``vpmaddubsw``, which sums two uint8 x int8 products into a saturating int16 (see
:mod:`featurebank._cpu`); the same model file therefore gives different vectors on an AVX2 and
a VNNI host, which is why the kernel class enters the card and the fingerprint, and why
:func:`featurebank.embedder.session.open_model` refuses an INT8 model on another class.

What the measurement found (EfficientNet-Lite0, 64 calibration and 190 held-out real images,
an AMD Zen 5 host of class ``avx512-vnni``): with VNNI the 8-bit products do not saturate (the
probe below is exact), yet everything-quantized u8s8 keeps a median cosine of only 0.981
(minmax) / 0.982 (percentile); ``reduce_range`` lowers it to 0.946. The loss sits in the
first stages (high resolution, 16-32 channels, per-tensor uint8 activations). Keeping the
depthwise convolutions alone in fp32 made it worse (0.80): a lone fp32 node between quantized
ones still sees 8-bit inputs and outputs, hence whole stages. Which stages is a speed question
too (300 held-out size-mix photos, model-only CPU time at 1 thread, batches of 16):
keeping ``blocks.0`` + ``blocks.1`` fp32 (the gain-only search's choice) gave median cosine
0.9965 at 1.27x fp32; the stem + ``blocks.0`` gave 0.9960 at 2.21x, faster than everything
quantized (1.62x): the quantized stem is *slower* than fp32's, so the search weighs each
stage's measured cost as well as its gain.

The flags are not trusted blindly: :func:`u8s8_is_exact` runs one ``QLinearConv`` whose
uint8 x int8 pair sums overflow int16 and checks the result, so a host whose flags claim VNNI
but whose kernels saturate still gets ``reduce_range``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from featurebank._atomic import write_bytes_atomic
from featurebank._cpu import KERNEL_CLASSES, cpu_kernel_class
from featurebank._files import open_image_file
from featurebank.artifact import DECODE_MODES, ModelCard, OutputSpec, read_model_card, write_model_card
from featurebank.decoding import decode_image, to_model_input
from featurebank.errors import QuantizationError, QuantizationGateError

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_METHOD",
    "DEFAULT_SEARCH_BUDGET_S",
    "DEFAULT_CALIBRATION_SIZE",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_KNN_AGREEMENT",
    "MIN_HOLDOUT",
    "QuantSettings",
    "settings_for",
    "u8s8_is_exact",
    "split_images",
    "calibration_keys",
    "feature_agreement",
    "quantize_model",
    "conv_groups",
    "search_exclusions",
]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Measured on Lite0 with 254 real images here (module docstring): percentile (99.999) with
#: the exclusion search kept more neighbours at a higher speed-up than minmax, and entropy lost
#: far more than either.
DEFAULT_CALIBRATION_METHOD = "percentile"
DEFAULT_SEARCH_BUDGET_S = 300.0
#: bumped when :func:`search_exclusions` chooses differently for the same inputs (2: prefixes
#: tried after the greedy set); part of the model cache key, so cached INT8 models are re-searched
SEARCH_VERSION = 2
DEFAULT_CALIBRATION_SIZE = 64
#: Held-out images the gates need at the least (the issue's floor: a neighbour agreement over
#: fewer images says little).
MIN_HOLDOUT = 100
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_KNN_AGREEMENT = 0.90
KNN = 10
#: Graph nodes featurebank adds around the network (see featurebank.export.heads); always fp32.
_FP32_PREFIXES = ("featurebank_input/", "featurebank_head/")
_VNNI_CLASSES = ("amx", "avx512-vnni", "avx-vnni")


@dataclass(frozen=True)
class QuantSettings:
    """The ``quantize_static`` settings chosen for one CPU kernel class.

    kernel_class : the CPU class (:data:`featurebank._cpu.KERNEL_CLASSES`) they were chosen for
    activation_type, weight_type : ``"uint8"`` / ``"int8"`` (onnxruntime's QUInt8 / QInt8)
    per_channel : one weight scale per output channel
    reduce_range : 7-bit weights, so that AVX2's saturating int16 pair sums cannot clip
    quant_format : ``"QDQ"``
    reason : why these settings, in one line
    """

    kernel_class: str
    activation_type: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    quant_format: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_for(kernel_class: str, *, u8s8_exact: bool | None = None) -> QuantSettings:
    """The quantization settings that are correct on a CPU of ``kernel_class``.

    ``u8s8_exact`` : what :func:`u8s8_is_exact` measured on the host (None: not measured,
    trust the class). A VNNI class whose kernels were measured to saturate gets the AVX2
    settings.

    >>> settings_for("avx2").reduce_range, settings_for("avx512-vnni").reduce_range
    (True, False)
    """
    if kernel_class not in KERNEL_CLASSES:
        raise ValueError(f"kernel_class must be one of {', '.join(KERNEL_CLASSES)}; got kernel_class={kernel_class!r}")
    common = dict(kernel_class=kernel_class, activation_type="uint8", weight_type="int8", per_channel=True,
                  quant_format="QDQ")
    if kernel_class in _VNNI_CLASSES and u8s8_exact is not False:
        return QuantSettings(**common, reduce_range=False,
                             reason=f"{kernel_class}: VNNI accumulates uint8 x int8 products in int32 without "
                                    "saturation, so full 8-bit weights")
    if kernel_class in _VNNI_CLASSES:
        return QuantSettings(**common, reduce_range=True,
                             reason=f"{kernel_class} flags, but the u8s8 probe saturated: 7-bit weights (reduce_range)")
    if kernel_class == "avx2":
        return QuantSettings(**common, reduce_range=True,
                             reason="avx2 without VNNI: vpmaddubsw sums uint8 x int8 pairs into a saturating int16, "
                                    "so 7-bit weights (reduce_range), onnxruntime's documented answer")
    return QuantSettings(**common, reduce_range=True,
                         reason="other: integer kernels unknown, so the conservative 7-bit weights (reduce_range)")


def u8s8_is_exact() -> bool:
    """Whether this host's uint8 x int8 convolution kernel is exact where int16 pair sums overflow.

    One ``QLinearConv`` (16 input channels of 250, 3x3 weights of 127: each pair of products
    is 63500 > 32767) compared with the exact integer result. Takes a few milliseconds.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = np.full((1, 16, 4, 4), 250, np.uint8)
    inits = [
        numpy_helper.from_array(np.full((4, 16, 3, 3), 127, np.int8), "w"),
        numpy_helper.from_array(np.float32(1.0), "xs"), numpy_helper.from_array(np.uint8(0), "xz"),
        numpy_helper.from_array(np.ones(4, np.float32), "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.float32(20000.0), "ys"), numpy_helper.from_array(np.uint8(0), "yz"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "u8s8_probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    expected = round(250 * 127 * 16 * 9 / 20000.0)  # the centre pixel sees the full 3x3 window
    return int(y[0, 0, 2, 2]) == expected


# ---------------------------------------------------------------------------------------
# images: content keys, split, decoding
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    path: str
    key: str  # sha256 of the file's bytes (the store's content key)
    data: bytes


def _read_images(paths: Sequence[str | os.PathLike[str]]) -> list[_Image]:
    """Read and hash each image once, keeping the first path of each distinct content."""
    seen: set[str] = set()
    out: list[_Image] = []
    for p in paths:
        path = os.path.abspath(os.fspath(p))
        with open_image_file(path) as f:
            data = f.read()
        key = hashlib.sha256(data).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(_Image(path, key, data))
    return out


def calibration_keys(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The distinct content keys (sha256 of each file's bytes, the store's key) of ``paths``,
    sorted: what identifies a calibration set, whatever the files are named or listed as."""
    keys = set()
    for p in paths:
        digest = hashlib.sha256()
        with open_image_file(os.fspath(p)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        keys.add(digest.hexdigest())
    return sorted(keys)


def split_images(keys: Sequence[str], calibration_size: int, *, min_holdout: int = MIN_HOLDOUT,
                 seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of ``keys`` (distinct content keys) to calibrate on and to hold out for the gates.

    The order is a seeded permutation of the keys sorted, so the split depends on the images'
    content and ``seed``, not on listing order. Raises :class:`QuantizationError` with the count
    needed when fewer than ``calibration_size + min_holdout`` distinct images are given.
    """
    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError("keys must be distinct content keys")
    need = calibration_size + min_holdout
    if n < need:
        raise QuantizationError(
            f"INT8 calibration needs at least {need} distinct images ({calibration_size} to calibrate + {min_holdout} "
            f"held out for the gates); got {n}: add {need - n} images or lower the calibration size"
        )
    order = sorted(range(n), key=lambda i: keys[i])
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [order[i] for i in perm]
    return shuffled[:calibration_size], shuffled[calibration_size:]


def _decode(images: Sequence[_Image], card: ModelCard, decode_mode: str) -> np.ndarray:
    c, h, w = card.preprocessing.input_size
    out = np.empty((len(images), h, w, c), np.uint8)
    for i, im in enumerate(images):
        decode_image(im.data, card, mode=decode_mode, out=out[i], name=im.path)
    return out


def _batches(pixels: np.ndarray, card: ModelCard, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(pixels), batch_size):
        yield to_model_input(np.ascontiguousarray(pixels[i : i + batch_size]), card)


def _calibration_reader(pixels: np.ndarray, card: ModelCard, batch_size: int):
    """A CalibrationDataReader over ``pixels`` in batches of one size: the largest divisor of
    the image count up to ``batch_size``. onnxruntime's histogram calibrators (percentile,
    entropy) stack the batches with ``np.asarray`` and fail on a shorter last batch."""
    from onnxruntime.quantization import CalibrationDataReader

    batch_size = max(d for d in range(1, max(1, min(batch_size, len(pixels))) + 1) if len(pixels) % d == 0)

    class _Reader(CalibrationDataReader):
        """Feeds the calibration images, decoded with the card's preprocessing, batch by batch.
        ``set_range`` (batch indices) lets quantize_static collect one batch at a time
        (``CalibStridedMinMax``), so that the calibrator never holds every intermediate tensor of
        every image at once (5.3 GB for Lite0 on 64 images, measured)."""

        def __init__(self) -> None:
            self.set_range(0, len(self))

        def __len__(self) -> int:
            return -(-len(pixels) // batch_size)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = _batches(pixels[start_index * batch_size : end_index * batch_size], card, batch_size)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {card.input_name: batch}

        def rewind(self) -> None:
            self.set_range(0, len(self))

    return _Reader()


# ---------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def feature_agreement(reference: np.ndarray, candidate: np.ndarray, *, k: int = KNN) -> dict[str, float]:
    """How closely ``candidate`` vectors follow ``reference`` vectors of the same images.

    reference, candidate : ndarray of shape (n_samples, ...) (flattened per sample)

    Returns ``{"median_cosine", "p1_cosine", "min_cosine", "knn_agreement", "n", "k"}``:
    the cosine of each candidate vector to its reference vector, and the mean fraction of each
    sample's top-``k`` nearest neighbours among the other samples (cosine similarity) that the
    candidate vectors share with the reference ones.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(30, 8))
    >>> feature_agreement(x, x)["knn_agreement"]
    1.0
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"reference and candidate differ in shape: {reference.shape} vs {candidate.shape}")
    n = len(reference)
    if n <= k:
        raise ValueError(f"the neighbour agreement needs more than k={k} samples; got n_samples={n}")
    a, b = _unit(reference), _unit(candidate)
    cos = np.sum(a * b, axis=1)
    na, nb = _neighbours(a, k), _neighbours(b, k)
    shared = [len(set(na[i]).intersection(nb[i])) for i in range(n)]
    return {
        "median_cosine": float(np.median(cos)),
        "p1_cosine": float(np.percentile(cos, 1)),
        "min_cosine": float(cos.min()),
        "knn_agreement": float(np.mean(shared) / k),
        "n": int(n),
        "k": int(k),
    }


def _session(model: bytes | str, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _embed(sess, card: ModelCard, pixels: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    names = [o.name for o in card.outputs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in _batches(pixels, card, batch_size):
        for n, v in zip(names, sess.run(names, {card.input_name: batch})):
            parts[n].append(np.asarray(v, np.float32))
    return {n: np.concatenate(v) for n, v in parts.items()}


def _speed(fp32, int8, card: ModelCard, pixels: np.ndarray, batch_size: int, rounds: int = 3) -> dict[str, float]:
    """Model-only speed of both sessions on the same batches, interleaved rounds, best of each.

    ``speedup`` (the gated figure) is the ratio of CPU time (the process's, both sessions'
    threads; no spinning): on a shared machine, wall time measures the neighbours too (a Lite0
    export gated while other jobs ran got 0.81x by wall time for a model 1.5x faster by CPU time).
    The wall-clock images/s and ratio are recorded beside it (``wall_*``).
    """
    batches = list(_batches(pixels, card, batch_size))
    names = [o.name for o in card.outputs]
    wall = {"fp32": np.inf, "int8": np.inf}
    cpu = {"fp32": np.inf, "int8": np.inf}
    for sess in (fp32, int8):  # warm-up: first runs allocate
        sess.run(names, {card.input_name: batches[0]})
    for _ in range(rounds):
        for label, sess in (("fp32", fp32), ("int8", int8)):
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                sess.run(names, {card.input_name: b})
            cpu[label] = min(cpu[label], time.process_time() - c0)
            wall[label] = min(wall[label], time.perf_counter() - t0)
    n = len(pixels)
    return {"fp32_images_per_cpu_s": round(n / cpu["fp32"], 2), "int8_images_per_cpu_s": round(n / cpu["int8"], 2),
            "speedup": round(cpu["fp32"] / cpu["int8"], 3),
            "wall_fp32_images_per_s": round(n / wall["fp32"], 2), "wall_int8_images_per_s": round(n / wall["int8"], 2),
            "wall_speedup": round(wall["fp32"] / wall["int8"], 3), "images": int(n), "batch_size": int(batch_size)}


# ---------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_preprocess_hint() -> Iterator[None]:
    """quantize_static logs "Please consider pre-processing" on the root logger each call. Its
    pre-processing (symbolic shape inference, graph optimisation) renames nodes, which would break
    ``nodes_to_exclude`` given in the exported graph's names; featurebank's exports are already
    constant-folded, so the hint does not apply."""
    root, hint = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def _quantize(model, card: ModelCard, cal_pixels: np.ndarray, excluded: Sequence[str], settings: QuantSettings,
              calibration_method: str, batch_size: int, tmp_dir: Path, cache: Path | None = None) -> onnx.ModelProto:
    """One ``quantize_static`` run; ``cache`` (a JSON path) reuses the activation ranges of an earlier run."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration_method]
    with tempfile.TemporaryDirectory(prefix=".featurebank-int8-", dir=tmp_dir) as tmp:
        q_path = Path(tmp) / "int8.onnx"
        if calibration_method == "entropy" and (cache is None or not cache.is_file()):
            cache = _entropy_ranges(model, card, cal_pixels, batch_size, Path(tmp), cache or Path(tmp) / "ranges.json")
        with _quiet_preprocess_hint():
            quantize_static(
                os.fspath(model), str(q_path), _calibration_reader(cal_pixels, card, batch_size),
                quant_format=QuantFormat.QDQ, per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(excluded),
                calibrate_method=method, calibration_cache_path=cache,
                extra_options={"CalibStridedMinMax": 1},  # one batch per collection (any method, despite the name)
            )
        return onnx.load(str(q_path))


def _module_of(node: onnx.NodeProto) -> list[str]:
    """The module path of a node, ``["blocks", "3", "0", "bn1"]``: from torch's exporter metadata
    (``pkg.torch.onnx.name_scopes``), else from its weight's name; [] when neither tells."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                scopes = []
            # ['', 'extractor.blocks.3', 'extractor.blocks.3.0.bn1', 'hardtanh_2']: modules, then the op
            modules = [s for s in scopes[:-1] if isinstance(s, str) and s]
            if modules:
                return modules[-1].split(".")
    if node.op_type == "Conv" and len(node.input) > 1 and "." in node.input[1]:
        return node.input[1].split(".")[:-1]
    return []


#: Histogram bins of the entropy calibration. quantize_static leaves onnxruntime's defaults,
#: 128 bins searched for 128 quantized bins: a single candidate threshold, the full range, so
#: "entropy" gave exactly MinMax's scales (all 59 activation scales of Lite0 equal, measured).
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128


def _entropy_ranges(model, card: ModelCard, cal_pixels: np.ndarray, batch_size: int, tmp: Path, cache: Path) -> Path:
    """Activation ranges by onnxruntime's entropy (KL) calibrator with :data:`ENTROPY_BINS`
    histogram bins, saved as a calibration cache that quantize_static then reads."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        Path(os.fspath(model)), None, augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )
    reader = _calibration_reader(cal_pixels, card, batch_size)
    with _quiet_preprocess_hint():
        for i in range(len(reader)):  # one batch per collection, as in _quantize
            reader.set_range(i, i + 1)
            calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def conv_groups(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """The graph's nodes grouped by the network stage they belong to, for groups holding a convolution.

    A node of module ``extractor.blocks.3.0.bn1`` (torch's exporter records it; else the weight
    name ``extractor.blocks.3.0.conv_dw.weight`` tells) is in group ``blocks.3``; of
    ``extractor.conv_stem`` / ``extractor.bn1`` in ``conv_stem`` / ``bn1``. Whole stages, with their
    activations and residual additions, so that a group kept in fp32 is an fp32 island (a lone
    fp32 convolution between quantized activations would still see 8-bit inputs and outputs).
    Nodes featurebank added (input prefix, heads) are never in a group. Groups keep graph order.
    """
    groups: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.name.startswith(_FP32_PREFIXES):
            continue
        parts = _module_of(node)
        if parts[:1] == ["extractor"]:
            parts = parts[1:]
        if len(parts) >= 2 and parts[0] in ("blocks", "layers", "stages", "features", "layer"):
            key = ".".join(parts[:2])
        elif parts:
            key = parts[0]
        else:
            key = node.name
        groups.setdefault(key, []).append(node.name)
    by_name = {n.name: n for n in proto.graph.node}
    return {k: v for k, v in groups.items() if any(by_name[n].op_type == "Conv" for n in v)}


def search_exclusions(
    model: str | os.PathLike[str],
    card: ModelCard,
    cal_pixels: np.ndarray,
    *,
    settings: QuantSettings,
    calibration_method: str,
    fixed: Sequence[str] = (),
    target_cosine: float = DEFAULT_MIN_COSINE,
    budget_s: float = 300.0,
    batch_size: int = 16,
    threads: int | None = None,
    tmp_dir: Path = Path("."),
    min_speedup: float = 1.0,
) -> tuple[list[str], dict[str, Any]]:
    """Which convolution groups (:func:`conv_groups`) to keep in fp32, measured.

    Measured on the calibration images only (never on the gate images), out of sample: the
    activation ranges come from the first half of them (computed once, onnxruntime's
    calibration cache), the median cosine of INT8 to fp32 vectors from the second half (scored
    on the images the ranges were fit to, the search was optimistic: 0.990 there was 0.986 on
    held-out photos for Lite0). First with everything quantized, then with each group alone kept
    in fp32: its gain in median cosine and its cost, the change in CPU seconds per image of the
    trial model (process CPU time, best of 3 runs over the scored images, so other processes on
    the machine barely move it). Then greedily keeping groups in fp32 until the median cosine
    reaches ``target_cosine``: first the groups of positive gain that cost nothing (tried even
    past the target: kept fp32 they are closer *and* faster; Lite0's stem, measured: quantized,
    onnxruntime's layout optimizer also moves the uint8 input's per-channel Mul/Add to NHWC,
    where it broadcasts them element by element), then by gain per CPU millisecond; a group is
    kept only if the median rises and the model stays within the speed gate (CPU time per image
    at most fp32's / ``min_speedup``, fp32 timed the same way; 0 lifts the cap). Last, the
    free groups not kept are tried again in the company of those kept (Fashion-MNIST: the stem
    lost alone but gained after blocks.0-2). Then prefixes, the first 1, 2, ... groups in fp32
    and the rest quantized, until one reaches the target; of the greedy set and the prefix, the
    one at the target with the lower CPU time wins (the closer one when neither reaches it).
    Stops early when ``budget_s`` seconds are spent.

    Returns (node names to keep in fp32, a record for the card: base and per-group medians and
    costs, the groups chosen, seconds spent).
    """
    t0 = time.perf_counter()
    proto = onnx.load(os.fspath(model))
    groups = conv_groups(proto)
    if len(cal_pixels) < 2 * (KNN + 1):
        raise QuantizationError(f"the exclusion search needs at least {2 * (KNN + 1)} calibration images (half fit the "
                                f"ranges, half score); got {len(cal_pixels)}: raise the calibration size")
    half = len(cal_pixels) // 2
    fit, probe = cal_pixels[:half], cal_pixels[half:]
    fp32_sess = _session(os.fspath(model), threads)
    ref = _embed(fp32_sess, card, probe, batch_size)
    record: dict[str, Any] = {"measured_on": f"calibration images: ranges from {half}, scored on {len(probe)}",
                              "target_cosine": target_cosine, "version": SEARCH_VERSION}
    with tempfile.TemporaryDirectory(prefix=".featurebank-int8-search-", dir=tmp_dir) as tmp:
        cache = Path(tmp) / "ranges.json"

        def cpu_per_image(sess) -> float:
            cpu = np.inf
            for _ in range(3):
                c0 = time.process_time()
                _embed(sess, card, probe, batch_size)
                cpu = min(cpu, time.process_time() - c0)
            return cpu / len(probe)

        def score(extra: Sequence[str]) -> tuple[float, float]:
            """(median cosine to fp32, CPU seconds per image) of the model with ``extra`` kept fp32."""
            excluded = _exclusions(proto, sorted(set(fixed) | set(extra)))
            q = _quantize(model, card, fit, excluded, settings, calibration_method, batch_size, Path(tmp), cache)
            sess = _session(q.SerializeToString(), threads)
            got = _embed(sess, card, probe, batch_size)  # also the warm-up of the timed runs
            cos = min(float(np.median(np.sum(_unit(ref[n]) * _unit(got[n]), axis=1))) for n in ref)
            return cos, cpu_per_image(sess)

        fp32_cost = cpu_per_image(fp32_sess)
        cap = fp32_cost / min_speedup if min_speedup > 0 else np.inf
        record["fp32_cpu_ms_per_image"] = round(1000 * fp32_cost, 3)

        base, base_cost = score([])
        record["base_median_cosine"] = round(base, 5)
        record["base_cpu_ms_per_image"] = round(1000 * base_cost, 3)
        gains: dict[str, float] = {}
        costs: dict[str, float] = {}  # CPU ms per image, kept fp32 minus all quantized
        for name, nodes in groups.items():
            if time.perf_counter() - t0 > budget_s:
                record["stopped"] = f"budget of {budget_s:g} s spent after {len(gains)} of {len(groups)} groups"
                break
            cos, cost = score(nodes)
            gains[name], costs[name] = round(cos - base, 5), round(1000 * (cost - base_cost), 3)
        record["gains"] = gains
        record["costs_cpu_ms_per_image"] = costs
        chosen: list[str] = []
        best = base

        def order(g: str) -> tuple[int, float]:  # free groups first (largest gain first), then gain per ms
            return (0, -gains[g]) if costs[g] <= 0 else (1, -gains[g] / costs[g])

        best_cost = base_cost

        def attempt(name: str) -> None:
            nonlocal best, best_cost
            trial, cost = score([n for g in chosen + [name] for n in groups[g]])
            if trial > best and cost <= cap:
                chosen.append(name)
                best, best_cost = trial, cost

        for name in sorted((g for g in gains if gains[g] > 0), key=order):
            if time.perf_counter() - t0 > budget_s or (best >= target_cosine and costs[name] > 0):
                break  # a free group is tried even past the target: closer to fp32 and faster
            attempt(name)
        for name in [g for g in gains if costs[g] <= 0 and g not in chosen]:  # in the company of those kept
            if not chosen or time.perf_counter() - t0 > budget_s:
                break
            attempt(name)
        record["greedy"] = {"chosen": list(chosen), "median_cosine": round(best, 5),
                            "cpu_ms_per_image": round(1000 * best_cost, 3)}
        # Prefixes: the first stages in fp32, the rest quantized. Errors of the early, high-
        # resolution stages travel through the whole network, and one fp32 island at the input
        # needs a single quantize step where the activations are already small; the greedy sum
        # of single-group gains misses such sets (Fashion-MNIST, Lite0: greedy kept blocks.1,
        # 2, 4, 6 and the stem, 1.12x fp32; the stem + blocks.0-2 prefix scored closer at 1.46x).
        # Tried until one reaches the target; the cheapest model at the target wins.
        prefixes = []
        names = list(groups)
        for j in range(1, len(names)):
            if time.perf_counter() - t0 > budget_s:
                record["stopped"] = record.get("stopped") or f"budget of {budget_s:g} s spent in the prefixes"
                break
            cos, cost = score([n for g in names[:j] for n in groups[g]])
            prefixes.append({"groups": names[:j], "median_cosine": round(cos, 5), "cpu_ms_per_image": round(1000 * cost, 3)})
            if cos >= target_cosine and cost <= cap:
                if best < target_cosine or cost < best_cost:
                    chosen, best, best_cost = list(names[:j]), cos, cost
                break
            if best < target_cosine and cos > best and cost <= cap:
                chosen, best, best_cost = list(names[:j]), cos, cost
            elif best >= target_cosine and cost > 1.1 * best_cost:
                break  # longer prefixes only add fp32 stages: dearer than the model already at the target
        record["prefixes"] = prefixes
        record.update(chosen=chosen, median_cosine=round(best, 5), cpu_ms_per_image=round(1000 * best_cost, 3),
                      seconds=round(time.perf_counter() - t0, 1))
    return [n for g in chosen for n in groups[g]], record


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {name}={value!r}")
    return float(value)


def _exclusions(proto: onnx.ModelProto, nodes_to_exclude: Sequence[str]) -> list[str]:
    names = [n.name for n in proto.graph.node]
    known = set(names)
    for name in nodes_to_exclude:
        if name not in known:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise QuantizationError(f"nodes_to_exclude names node {name!r}, which the graph lacks{hint}")
    auto = [n for n in names if n.startswith(_FP32_PREFIXES)]
    return sorted(set(auto) | set(nodes_to_exclude))


def quantize_model(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    nodes_to_exclude: Sequence[str] = (),
    min_cosine: float = DEFAULT_MIN_COSINE,
    min_knn_agreement: float = DEFAULT_MIN_KNN_AGREEMENT,
    min_speedup: float = 1.0,
    min_holdout: int = MIN_HOLDOUT,
    max_holdout: int = 500,
    decode_mode: str = "exact",
    kernel_class: str | None = None,
    batch_size: int = 16,
    threads: int | None = None,
    seed: int = 0,
    search_budget_s: float = DEFAULT_SEARCH_BUDGET_S,
    search_margin: float = 0.005,
) -> ModelCard:
    """Quantize the fp32 featurebank model ``model`` to INT8 at ``output``, gated; return its card.

    Parameters
    ----------
    model : an fp32 ONNX file written by ``featurebank export`` (or ``cut``)
    output : the INT8 ONNX file to write (only if every gate passes)
    images : image files of the user's data (duplicates by content count once); needs at least
        ``calibration_size + min_holdout`` distinct images
    calibration_size : images to calibrate on; the others are held out for the gates
    calibration_method : ``percentile`` (the default), ``minmax`` or ``entropy`` (onnxruntime's
        calibrators; entropy with :data:`ENTROPY_BINS` histogram bins)
    nodes_to_exclude : graph node names kept in fp32 (e.g. the first convolution)
    min_cosine : gate on the median cosine of INT8 to fp32 vectors of the held-out images
    min_knn_agreement : gate on the mean top-10 nearest-neighbour agreement, INT8 vs fp32
    min_speedup : gate on the INT8 / fp32 model-only speed-up, by CPU time (default 1.0: INT8
        must be faster; see :func:`_speed`); 0 records the speed without gating it
    min_holdout, max_holdout : fewest held-out images the gates accept; most they use
    decode_mode : how the images are decoded (``exact`` or ``fast``)
    kernel_class : the CPU class to choose settings for; default this CPU's (tests pin it)
    batch_size, threads, seed : calibration/gate batch size, onnxruntime intra-op threads
        (default: onnxruntime's), seed of the calibration / held-out split
    search_budget_s : above 0 (default 300), first search which network stages to keep in fp32
        (:func:`search_exclusions`, on the calibration images, within about this many seconds;
        27 s for Lite0 here); the stages it keeps in fp32 join ``quantization["nodes_to_exclude"]``
        (and so the fingerprint), its measurements go in ``verification["search"]``.
        0 skips the search
    search_margin : the search aims at ``min_cosine + search_margin``: its 32-image score is
        noisier than the gate's (Lite0, same settings: 0.9925 on the search's images, 0.9859
        on 190 held-out photos)

    Raises
    ------
    QuantizationError : too few distinct images, unknown node, a float model card missing
    QuantizationGateError : a gate missed (which, by how much); nothing written
    """
    from onnxruntime import __version__ as ort_version

    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}; "
                         f"got calibration_method={calibration_method!r}")
    if isinstance(calibration_size, bool) or not isinstance(calibration_size, int) or calibration_size < 1:
        raise ValueError(f"calibration_size must be a positive integer; got calibration_size={calibration_size!r}")
    if isinstance(min_holdout, bool) or not isinstance(min_holdout, int) or min_holdout <= KNN:
        raise ValueError(f"min_holdout must be an integer above {KNN}; got min_holdout={min_holdout!r}")
    if max_holdout < min_holdout:
        raise ValueError(f"max_holdout must be at least min_holdout={min_holdout}; got max_holdout={max_holdout!r}")
    min_cosine = _check_unit(min_cosine, "min_cosine")
    min_knn_agreement = _check_unit(min_knn_agreement, "min_knn_agreement")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or min_speedup < 0:
        raise ValueError(f"min_speedup must be a number >= 0; got min_speedup={min_speedup!r}")
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}; got decode_mode={decode_mode!r}")
    if isinstance(nodes_to_exclude, str):
        nodes_to_exclude = [nodes_to_exclude]
    src_card = read_model_card(model)
    if src_card.precision != "fp32":
        raise QuantizationError(f"only an fp32 model can be quantized; {os.fspath(model)!r} is {src_card.precision}: "
                                "export it with --precision fp32 first")
    out_path = Path(output)
    if out_path.is_dir():
        raise IsADirectoryError(21, "output path is a directory; give a file name like model-int8.onnx", str(out_path))
    kernel_class = kernel_class or cpu_kernel_class()
    settings = settings_for(kernel_class, u8s8_exact=u8s8_is_exact() if kernel_class == cpu_kernel_class() else None)

    found = _read_images(images)
    cal_idx, held_idx = split_images([im.key for im in found], calibration_size, min_holdout=min_holdout, seed=seed)
    calibration = [found[i] for i in cal_idx]
    held = [found[i] for i in held_idx][:max_holdout]
    cal_pixels = _decode(calibration, src_card, decode_mode)
    held_pixels = _decode(held, src_card, decode_mode)

    src = onnx.load(os.fspath(model))
    excluded = _exclusions(src, nodes_to_exclude)
    search = None
    if search_budget_s:
        excluded_by_search, search = search_exclusions(
            model, src_card, cal_pixels, settings=settings, calibration_method=calibration_method,
            fixed=nodes_to_exclude, target_cosine=min(1.0, min_cosine + search_margin), budget_s=search_budget_s,
            min_speedup=float(min_speedup),
            batch_size=batch_size, threads=threads, tmp_dir=out_path.parent)
        nodes_to_exclude = sorted(set(nodes_to_exclude) | set(excluded_by_search))
        excluded = _exclusions(src, nodes_to_exclude)
    quantized = _quantize(model, src_card, cal_pixels, excluded, settings, calibration_method, batch_size,
                          out_path.parent)

    quantization = {
        "kernel_class": kernel_class,
        "settings": settings.to_dict(),
        "calibration_method": calibration_method,
        "calibration_size": len(calibration),
        "calibration_sha256": hashlib.sha256("".join(sorted(im.key for im in calibration)).encode()).hexdigest(),
        "decode_mode": decode_mode,
        "nodes_to_exclude": sorted(set(nodes_to_exclude)),
    }
    outputs = tuple(
        OutputSpec.make(name=o.name, layer=o.layer, pooling=o.pooling, normalize=o.normalize, shape=o.shape,
                        backbone=src_card.backbone, weights_sha256=src_card.weights_sha256,
                        weights_source=src_card.weights_source, preprocessing=src_card.preprocessing,
                        precision="int8", quantization=quantization)
        for o in src_card.outputs
    )

    fp32_sess = _session(os.fspath(model), threads)
    int8_sess = _session(quantized.SerializeToString(), threads)
    ref = _embed(fp32_sess, src_card, held_pixels, batch_size)
    got = _embed(int8_sess, src_card, held_pixels, batch_size)
    figures = {name: feature_agreement(ref[name], got[name]) for name in ref}
    speed = _speed(fp32_sess, int8_sess, src_card, held_pixels[: max(batch_size, 64)], batch_size)
    thresholds = {"min_cosine": min_cosine, "min_knn_agreement": min_knn_agreement, "min_speedup": float(min_speedup)}
    misses: list[tuple[str, float, float]] = []
    for name, fig in figures.items():
        label = "" if len(figures) == 1 else f" ({name})"
        if fig["median_cosine"] < min_cosine:
            misses.append((f"median cosine to fp32{label}", fig["median_cosine"], min_cosine))
        if fig["knn_agreement"] < min_knn_agreement:
            misses.append((f"top-{KNN} neighbour agreement{label}", fig["knn_agreement"], min_knn_agreement))
    if speed["speedup"] < min_speedup:
        misses.append(("speed-up over fp32", speed["speedup"], float(min_speedup)))
    if misses:
        said = "; ".join(f"{gate} {value:.4f} < {limit:g} (short by {limit - value:.4f})"
                         for gate, value, limit in misses)
        raise QuantizationGateError(
            f"INT8 model refused, nothing written to {os.fspath(output)!r}: {said}, measured on {len(held)} held-out "
            f"images on a CPU of kernel class {kernel_class}; try another calibration method, keep more of the network "
            "in fp32 (nodes_to_exclude, a longer exclusion search), or relax the gate",
            misses=tuple(misses),
        )

    card = ModelCard(
        backbone=src_card.backbone, weights_source=src_card.weights_source, weights_sha256=src_card.weights_sha256,
        weights_license=src_card.weights_license, outputs=outputs, preprocessing=src_card.preprocessing,
        input_name=src_card.input_name, input_format=src_card.input_format, precision="int8",
        classes=src_card.classes, finetune=src_card.finetune, quantization=quantization,
        verification={
            "fp32": dict(src_card.verification),
            "gates": {"thresholds": thresholds, "outputs": figures, "speed": speed, "held_out": len(held)},
            "onnxruntime": ort_version,
            "calibration_keys": sorted(im.key for im in calibration),
            "held_out_keys": sorted(im.key for im in held),
            **({"search": search} if search else {}),
        },
    )
    write_model_card(quantized, card)
    onnx.checker.check_model(quantized)
    write_bytes_atomic(out_path, quantized.SerializeToString())
    return card
