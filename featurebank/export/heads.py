"""ONNX graph surgery shared by ``featurebank export`` and ``featurebank cut``.

Pooling, L2 normalisation, the uint8 input prefix and fp16 conversion exist once, here,
and act on ONNX graphs, whatever produced them (torch export or a model zoo file).

* :func:`add_heads` turns chosen tensors of a graph into pooled ``(N, C)`` float32 outputs,
  optionally puts a uint8 NHWC ``pixels`` input in front, and prunes every node the new
  outputs do not need, so cutting early gives a smaller graph and file.
* :func:`convert_to_fp16` stores weights and computes in fp16, keeping float32 inputs and
  outputs; the input prefix and the heads stay fp32 (see its docstring for why).

Example
-------
>>> from featurebank.export.heads import HeadSpec, add_heads       # doctest: +SKIP
>>> cut = add_heads(model, [HeadSpec("/layer3/Relu_output_0", "embedding", "gem", True,
...                                   "NCHW")], input_format="uint8", preprocessing=pre)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from featurebank.artifact import INPUT_FORMATS, POOLINGS
from featurebank.errors import UnknownTensorError
from featurebank.export.parity import GEM_EPS, NORM_EPS, PATCH_POOLINGS

if TYPE_CHECKING:
    from featurebank.artifact import Preprocessing

__all__ = [
    "HeadSpec",
    "add_heads",
    "convert_to_fp16",
    "check_tensor_names",
    "graph_tensor_names",
    "prune_graph",
    "image_input",
    "tensor_dims",
    "INPUT_NAME",
    "HEAD_NODE_PREFIX",
    "INPUT_NODE_PREFIX",
]

#: Name of the image input of every graph featurebank writes.
INPUT_NAME = "pixels"
#: Node-name prefixes of what this module adds; :func:`convert_to_fp16` keeps them fp32.
HEAD_NODE_PREFIX = "featurebank_head/"
INPUT_NODE_PREFIX = "featurebank_input/"

_LAYOUTS = ("NCHW", "NLC")
_BATCH = "batch"
# Reduce* ops take `axes` as an input from opset 18 (ReduceSum from 13); before, an attribute.
_AXES_AS_INPUT_SINCE = {"ReduceMean": 18, "ReduceMax": 18, "ReduceL2": 18, "ReduceSum": 13}
_MIN_OPSET = 9


@dataclass(frozen=True)
class HeadSpec:
    """One new graph output: a tensor of the graph, pooled and maybe L2-normalised.

    Attributes
    ----------
    tensor : name of an existing tensor (node output) in the graph
    name : name of the new graph output
    pooling : ``"avg"`` | ``"max"`` | ``"gem"`` | ``"token"`` (first token, NLC only) |
        ``"none"`` (the map is kept as it is: (N, C, H, W) or (N, L, C))
    normalize : L2-normalise over the feature axis (C)
    layout : ``"NCHW"`` for conv maps, ``"NLC"`` for (N, tokens, C) transformer maps
    gem_p : GeM exponent (Radenovic et al.), > 0
    skip_tokens : NLC only: leading tokens (class / register tokens) left out of avg, max
        and gem pooling, as timm's ``global_pool="avg"`` does
    """

    tensor: str
    name: str
    pooling: str
    normalize: bool
    layout: str
    gem_p: float = 3.0
    skip_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, str) or not self.tensor:
            raise ValueError(f"tensor must be a non-empty tensor name; got tensor={self.tensor!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty output name; got name={self.name!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got pooling={self.pooling!r}")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(_LAYOUTS)}; got layout={self.layout!r}")
        if not isinstance(self.normalize, (bool, np.bool_)):
            raise ValueError(f"normalize must be a bool; got normalize={self.normalize!r}")
        if self.pooling == "token" and self.layout != "NLC":
            raise ValueError(
                f"pooling='token' takes x[:, 0, :] of an (N, tokens, C) map and needs layout='NLC'; "
                f"got layout={self.layout!r} for tensor {self.tensor!r} (use avg, max or gem for NCHW maps)"
            )
        try:
            p = float(self.gem_p)
        except (TypeError, ValueError):
            raise ValueError(f"gem_p must be a positive number; got gem_p={self.gem_p!r}") from None
        if not (p > 0 and np.isfinite(p)):
            raise ValueError(f"gem_p must be a positive number; got gem_p={self.gem_p!r}")
        object.__setattr__(self, "gem_p", p)
        if not isinstance(self.skip_tokens, (int, np.integer)) or self.skip_tokens < 0:
            raise ValueError(f"skip_tokens must be an integer >= 0; got skip_tokens={self.skip_tokens!r}")
        if self.skip_tokens and self.layout != "NLC":
            raise ValueError(f"skip_tokens applies to (N, tokens, C) maps; got layout={self.layout!r}")


# --------------------------------------------------------------------------------------
# graph helpers


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including outer-scope names its subgraphs (If/Loop) read."""
    names = {n for n in node.input if n}
    for g in _subgraphs(node):
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        for sub in g.node:
            local.update(sub.output)
        for sub in g.node:
            names.update(n for n in _node_inputs(sub) if n not in local)
        names.update(o.name for o in g.output if o.name not in local)
    return names


def graph_tensor_names(graph: onnx.GraphProto) -> list[str]:
    """The graph inputs, then every tensor a node produces, in node (topological) order."""
    names = [i.name for i in graph.input]
    for node in graph.node:
        names.extend(o for o in node.output if o)
    return names


def check_tensor_names(graph: onnx.GraphProto, tensors: Sequence[str]) -> None:
    """Raise :class:`UnknownTensorError` for the first name no node of ``graph`` produces."""
    produced = {o for node in graph.node for o in node.output if o}
    for t in tensors:
        if t not in produced:
            close = difflib.get_close_matches(t, sorted(produced), n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UnknownTensorError(
                f"tensor {t!r} is not produced by any node of the graph{hint}. "
                "List the candidates with featurebank.list_onnx_tensors(path) or `featurebank cut --list`"
            )


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` wherever nodes produce or read it (subgraphs too)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for g in _subgraphs(node):
            if old not in {i.name for i in g.input}:  # a subgraph input shadows the outer name
                _rename_tensor(g, old, new)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def prune_graph(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers, inputs and value_info the graph outputs do not need (in place)."""
    needed = {o.name for o in graph.output}
    kept_nodes: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            kept_nodes.append(node)
            needed |= _node_inputs(node)
    kept_nodes.reverse()
    init = [t for t in graph.initializer if t.name in needed]
    sparse = [t for t in graph.sparse_initializer if t.values.name in needed]
    inputs = [i for i in graph.input if i.name in needed]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(init)
    del graph.sparse_initializer[:]
    graph.sparse_initializer.extend(sparse)
    del graph.input[:]
    graph.input.extend(inputs)
    # Stale shapes (e.g. a batch fixed to 1 before we made it dynamic) would clash with
    # re-inference; onnx.checker re-derives what it needs.
    del graph.value_info[:]


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers (the fp16 converter appends casts)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    available |= {t.values.name for t in graph.sparse_initializer}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if _node_inputs(node) <= available:
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted(_node_inputs(rest[0]) - available)
            raise ValueError(f"graph has a cycle or dangling inputs at node {rest[0].name!r}: {missing}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise ValueError("model has no default-domain (ai.onnx) opset import; it is not an image model")


class _Builder:
    """Creates uniquely named nodes and initializers for one graph."""

    def __init__(self, graph: onnx.GraphProto, opset: int, node_prefix: str) -> None:
        self.graph = graph
        self.opset = opset
        self.prefix = node_prefix
        self.taken = set(graph_tensor_names(graph)) | {t.name for t in graph.initializer}
        self.taken |= {n.name for n in graph.node} | {o.name for o in graph.output}
        self.nodes: list[onnx.NodeProto] = []

    def fresh(self, stem: str) -> str:
        name, k = f"{self.prefix}{stem}", 1
        while name in self.taken:
            k += 1
            name = f"{self.prefix}{stem}_{k}"
        self.taken.add(name)
        return name

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], *, out: str | None = None, **attrs) -> str:
        out = out or self.fresh(f"{op_type}_out")
        self.taken.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(op_type), **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int, *, out: str | None = None) -> str:
        if self.opset >= _AXES_AS_INPUT_SINCE[op_type]:
            ax = self.const("axes", np.asarray(axes, dtype=np.int64))
            return self.op(op_type, [x, ax], out=out, keepdims=keepdims)
        return self.op(op_type, [x], out=out, axes=list(axes), keepdims=keepdims)


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The one graph input that is not an initializer; ValueError if there are more or none."""
    init = {t.name for t in graph.initializer}
    real = [i for i in graph.input if i.name not in init]
    if len(real) != 1:
        names = ", ".join(i.name for i in real) or "none"
        raise ValueError(
            f"featurebank needs a graph with exactly one image input; this one has {len(real)} ({names})"
        )
    return real[0]


def tensor_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dimensions of a ValueInfo: int, symbolic str, or None when unknown; [] if no shape."""
    if not vi.type.tensor_type.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _inferred_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # advisory only: some foreign/custom ops cannot be inferred
        return {}
    g = inferred.graph
    return {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}


# --------------------------------------------------------------------------------------
# heads


def _add_one_head(b: _Builder, spec: HeadSpec, rank: int | None) -> None:
    x, p, out = spec.tensor, spec.pooling, spec.name
    if p != "none":
        want = 4 if spec.layout == "NCHW" else 3
        if rank is not None and rank != want:
            raise ValueError(
                f"tensor {spec.tensor!r} has rank {rank} but layout={spec.layout!r} with "
                f"pooling={p!r} needs rank {want}"
            )
    final = None if spec.normalize else out

    def gem_powered() -> str:
        clamped = b.op("Max", [x, b.const("gem_eps", np.float32(GEM_EPS))])
        return b.op("Pow", [clamped, b.const("gem_p", np.float32(spec.gem_p))])

    def gem_root(mean: str) -> str:
        return b.op("Pow", [mean, b.const("gem_inv_p", np.float32(1.0 / spec.gem_p))], out=final)

    if spec.layout == "NCHW":
        if p == "avg":
            y = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1, out=final)
        elif p == "max":
            y = b.op("Flatten", [b.op("GlobalMaxPool", [x])], axis=1, out=final)
        elif p == "gem":
            y = gem_root(b.op("Flatten", [b.op("GlobalAveragePool", [gem_powered()])], axis=1))
        else:  # none
            y = b.op("Identity", [x], out=final)
        feature_axis = 1
    else:
        if spec.skip_tokens and p in PATCH_POOLINGS:
            x = b.op("Slice", [x, b.const("skip_start", np.asarray([spec.skip_tokens], np.int64)),
                               b.const("skip_end", np.asarray([np.iinfo(np.int64).max], np.int64)),
                               b.const("skip_axis", np.asarray([1], np.int64))])
        if p == "avg":
            y = b.reduce("ReduceMean", x, [1], 0, out=final)
        elif p == "max":
            y = b.reduce("ReduceMax", x, [1], 0, out=final)
        elif p == "gem":
            y = gem_root(b.reduce("ReduceMean", gem_powered(), [1], 0))
        elif p == "token":
            y = b.op("Gather", [x, b.const("token_index", np.asarray(0, dtype=np.int64))], axis=1, out=final)
        else:
            y = b.op("Identity", [x], out=final)
        # pooled: (N, C); a kept (N, L, C) map: C is the last axis
        feature_axis = 1 if p != "none" else (rank - 1 if rank else 2)
    if spec.normalize:
        norm = b.reduce("ReduceL2", y, [feature_axis], 1)
        safe = b.op("Max", [norm, b.const("norm_eps", np.float32(NORM_EPS))])
        b.op("Div", [y, safe], out=out)


def _add_uint8_prefix(graph: onnx.GraphProto, preprocessing: "Preprocessing", opset: int) -> None:
    """Replace the float NCHW input by a uint8 NHWC ``pixels`` input plus normalisation."""
    old = image_input(graph)
    dims = tensor_dims(old)
    c, h, w = preprocessing.input_size
    if dims and len(dims) != 4:
        raise ValueError(f"input_format='uint8' needs a 4-D NCHW image input; {old.name!r} has shape {dims}")
    hh = dims[2] if dims and dims[2] is not None else h
    ww = dims[3] if dims and dims[3] is not None else w
    b = _Builder(graph, opset, INPUT_NODE_PREFIX)
    internal = b.fresh("pixels_nchw")
    _rename_tensor(graph, old.name, internal)
    graph.input.remove(old)
    mean = np.asarray(preprocessing.mean, dtype=np.float64)
    std = np.asarray(preprocessing.std, dtype=np.float64)
    # (x / 255 - mean) / std  ==  x * (1 / (255 std)) + (-mean / std): one Mul, one Add, applied
    # after the transpose to NCHW: onnxruntime broadcasts a (1, C, 1, 1) constant over whole
    # planes, but a (1, 1, 1, 3) one element by element (Lite0, batch 16: 35 ms in NHWC vs 2 ms,
    # 15% of the model's time). Transposing the uint8 pixels also moves a quarter of the bytes.
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, c, 1, 1)
    bias = (-mean / std).astype(np.float32).reshape(1, c, 1, 1)
    xf = b.op("Cast", [b.op("Transpose", [INPUT_NAME], perm=[0, 3, 1, 2])], to=TensorProto.FLOAT)
    b.op("Add", [b.op("Mul", [xf, b.const("scale", scale)]), b.const("bias", bias)], out=internal)
    graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [_BATCH, hh, ww, c]))
    for node in reversed(b.nodes):
        graph.node.insert(0, node)


def add_heads(
    model: onnx.ModelProto,
    heads: Sequence[HeadSpec],
    *,
    input_format: str = "float",
    preprocessing: "Preprocessing",
) -> onnx.ModelProto:
    """Return a new model whose outputs are exactly ``heads``, in order.

    Parameters
    ----------
    model : ONNX model with one float32 NCHW image input (normalised pixels); not modified
    heads : one :class:`HeadSpec` per new output
    input_format : ``"float"`` keeps a float32 (N, C, H, W) input, renamed ``pixels``;
        ``"uint8"`` makes ``pixels`` a uint8 (N, H, W, C) input followed by
        Transpose to NCHW -> Cast -> ``x * 1/(255 std) + (-mean/std)``, the constants
        from ``preprocessing.mean`` / ``.std``
    preprocessing : :class:`featurebank.artifact.Preprocessing` of the model; its
        ``input_size`` must match the input's fixed dimensions

    Returns
    -------
    onnx.ModelProto whose outputs are float32, ``(N, C)`` when pooled, else the map as
    it is ((N, C, H, W) or (N, L, C)), with a dynamic batch axis ``batch`` on input and
    outputs. Nodes, weights and inputs the outputs do not need are removed. An inner
    tensor named like a head or ``pixels`` is renamed ``<name>_inner`` to free the name.

    Raises
    ------
    UnknownTensorError : a head's tensor is not in the graph (closest names listed)
    ValueError : a bad argument (named with its value), duplicate output names, a rank or
        dtype that does not fit the head, an input that does not fit ``preprocessing``
    """
    from featurebank.artifact import Preprocessing

    if not isinstance(model, onnx.ModelProto):
        raise ValueError(f"model must be an onnx.ModelProto; got {type(model).__name__}")
    if input_format not in INPUT_FORMATS:
        raise ValueError(
            f"input_format must be one of {', '.join(INPUT_FORMATS)}; got input_format={input_format!r}"
        )
    if not isinstance(preprocessing, Preprocessing):
        raise ValueError(
            f"preprocessing must be a featurebank.artifact.Preprocessing; got {type(preprocessing).__name__}"
        )
    heads = list(heads)
    if not heads:
        raise ValueError("heads must name at least one output; got heads=[]")
    for h in heads:
        if not isinstance(h, HeadSpec):
            raise ValueError(f"heads must be HeadSpec instances; got {type(h).__name__}")
    names = [h.name for h in heads]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"output names must be unique; got {dupes} more than once in heads")
    if INPUT_NAME in names:
        raise ValueError(f"{INPUT_NAME!r} is the input's name; choose another output name")
    opset = _default_opset(model)
    if opset < _MIN_OPSET:
        raise ValueError(
            f"the model uses opset {opset}; featurebank needs >= {_MIN_OPSET}. Upgrade it first: "
            "onnx.save(onnx.version_converter.convert_version(onnx.load(path), 13), path)"
        )
    onnx.checker.check_model(model)
    check_tensor_names(model.graph, [h.tensor for h in heads])

    infos = _inferred_infos(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.output[:]

    produced = {o for node in graph.node for o in node.output if o}
    b = _Builder(graph, opset, HEAD_NODE_PREFIX)
    # An inner tensor that bears a head's output name (e.g. a raw export output) or the
    # input's name is renamed so the new output or input can take that name.
    alias: dict[str, str] = {}
    for taken in [INPUT_NAME, *names]:
        if taken in produced and taken not in alias:
            alias[taken] = b.fresh(f"{taken}_inner")
            _rename_tensor(graph, taken, alias[taken])
    outputs: list[onnx.ValueInfoProto] = []
    for spec in heads:
        info = infos.get(spec.tensor)
        dims = tensor_dims(info) if info is not None else []
        elem = info.type.tensor_type.elem_type if info is not None else TensorProto.FLOAT
        if elem != TensorProto.FLOAT:
            raise ValueError(
                f"tensor {spec.tensor!r} is {TensorProto.DataType.Name(elem)}; heads need a float32 feature map"
            )
        if spec.tensor in alias:
            spec = dataclasses.replace(spec, tensor=alias[spec.tensor])
        _add_one_head(b, spec, len(dims) or None)
        if spec.pooling == "none":
            shape = [_BATCH, *dims[1:]] if dims else None
        elif dims:
            shape = [_BATCH, dims[1] if spec.layout == "NCHW" else dims[-1]]
        else:
            shape = [_BATCH, None]
        outputs.append(helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, shape))
    graph.node.extend(b.nodes)
    graph.output.extend(outputs)
    prune_graph(graph)

    inp = image_input(graph)
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(
            f"input {inp.name!r} is {TensorProto.DataType.Name(inp.type.tensor_type.elem_type)}; "
            "featurebank needs a float32 NCHW image input"
        )
    dims = tensor_dims(inp)
    if len(dims) == 4:
        for axis, want in zip((1, 2, 3), preprocessing.input_size):
            if isinstance(dims[axis], int) and dims[axis] != want:
                raise ValueError(
                    f"preprocessing.input_size={preprocessing.input_size} does not fit the model's input "
                    f"{inp.name!r} of shape {dims}; pass the model's (C, H, W)"
                )
    if input_format == "uint8":
        _add_uint8_prefix(graph, preprocessing, opset)
    elif inp.name != INPUT_NAME:
        _rename_tensor(graph, inp.name, INPUT_NAME)
    # dynamic batch on the (float or uint8) input
    shape = image_input(graph).type.tensor_type.shape
    if len(shape.dim) >= 1:
        shape.dim[0].Clear()
        shape.dim[0].dim_param = _BATCH
    onnx.checker.check_model(out, full_check=True)
    return out


# --------------------------------------------------------------------------------------
# fp16


def _is_featurebank_node(node: onnx.NodeProto) -> bool:
    return node.name.startswith((HEAD_NODE_PREFIX, INPUT_NODE_PREFIX))


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with fp16 weights and compute; inputs and outputs keep their types.

    The backbone part of the graph goes through
    ``onnxruntime.transformers.float16.convert_float_to_float16`` (shipped with
    onnxruntime-gpu; its default op block list stays fp32) with ``keep_io_types=True``.
    What :func:`add_heads` added stays fp32 and is spliced back around it:

    * the uint8 input prefix: its normalisation is computed in fp32 and cast to fp16 once;
    * the heads: GeM's ``x^p`` (x ~ 40 -> 64000) and the sum of squares in the L2 norm
      overflow fp16's max of 65504 on ordinary feature maps; pooling in fp32 costs nothing.

    (The converter's own ``node_block_list`` cannot do this: it casts back to fp16 between
    two blocked nodes, and names those casts twice when a tensor feeds two blocked nodes.)

    onnxruntime's CPU provider runs the result: ops without an fp16 CPU kernel (Conv,
    Relu, ...) get Cast nodes inserted around them at session creation, so on CPU the
    weights and inter-op activations are rounded to fp16 while arithmetic is fp32. CUDA
    runs the same file with fp16 kernels.

    Parameters
    ----------
    model : float32 onnx.ModelProto (e.g. from :func:`add_heads`); not modified

    Returns
    -------
    onnx.ModelProto with float16 weights, checked with ``onnx.checker`` (full check).
    """
    if not isinstance(model, onnx.ModelProto):
        raise ValueError(f"model must be an onnx.ModelProto; got {type(model).__name__}")
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        raise ValueError("model already has float16 weights; convert_to_fp16 expects a float32 model")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = model.graph
    ours = [n for n in graph.node if _is_featurebank_node(n)]
    core_nodes = [n for n in graph.node if not _is_featurebank_node(n)]
    ours_out = {o for n in ours for o in n.output}
    ours_in = set().union(*(_node_inputs(n) for n in ours)) if ours else set()
    core_in = set().union(*(_node_inputs(n) for n in core_nodes)) if core_nodes else set()
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = [o.name for o in graph.output]
    ours_inits = [t for t in graph.initializer if t.name in ours_in and t.name not in core_in]
    core_inits = [t for t in graph.initializer if t.name in core_in]

    infos = _inferred_infos(model)

    def value_info(name: str) -> onnx.ValueInfoProto:
        vi = onnx.ValueInfoProto()
        if name in infos:
            vi.CopyFrom(infos[name])
        else:
            vi.CopyFrom(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        return vi

    # the backbone as a model of its own: fed by our prefix (or the graph input), read by
    # our heads (or the graph outputs)
    boundary_in = sorted((core_in & (ours_out | graph_inputs)) - {t.name for t in core_inits})
    boundary_out = [o for n in core_nodes for o in n.output if o in ours_in or o in graph_outputs]
    core = onnx.ModelProto()
    core.CopyFrom(model)
    del core.graph.node[:], core.graph.initializer[:], core.graph.input[:], core.graph.output[:]
    del core.graph.value_info[:]
    core.graph.node.extend(core_nodes)
    core.graph.initializer.extend(core_inits)
    core.graph.input.extend(value_info(n) for n in boundary_in)
    core.graph.output.extend(value_info(n) for n in boundary_out)
    converted = convert_float_to_float16(core, keep_io_types=True)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.node[:], g.initializer[:], g.value_info[:]
    g.node.extend(n for n in graph.node if n.name.startswith(INPUT_NODE_PREFIX))
    g.node.extend(converted.graph.node)
    g.node.extend(n for n in graph.node if n.name.startswith(HEAD_NODE_PREFIX))
    g.initializer.extend(converted.graph.initializer)
    g.initializer.extend(ours_inits)
    # The converter appends its Cast nodes at the end of the node list.
    _topological_sort(g)
    onnx.checker.check_model(out, full_check=True)
    return out
