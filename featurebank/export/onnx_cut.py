"""Cut any ONNX model at intermediate tensors: ``featurebank cut model.onnx --at TENSOR``.

For ONNX files featurebank did not write (a classifier from a model zoo, a colleague's
export): list the tensors it can be cut at, then cut, pool, stamp the model card and
check the result against the source graph in onnxruntime.

>>> tensors = list_onnx_tensors("resnet18.onnx")                       # doctest: +SKIP
>>> card = cut_onnx("resnet18.onnx", "/layer3/layer3.1/relu_1/Relu_output_0",
...                 "r18-l3.onnx", pool="gem", preprocessing=pre)         # doctest: +SKIP
>>> card.dim                                                           # doctest: +SKIP
256
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from featurebank.artifact import (
    INPUT_FORMATS,
    POOLINGS,
    PRECISIONS,
    ModelCard,
    OutputSpec,
    Preprocessing,
    write_model_card,
)
from featurebank.errors import ExportParityError, NotOnnxModelError
from featurebank.export.heads import (
    INPUT_NAME,
    HeadSpec,
    add_heads,
    check_tensor_names,
    convert_to_fp16,
    image_input,
    prune_graph,
    tensor_dims,
)
from featurebank.export.parity import compare_outputs, normalise_pixels, pool_reference, seeded_pixels

__all__ = [
    "TensorInfo",
    "list_onnx_tensors",
    "cut_onnx",
    "graph_input_size",
    "onnx_weights_sha256",
]

_FLOAT_TYPES = (TensorProto.FLOAT,)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor a graph can be cut at.

    Attributes
    ----------
    name : tensor name in the graph (what ``--at`` takes)
    shape : dimensions from ONNX shape inference; ``"batch"`` for the batch axis, another
        str for a symbolic dimension, None where inference could not tell (rank >= 2)
    dtype : numpy name of the element type (``"float32"``)
    op_type : type of the node that produces it (``"Relu"``, ``"Add"`` ...)
    stride : input height / tensor height for 4-D (N, C, H, W) maps when both are known
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str
    op_type: str
    stride: int | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)


# --------------------------------------------------------------------------------------
# loading and inspection


def _load(model_path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise NotOnnxModelError(f"no ONNX file at {path!r}; check the path")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except Exception as exc:  # DecodeError, google.protobuf errors, missing external data ...
        raise NotOnnxModelError(f"{path!r} is not an ONNX model ({type(exc).__name__}); pass a .onnx file") from None
    if not model.graph.node:
        raise NotOnnxModelError(f"{path!r} holds no ONNX graph (no nodes); pass a .onnx model file")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotOnnxModelError(f"{path!r} is not a valid ONNX model: {first}") from None
    return model


def _infer_with_symbolic_batch(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """name -> inferred ValueInfo, with the input's batch axis made symbolic first."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    init = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        shape = inp.type.tensor_type.shape
        if inp.name not in init and len(shape.dim) >= 1:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "batch"
    for out in m.graph.output:  # declared output dims (an exporter's "N") would win over "batch"
        out.type.tensor_type.ClearField("shape")
    for candidate in (m, model):
        try:
            # data_prop follows Shape -> Gather -> Expand chains (a ViT's class token)
            g = onnx.shape_inference.infer_shapes(candidate, data_prop=True).graph
        except Exception:  # e.g. a Reshape that hard-codes batch 1 conflicts with "batch"
            continue
        return {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
    return {}


def graph_input_size(model_path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of the model's NCHW image input, read from the graph.

    Raises ValueError when the graph leaves height or width dynamic (pass the size
    yourself, e.g. ``--input-size 224 224``).
    """
    model = _load(model_path, load_external_data=False)
    inp = image_input(model.graph)
    dims = tensor_dims(inp)
    if len(dims) != 4:
        raise ValueError(f"input {inp.name!r} has shape {dims or '?'}; featurebank needs an (N, C, H, W) image input")
    h, w = dims[2], dims[3]
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(
            f"input {inp.name!r} has a dynamic height/width {dims}; give the size the model was trained at "
            "(--input-size H W, or preprocessing.input_size)"
        )
    return (h, w)


def list_onnx_tensors(model_path: str | os.PathLike[str]) -> list[TensorInfo]:
    """Candidate cut points of an ONNX model: its float32 tensors computed from the image.

    Tensors of rank 4 (N, C, H, W) and rank 3 (N, tokens, C) come first, then the others;
    within each group, graph (topological) order. Constants and shape arithmetic (tensors
    that do not depend on the image input) are left out.

    Parameters
    ----------
    model_path : path of an ONNX file

    Returns
    -------
    list of :class:`TensorInfo`

    Raises
    ------
    NotOnnxModelError : the file is missing, not ONNX, or fails ``onnx.checker``
    """
    model = _load(model_path, load_external_data=False)
    infos = _infer_with_symbolic_batch(model)
    init = {t.name for t in model.graph.initializer}
    image_dependent = {i.name for i in model.graph.input if i.name not in init}
    input_h = None
    try:
        dims = tensor_dims(image_input(model.graph))
        if len(dims) == 4 and isinstance(dims[2], int) and dims[2] > 0:
            input_h = dims[2]
    except ValueError:
        pass
    found: list[tuple[int, int, TensorInfo]] = []
    for node in model.graph.node:
        # Shape/Size read only the input's size, not its pixels: what follows them is
        # shape arithmetic (a ViT's float sqrt of the head size), not a feature.
        if node.op_type in ("Shape", "Size") or not any(i in image_dependent for i in node.input):
            continue
        for out in node.output:
            if not out:
                continue
            image_dependent.add(out)
            vi = infos.get(out)
            if vi is None:
                continue
            elem = vi.type.tensor_type.elem_type
            shape = tuple(None if isinstance(d, str) and d.startswith("unk__") else d for d in tensor_dims(vi))
            if elem not in _FLOAT_TYPES or len(shape) < 2:  # no batch axis: not a feature
                continue
            stride = None
            if len(shape) == 4 and input_h and isinstance(shape[2], int) and shape[2] > 0:
                stride = max(1, round(input_h / shape[2]))
            dtype = str(np.dtype(helper.tensor_dtype_to_np_dtype(elem)))
            info = TensorInfo(name=out, shape=shape, dtype=dtype, op_type=node.op_type, stride=stride)
            found.append((0 if len(shape) in (3, 4) else 1, len(found), info))
    return [t for _, _, t in sorted(found, key=lambda r: (r[0], r[1]))]


def onnx_weights_sha256(model: onnx.ModelProto) -> str:
    """sha256 of a graph's weights, independent of file path and of how tensors are stored.

    What is hashed, in order of tensor name: every initializer of the main graph and the
    tensor value of every ``Constant`` node (named by its output), each as
    ``name \\0 dtype \\0 shape \\0`` followed by its values as C-ordered little-endian bytes
    (``numpy_helper.to_array``, so ``raw_data`` vs typed fields and external data files
    give the same hash). Graph structure, metadata, the file name and its location are not
    hashed; Constant nodes are, because some exporters store weights in them.
    """
    tensors: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        tensors[t.name] = numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value":
                tensors[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                tensors[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header = f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode("utf-8")
        h.update(header)
        h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# cutting


def _check_output_dir(output_path: Path, model_path: Path) -> None:
    if output_path.exists() and output_path.is_dir():
        raise IsADirectoryError(f"output_path {str(output_path)!r} is a folder; give a file name like cut.onnx")
    if output_path.exists() and model_path.exists() and os.path.samefile(output_path, model_path):
        raise ValueError(f"output_path {str(output_path)!r} is the source model; choose another file")
    folder = output_path.parent
    if not folder.exists():
        raise FileNotFoundError(f"output folder {str(folder)!r} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"output folder {str(folder)!r} is not a folder; choose another output_path")
    # A real probe: os.access is wrong for root and for read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=".featurebank-probe-", dir=folder)
    except OSError as exc:
        raise PermissionError(
            f"cannot write to output folder {str(folder)!r} ({exc.strerror}); choose a writable folder"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _session(model: onnx.ModelProto, *, optimize: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _reference_maps(model: onnx.ModelProto, tensors: Sequence[str], floats: np.ndarray) -> list[np.ndarray]:
    """Run the source graph with ``tensors`` as its outputs (no graph optimisation)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    del ref.graph.output[:]
    ref.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    prune_graph(ref.graph)  # an early cut need not load the late weights
    inp = image_input(model.graph)
    dims = tensor_dims(inp)
    fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    sess = _session(ref, optimize=False)
    step = fixed_batch or len(floats)
    chunks = [sess.run(list(tensors), {inp.name: floats[i : i + step]}) for i in range(0, len(floats), step)]
    return [np.concatenate([c[k] for c in chunks], axis=0) for k in range(len(tensors))]


def _as_list(value: Any, n: int, what: str) -> list:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} needs one value per tensor in at ({n}); got {what}={value!r}")
    return value


def cut_onnx(
    model_path: str | os.PathLike[str],
    at: str | Sequence[str],
    output_path: str | os.PathLike[str],
    *,
    pool: str | Sequence[str] = "avg",
    normalize: bool = False,
    preprocessing: Preprocessing,
    input_format: str = "float",
    precision: str = "fp32",
    backbone: str | None = None,
    weights_license: str = "unknown",
    names: Sequence[str] | None = None,
    gem_p: float = 3.0,
    atol: float | None = None,
    min_cosine: float | None = None,
    seed: int = 0,
) -> ModelCard:
    """Cut the ONNX model at ``at``, pool, verify against the source and write one file.

    Parameters
    ----------
    model_path : source ONNX file with one float32 NCHW image input (normalised pixels)
    at : tensor name(s) from :func:`list_onnx_tensors`; several give one output each
    output_path : file to write; its folder must exist. Written atomically: nothing is
        left at this path if anything fails.
    pool : ``avg`` | ``max`` | ``gem`` | ``token`` | ``none``, or one per tensor. Rank-4
        tensors are read as (N, C, H, W), rank-3 as (N, tokens, C) (``token`` takes
        ``x[:, 0, :]``; ``avg`` averages all tokens, class token included); rank-2
        (N, C) tensors are vectors already and take ``none``.
    normalize : L2-normalise each output over its feature axis
    preprocessing : how images become the source model's input; ``input_size`` must fit it
    input_format : ``float`` (NCHW float32 input) or ``uint8`` (NHWC uint8 pixels; the graph
        scales and normalises with ``preprocessing``)
    precision : ``fp32`` or ``fp16`` (weights and compute; inputs/outputs keep their types)
    backbone : name in the card; default the file stem
    weights_license : license of the weights, stored in the card
    names : output names; default ``"embedding"``, or ``"embedding:<tensor>"`` for several
    gem_p : GeM exponent
    atol, min_cosine : parity bounds overriding :data:`featurebank.export.parity.TOLERANCES`
    seed : seeds the verification pixels

    Returns
    -------
    ModelCard written into the file; ``verification`` holds the parity figures per output
    (max_abs_diff, min_cosine), the number of inputs, the seed and the provider used.

    Raises
    ------
    NotOnnxModelError : the source is missing, not ONNX, or fails ``onnx.checker``
    UnknownTensorError : a tensor in ``at`` is not in the graph (closest names listed)
    ExportParityError : the cut model disagrees with the source graph, or cannot run it
    ValueError : a bad argument, named with its value
    OSError : the output folder is missing or not writable (checked before any work)
    """
    model_path = Path(os.fspath(model_path))
    output_path = Path(os.fspath(output_path))
    tensors = [at] if isinstance(at, str) else list(at) if isinstance(at, Sequence) else None
    if not tensors or not all(isinstance(t, str) and t for t in tensors):
        raise ValueError(f"at must be a tensor name or a non-empty list of them; got at={at!r}")
    if len(set(tensors)) != len(tensors):
        raise ValueError(f"at names a tensor twice; got at={tensors!r}")
    pools = _as_list(pool, len(tensors), "pool")
    for p in pools:
        if p not in POOLINGS:
            raise ValueError(f"pool must be one of {', '.join(POOLINGS)}; got pool={p!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be a bool; got normalize={normalize!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(map(repr, PRECISIONS))}; got precision={precision!r}")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be {' or '.join(map(repr, INPUT_FORMATS))}; got input_format={input_format!r}")
    if not isinstance(preprocessing, Preprocessing):
        raise ValueError(
            f"preprocessing must be a featurebank.artifact.Preprocessing; got {type(preprocessing).__name__}"
        )
    if names is None:
        names = ["embedding"] if len(tensors) == 1 else [f"embedding:{t}" for t in tensors]
    names = list(names) if not isinstance(names, str) else [names]
    if len(names) != len(tensors):
        raise ValueError(f"names needs one name per tensor in at ({len(tensors)}); got names={names!r}")
    _check_output_dir(output_path, model_path)

    source = _load(model_path)
    check_tensor_names(source.graph, tensors)

    # 1. the reference: the source graph with the cut tensors exposed, on seeded pixels
    inp = image_input(source.graph)
    dims = tensor_dims(inp)
    if len(dims) == 4:
        for axis, want in zip((1, 2, 3), preprocessing.input_size):
            if isinstance(dims[axis], int) and dims[axis] > 0 and dims[axis] != want:
                raise ValueError(
                    f"preprocessing.input_size={preprocessing.input_size} does not fit the input {inp.name!r} "
                    f"of shape {dims}; pass the model's (C, H, W)"
                )
    fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    n = fixed_batch if fixed_batch and fixed_batch > 1 else 2
    c, h, w = preprocessing.input_size
    pixels = seeded_pixels(n, h, w, c, seed=seed)
    floats = normalise_pixels(pixels, preprocessing.mean, preprocessing.std)
    try:
        maps = _reference_maps(source, tensors, floats)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise ValueError(
            f"onnxruntime cannot run {model_path.name!r} on a {list(floats.shape)} float32 input "
            f"(does preprocessing.input_size={preprocessing.input_size} fit the model?): {exc}"
        ) from None

    # 2. the cut model
    heads = []
    for t, p, name, m in zip(tensors, pools, names, maps):
        if m.ndim == 4:
            layout = "NCHW"
        elif m.ndim == 3:
            layout = "NLC"
        elif m.ndim == 2 and p == "none":
            layout = "NCHW"  # (N, C): the feature axis is 1 either way
        elif m.ndim == 2:
            raise ValueError(f"tensor {t!r} is already a vector {m.shape}; use pool='none'")
        else:
            raise ValueError(f"tensor {t!r} has shape {m.shape}; featurebank cuts at (N, C, H, W), (N, L, C) or (N, C)")
        if p == "token" and layout != "NLC":
            raise ValueError(f"pool='token' needs an (N, tokens, C) tensor; {t!r} has shape {m.shape}; use avg, max or gem")
        heads.append(HeadSpec(tensor=t, name=name, pooling=p, normalize=bool(normalize), layout=layout, gem_p=gem_p))
    cut = add_heads(source, heads, input_format=input_format, preprocessing=preprocessing)
    if precision == "fp16":
        cut = convert_to_fp16(cut)

    # 3. verify
    # Always on the CPU provider, so the verdict and the card's figures are the same on
    # every machine. It runs fp16 graphs (casting around ops without fp16 kernels), which
    # checks the weight rounding; tests/export/test_cut.py checks CUDA's fp16 kernels.
    feed = pixels if input_format == "uint8" else floats
    try:
        sess = _session(cut, optimize=True)
        got = sess.run(names, {INPUT_NAME: feed})
    except Exception as exc:
        raise ExportParityError(
            f"the cut model does not run on a batch of {len(feed)} ({type(exc).__name__}: {exc}); the source graph "
            f"may hard-code its batch size; nothing was written to {str(output_path)!r}"
        ) from None
    figures: dict[str, Any] = {}
    for head, m, out in zip(heads, maps, got):
        expected = pool_reference(m, head.pooling, layout=head.layout, normalize=head.normalize, gem_p=head.gem_p)
        try:
            figures[head.name] = compare_outputs(
                expected, out, precision, name=head.name, atol=atol, min_cosine=min_cosine
            )
        except ExportParityError as exc:
            raise ExportParityError(f"{exc}; nothing was written to {str(output_path)!r}") from None

    # 4. the card
    weights_sha256 = onnx_weights_sha256(source)
    backbone = backbone or model_path.stem
    source_name = f"onnx:{model_path.name}"
    outputs = tuple(
        OutputSpec.make(
            name=head.name, layer=t, pooling=head.pooling, normalize=head.normalize, shape=tuple(out.shape[1:]),
            backbone=backbone, weights_sha256=weights_sha256, weights_source=source_name,
            preprocessing=preprocessing, precision=precision,
        )
        for head, t, out in zip(heads, tensors, got)
    )
    card = ModelCard(
        backbone=backbone,
        weights_source=source_name,
        weights_sha256=weights_sha256,
        weights_license=weights_license,
        outputs=outputs,
        preprocessing=preprocessing,
        input_name=INPUT_NAME,
        input_format=input_format,
        precision=precision,
        verification={"inputs": int(len(feed)), "seed": int(seed), "provider": sess.get_providers()[0],
                      "outputs": figures},
    )
    write_model_card(cut, card)  # metadata only: add_heads / convert_to_fp16 checked the graph
    _write_atomically(cut, output_path)
    return card


def _write_atomically(model: onnx.ModelProto, output_path: Path) -> None:
    from featurebank._atomic import write_bytes_atomic

    write_bytes_atomic(output_path, model.SerializeToString())
